import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoplan
from autoplan._src import graph as G
from autoplan._src import trace as T
from autoplan._src.trace import layer_of, trace


@pytest.fixture(scope="module")
def gpt_graph():
    spec = autoplan.models.get("gpt-tiny")
    return trace(spec.train_step, *spec.abstract_state(), spec.abstract_batch())


def test_layers_forward_and_backward(gpt_graph):
    g = gpt_graph
    assert {"block0", "block1", "wte", "head"} <= set(g.layers)
    dots = [op for op in g.ops if op.primitive == "dot_general" and op.layer == "block1"]
    roles = {op.role for op in dots}
    assert roles == {G.FORWARD, G.BACKWARD}
    assert all("transpose(" in op.name_stack for op in dots if op.role == G.BACKWARD)
    # The optimizer update of a block's kernel belongs to that block.
    opt_ops = [op for op in g.ops if op.role == G.OPTIMIZER and op.layer == "block1"]
    assert len(opt_ops) > 10


def test_inlines_nested_calls():
    @jax.jit
    def inner(x):
        return jax.nn.relu(x) * 2  # custom_jvp inside a jit

    def fn(w, x):
        return jax.checkpoint(lambda y: jnp.sin(inner(y @ w)))(x).sum()

    g = trace(jax.grad(fn), jnp.ones((4, 4)), jnp.ones((2, 4)))
    prims = {op.primitive for op in g.ops}
    assert not prims & {"jit", "pjit", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call"}
    assert "dot_general" in prims and "sin" in prims


def test_paths_and_aliases(gpt_graph):
    g = gpt_graph
    assert "params/block0/mlp_in/kernel" in g.input_paths
    assert any(p.startswith("batch/") for p in g.input_paths)
    assert "out/0/block0/mlp_in/kernel" in g.output_paths or "out/0/params/block0/mlp_in/kernel" in g.output_paths
    # Every parameter and optimizer-state leaf is updated in place; the loss is not.
    n_params = sum(p.startswith("params/") for p in g.input_paths)
    n_opt = sum(p.startswith("opt_state/") for p in g.input_paths)
    assert len(g.aliases) == n_params + n_opt
    for out_leaf, in_leaf in g.aliases.items():
        assert g.output_paths[out_leaf].split("/", 2)[2] == g.input_paths[in_leaf].split("/", 1)[1]


def test_layer_of():
    assert layer_of("transpose(jvp(GPT))/block3/mlp_in") == "block3"
    assert layer_of("jvp(GPT)/block3/jvp(GPT)/block3/ln1") == "block3"
    assert layer_of("jvp(GPT)/ln_f") == "ln_f"
    assert layer_of("jvp(MLP)") == ""
    assert layer_of("") == ""


def test_non_array_leaf_names_path():
    with pytest.raises(autoplan.TraceError, match=r"'p/b'.*str"):
        trace(lambda p: p["w"], {"w": jnp.ones(3), "b": "oops"})


def test_empty_array_names_path():
    with pytest.raises(autoplan.TraceError, match=r"'batch/x'.*empty"):
        trace(lambda batch: batch["x"].sum(), {"x": jnp.ones((0, 3))})


def test_no_inputs():
    with pytest.raises(autoplan.TraceError, match="no array inputs"):
        trace(lambda: jnp.ones(3))


def test_shape_dtype_structs_need_no_arrays():
    g = trace(lambda w: w @ w, jax.ShapeDtypeStruct((1 << 14, 1 << 14), jnp.float32))
    assert g.tensors[g.ops[g.input_ops[0]].outputs[0]].nbytes == 4 * (1 << 28)
    assert np.prod(g.ops[-2].output_shapes[0]) == 1 << 28


def _plain_jax_stack(layers):
    """An MLP stack written in plain JAX: parameters in a list, no module names."""
    params = {"embed": jnp.ones((64, 256)) * 0.01,
              "layers": [{"w1": jnp.ones((256, 1024)) * 0.01, "w2": jnp.ones((1024, 256)) * 0.01}
                         for _ in range(layers)]}

    def loss(params, x):
        h = x @ params["embed"]
        for p in params["layers"]:
            h = h + jnp.tanh(h @ p["w1"]) @ p["w2"]
        return (h ** 2).mean()

    def step(params, x):
        grads = jax.grad(loss)(params, x)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss(params, x)

    return step, params, jnp.ones((512, 64))


def test_layers_without_module_names_come_from_parameter_paths():
    step, params, x = _plain_jax_stack(4)
    graph = T.trace(step, params, x)
    assert graph.layers == ["layers/0", "layers/1", "layers/2", "layers/3"]
    dots = [op for op in graph.ops if op.primitive == "dot_general" and op.role == "forward"]
    assert [op.layer for op in dots[:9]] == [""] + [f"layers/{i // 2}" for i in range(8)]


def test_plain_jax_identical_layers_are_solved_once():
    from autoplan._src import cluster as C
    from autoplan._src import intra
    from autoplan._src.strategies import base as S

    ctx = S.Context(mesh=C.MeshShape(axis_names=("data", "model"), axis_sizes=(2, 4)),
                    cluster=C.get_cluster("a100-8x"))
    num_vars = {depth: intra.build_problem(T.trace(*_plain_jax_stack(depth)), ctx).num_vars for depth in (4, 8)}
    assert num_vars[4] == num_vars[8], num_vars
