"""benchmarks/hand.py: hand strategies as plain jax.jit, role rules read from the dataflow.

References: single-device ``jax.jit`` of the same step (numerics), Megatron-LM's partitioning rules
(Shoeybi et al. 2019, section 3: the first GEMM of the MLP and the Q/K/V projections split column-wise,
by attention head; the second GEMM and the attention output projection split row-wise; vocab-parallel
input embedding), and renamed copies of the same model (naming-agnostic rules).
"""

import doctest
import os
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import hand  # noqa: E402
import workloads  # noqa: E402


def _mesh(shape=(2, 4), names=("data", "model")):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _param_specs(strategy, w, mesh):
    in_specs, _ = hand.shardings(strategy, w.train_step, w.abstract_args(), mesh)
    return in_specs[0]


def test_megatron_on_flax_mha_block_splits_heads():
    """Flax nn.MultiHeadDotProductAttention: q/k/v kernels [d, heads, head_dim], out kernel [heads, head_dim, d]."""
    w = workloads.get("flax-mha-block")
    specs = _param_specs("megatron", w, _mesh())["MHABlock_0"]
    attention = specs["MultiHeadDotProductAttention_0"]
    for name in ("query", "key", "value"):  # column parallel, by head
        assert attention[name]["kernel"] == P(None, "model"), name
        assert attention[name]["bias"] == P("model"), name
    assert attention["out"]["kernel"] == P("model")  # row parallel: heads dim of [heads, head_dim, d]
    assert attention["out"]["bias"] == P()  # added after the all-reduce
    assert specs["Dense_0"]["kernel"] == P(None, "model") and specs["Dense_0"]["bias"] == P("model")
    assert specs["Dense_1"]["kernel"] == P("model") and specs["Dense_1"]["bias"] == P()
    assert specs["LayerNorm_0"]["scale"] == P()
    in_specs, _ = hand.shardings("megatron", w.train_step, w.abstract_args(), _mesh())
    assert in_specs[2]["x"] == P()  # Megatron alone: batch replicated
    roles = hand.roles(w.train_step, w.abstract_args())
    assert roles["['MHABlock_0']['MultiHeadDotProductAttention_0']['query']['kernel']"] == hand.Role(
        kind="column", dim=1, primitive="dot_general")


def test_megatron_on_hf_gpt2_block():
    """Hugging Face GPT-2 stores Conv1D kernels as [out, in]: column splits dim 0, row splits dim 1."""
    w = workloads.get("hf-gpt2-block")
    specs = _param_specs("megatron", w, _mesh())["transformer"]
    block = specs["h"]["0"]
    assert block["attn"]["c_attn"]["kernel"] == P("model") and block["attn"]["c_attn"]["bias"] == P("model")
    assert block["attn"]["c_proj"]["kernel"] == P(None, "model") and block["attn"]["c_proj"]["bias"] == P()
    assert block["mlp"]["c_fc"]["kernel"] == P("model")
    assert block["mlp"]["c_proj"]["kernel"] == P(None, "model")
    assert specs["wte"]["embedding"] == P("model")  # vocab-parallel embedding (indices come from the batch)
    assert specs["wpe"]["embedding"] == P()  # positions are computed: a table, kept whole


def test_expert_weights_are_found_by_dataflow():
    w = workloads.get("gshard-moe")
    roles = hand.roles(w.train_step, w.abstract_args())
    moe = "['MoEBlock_1']['EinsumMoE_0']"
    assert roles[moe + "['wi']"].expert_dims == (0,) and roles[moe + "['wi']"].kind == "column"
    assert roles[moe + "['wo']"].expert_dims == (0,) and roles[moe + "['wo']"].kind == "row"
    specs = _param_specs("expert_parallel", w, _mesh())["MoEBlock_1"]["EinsumMoE_0"]
    assert specs["wi"] == P(("data", "model")) and specs["wo"] == P(("data", "model"))
    assert specs["gate"] == P()


def test_conv_net_residual_stream_is_not_split():
    """The stem conv feeds the residual stream: kept whole; inside a block, conv pairs go column then row."""
    w = workloads.get("wresnet-gn")
    roles = hand.roles(w.train_step, w.abstract_args())
    assert roles["['Conv_0']['kernel']"].kind == "other"
    assert roles["['ResBlock_0']['Conv_0']['kernel']"] == hand.Role(kind="column", dim=3,
                                                                   primitive="conv_general_dilated")
    assert roles["['ResBlock_0']['Conv_1']['kernel']"] == hand.Role(kind="row", dim=2,
                                                                   primitive="conv_general_dilated")


def _renamed(w: workloads.Workload):
    """The same model with every parameter renamed and flattened: keys sort in another order, no names kept."""
    params = w.abstract_state()[0]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    treedef = jax.tree.structure(params)
    order = np.random.default_rng(0).permutation(len(paths))
    new_keys = [f"w{int(k):03d}" for k in order]
    back = dict(zip(paths, new_keys))

    def to_original(renamed):
        return jax.tree.unflatten(treedef, [renamed[k] for k in new_keys])

    def loss(renamed, batch):
        return w.loss(to_original(renamed), batch)

    def init_params(rng):
        return dict(zip(new_keys, jax.tree.leaves(w.init_params(rng))))

    copy = workloads.Workload(name=w.name + "-renamed", loss=loss, init_params=init_params,
                              batch_shapes=w.batch_shapes, batch_fn=w.batch_fn, optimizer=w.optimizer)
    return copy, back


@pytest.mark.parametrize("name", ["flax-mha-block", "hf-gpt2-block"])
def test_rules_are_naming_agnostic(name):
    w = workloads.get(name)
    copy, back = _renamed(w)
    mesh = _mesh()
    for strategy in ("megatron", "fsdp_tp"):
        original = _param_specs(strategy, w, mesh)
        renamed = _param_specs(strategy, copy, mesh)
        flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
            original, is_leaf=lambda x: isinstance(x, P))}
        assert any(s != P() for s in flat.values())
        for path, spec in flat.items():
            assert renamed[back[path]] == spec, (strategy, path)


def test_strategies_that_do_not_apply_say_why():
    w = workloads.get("wide-mlp")
    with pytest.raises(hand.NotApplicable, match="needs a 'model' mesh axis"):
        hand.shardings("megatron", w.train_step, w.abstract_args(), _mesh((8,), ("data",)))
    assert "no expert weights" in hand.applicable("expert_parallel", w.train_step, w.abstract_args(), _mesh())
    with pytest.raises(ValueError, match="unknown strategy 'zero9'"):
        hand.applicable("zero9", w.train_step, w.abstract_args(), _mesh())


def test_fsdp_splits_largest_divisible_dim_and_mirrors_optimizer_state():
    w = workloads.get("wide-mlp")
    in_specs, out_specs = hand.shardings("fsdp", w.train_step, w.abstract_args(), _mesh())
    params, opt_state, batch = in_specs
    assert params["block0"]["wi"]["kernel"] == P(None, ("data", "model"))  # [16, 64]: 64 is the largest
    assert params["block0"]["wo"]["kernel"] == P(("data", "model"))  # [64, 16]
    assert params["block0"]["wo"]["bias"] == P(("data", "model"))  # [16] divides by 8
    adam = opt_state[0]
    assert adam.mu == params and adam.nu == params and adam.count == P()
    assert batch["x"] == P(("data", "model"))
    assert out_specs[0] == params and out_specs[1] == opt_state and out_specs[2] == P()


CASES = [("wide-mlp", s) for s in hand.STRATEGIES if s != "expert_parallel"] + [("gshard-moe", "expert_parallel")]


@pytest.mark.parametrize("name,strategy", CASES)
def test_plain_jit_matches_one_device(name, strategy):
    """Each strategy's program gives the single-device step's loss, parameters and Adam state (eps=1e-3)."""
    w = workloads.get(name, optimizer="adamw", eps=1e-3)
    args = w.concrete_args()
    expected = jax.jit(w.train_step)(*args)
    mesh = _mesh()
    got = hand.jit(strategy, w.train_step, args, mesh, donate=False)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
    in_specs, _ = hand.shardings(strategy, w.train_step, args, mesh)
    for array, spec in zip(jax.tree.leaves(got[0]), jax.tree.leaves(in_specs[0], is_leaf=lambda x: isinstance(x, P))):
        assert array.sharding.spec == spec  # the program really runs the strategy's layout


def test_compile_gives_xla_program_with_strategy_inputs():
    w = workloads.get("wide-mlp")
    compiled = hand.compile("megatron", w.train_step, w.abstract_args(), _mesh())
    kernel = compiled.input_shardings[0][0]["block0"]["wi"]["kernel"]
    assert kernel.spec == P(None, "model")
    assert "all-reduce" in compiled.as_text()  # row-parallel outputs are summed over "model"
    assert isinstance(optax.adamw(1e-3), optax.GradientTransformation)


def test_docstring_examples():
    assert doctest.testmod(hand).failed == 0
