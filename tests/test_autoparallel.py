"""`autoplan.autoparallel` behaves like jax.jit: cached per signature, inputs placed, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoplan

AUTO2 = (jax.sharding.AxisType.Auto,) * 2


def sgd_step(w, batch):
    def loss_fn(w):
        return jnp.mean((jnp.tanh(batch["x"] @ w["a"]) @ w["b"] - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(w)
    return jax.tree.map(lambda p, g: p - 0.1 * g, w, grads), loss


def make(batch=32, din=16, hidden=64, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    w = {"a": jax.random.normal(k[0], (din, hidden)) / 4, "b": jax.random.normal(k[1], (hidden, 8)) / 8}
    data = {"x": jax.random.normal(k[2], (batch, din)), "y": jax.random.normal(k[3], (batch, 8))}
    return w, data


def test_bare_decorator_matches_jit_and_caches_the_plan():
    step = autoplan.autoparallel(sgd_step)
    w, data = make()
    want_w, want_loss = jax.jit(sgd_step)(w, data)
    got_w, got_loss = step(jax.tree.map(jnp.copy, w), data)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_w, want_w)
    assert step.plan.mesh.size == len(jax.devices())
    # No cluster= given: the preset of the devices it runs on, and the plan says so.
    assert step.plan.cluster == autoplan.clusters["cpu"]
    assert "cluster cpu (chosen automatically from device kind 'cpu')" in step.plan.summary()
    step(got_w, data)
    assert step.num_plans == 1  # same shapes: the plan is reused
    w2, data2 = make(batch=64)
    step(w2, data2)
    assert step.num_plans == 2  # new shapes: planned again
    assert step.plan.inputs[-1].shape == (64, 8)
    step(*make())
    assert step.num_plans == 2  # the first signature is still cached


def test_inputs_are_moved_to_the_planned_layout_from_anywhere():
    mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes
    step = autoplan.autoparallel(sgd_step, mesh=mesh, cluster="a100-8x", donate=False)
    w, data = make()
    want_w, want_loss = jax.jit(sgd_step)(w, data)
    # numpy on the host, one device, and a layout the plan did not choose
    host = jax.tree.map(np.asarray, w)
    one_device = jax.device_put(data, jax.devices()[3])
    for args in [(host, data), (w, one_device),
                 (jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.P(None, "model"))), data)]:
        got_w, got_loss = step(*args)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    assert step.num_plans == 1
    flat_specs = jax.tree_util.tree_leaves(step.plan.output_shardings, is_leaf=lambda x: isinstance(x, jax.P))
    for array, spec in zip(jax.tree_util.tree_leaves(got_w), flat_specs):
        assert array.sharding.is_equivalent_to(jax.sharding.NamedSharding(step.mesh, spec), array.ndim)


def test_lower_and_trace_take_shape_dtype_structs():
    step = autoplan.autoparallel(sgd_step, mesh=jax.make_mesh((4, 2), ("data", "model"), axis_types=AUTO2))
    w, data = make()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (w, data))
    compiled = step.lower(*abstract).compile()
    assert compiled.memory_analysis().argument_size_in_bytes > 0
    flops = compiled.cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
    assert flops > 0
    traced = step.trace(*abstract)
    assert "dot_general" in str(traced.jaxpr)
    assert step.num_plans == 1  # lower and trace share the cache with calls
    _, want = jax.jit(sgd_step)(w, data)
    _, loss = step(w, data)  # donates w: do not use it after this call
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert step.num_plans == 1


def test_baselines_run_through_the_same_decorator():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO2)
    w, data = make()
    _, want = jax.jit(sgd_step)(w, data)
    for name in ("data_parallel", "megatron"):
        step = autoplan.autoparallel(sgd_step, mesh=mesh, planner=lambda f, *a, **k: autoplan.plan(f, *a, **k)
                                     if name == "plan" else getattr(autoplan.baselines, name)(f, *a, **k))
        _, loss = step(jax.tree.map(jnp.copy, w), data)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        assert step.plan.name == name


def test_python_side_effects_run_once_per_signature_like_jit():
    traced, seen = [], []

    def step(w, batch):
        traced.append(batch["x"].shape)  # runs at trace time only, as under jax.jit
        new_w, loss = sgd_step(w, batch)
        jax.debug.callback(lambda v: seen.append(float(v)), loss)
        return new_w, loss

    wrapped = autoplan.autoparallel(step)
    w, data = make()
    for _ in range(3):
        w, loss = wrapped(w, data)
    jax.effects_barrier()
    assert traced == [(32, 16)]
    assert len(seen) == 3 and seen[-1] == pytest.approx(float(loss), rel=1e-6)


def test_mesh_larger_than_the_machine_is_refused():
    step = autoplan.autoparallel(sgd_step, mesh=jax.sharding.AbstractMesh((4, 4), ("data", "model")))
    with pytest.raises(ValueError, match="16 devices but 8 are available"):
        step(*make())


def test_arrays_on_devices_outside_the_mesh_are_refused():
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("data",))
    step = autoplan.autoparallel(sgd_step, mesh=mesh)
    w, data = make()
    elsewhere = jax.device_put(data["x"], jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices[4:]), ("data",)), jax.P("data")))
    with pytest.raises(ValueError, match=r"input 'batch/x' lives on devices \[4, 5, 6, 7\].*device_put"):
        step(w, {"x": elsewhere, "y": data["y"]})


def test_changed_pytree_structure_is_refused_with_the_path():
    step = autoplan.autoparallel(sgd_step, donate=False)
    w, data = make()
    step(w, data)
    with pytest.raises(autoplan.TraceError, match=r"new leaf 'w/c'.*clear_cache"):
        step({**w, "c": jnp.ones(3)}, data)
    step.clear_cache()  # an intended change: plan afresh
    _, loss = step({**w, "c": jnp.ones(3)}, data)
    assert step.num_plans == 2 and np.isfinite(loss)


def test_non_array_leaf_is_refused_with_the_path():
    step = autoplan.autoparallel(sgd_step)
    w, data = make()
    with pytest.raises(autoplan.TraceError, match=r"input 'batch/lr' is a str"):
        step(w, {**data, "lr": "fast"})


# ---------------------------------------------------------------------------
# Flax NNX: graph objects are refused; the split/merge form trains (issue 9, item 6).


def _nnx_mlp():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    return MLP(nnx.Rngs(0))


def _nnx_batch():
    k = jax.random.split(jax.random.key(1))
    return {"x": jax.random.normal(k[0], (32, 8)), "y": jax.random.normal(k[1], (32, 4))}


def _nnx_jit_step(model, optimizer, batch):
    """A step written the nnx.jit way: it updates model and optimizer in place."""
    from flax import nnx

    def loss_fn(model):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_graph_objects_are_refused_with_the_split_merge_form():
    import optax
    from flax import nnx

    model = _nnx_mlp()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    batch = _nnx_batch()
    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    with pytest.raises(autoplan.TraceError, match=r"argument 'model' is a flax.nnx MLP") as err:
        autoplan.autoparallel(_nnx_jit_step, mesh={"data": 8})(model, optimizer, batch)
    for needle in ("train nothing", "nnx.split(model, nnx.Param)", "nnx.merge(graphdef, params)", "tx.init(params)"):
        assert needle in str(err.value), needle
    with pytest.raises(autoplan.TraceError, match=r"argument 'optimizer' is a flax.nnx Optimizer"):
        autoplan.plan(lambda params, optimizer, batch: 0.0, nnx.state(model), optimizer, batch, mesh=mesh)
    with pytest.raises(autoplan.TraceError, match=r"argument 'state/model' is a flax.nnx MLP"):
        autoplan.baselines.data_parallel(lambda state, batch: state["model"](batch["x"]).sum(),
                                         {"model": model}, batch, mesh=mesh)


def test_nnx_split_merge_step_trains_like_jit_and_nnx_jit():
    import optax
    from flax import nnx

    model = _nnx_mlp()
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(0.1)

    def step(params, opt_state, batch):
        def loss_fn(params):
            return jnp.mean((nnx.merge(graphdef, params)(batch["x"]) - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = _nnx_batch()
    planned = autoplan.autoparallel(step, mesh=jax.make_mesh((4, 2), ("data", "model"), axis_types=AUTO2),
                                    donate=False)
    got, want = (params, tx.init(params)), (params, tx.init(params))
    reference_model = _nnx_mlp()
    optimizer = nnx.Optimizer(reference_model, tx, wrt=nnx.Param)
    nnx_jit_step = nnx.jit(_nnx_jit_step)
    losses = []
    for _ in range(3):
        *got, loss = planned(*got, batch)
        *want, want_loss = jax.jit(step)(*want, batch)
        nnx_loss = nnx_jit_step(reference_model, optimizer, batch)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(loss, nnx_loss, rtol=1e-6)
        losses.append(float(loss))
    assert losses[0] > losses[1] > losses[2]  # it trains
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got[0], want[0])
    nnx.update(model, got[0])  # written back, the module equals the one nnx.jit trained in place
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 nnx.state(model, nnx.Param), nnx.state(reference_model, nnx.Param))
