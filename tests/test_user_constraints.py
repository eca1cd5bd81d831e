"""What the user asked for is kept: their sharding constraints (hard, shown as pinned) and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import autoplan
from autoplan._src import emit as E
from autoplan._src import trace as T
from autoplan._src.strategies.control import UserShardingError

MESH = jax.sharding.AbstractMesh((2, 4), ("data", "model"))


def _user_mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _constrained_step(spec, rows=16):
    sharding = NamedSharding(_user_mesh(), spec)

    def step(w, x):
        h = jax.lax.with_sharding_constraint(x @ w, sharding)
        return jnp.tanh(h) * 2.0

    return step, jnp.ones((64, 32)) * 0.1, jnp.arange(rows * 64, dtype=jnp.float32).reshape(rows, 64) / 100


def test_user_constraint_is_pinned_in_the_plan_and_the_compiled_program():
    # The planner alone would keep this small step replicated; the user wants rows over "data".
    step, w, x = _constrained_step(P("data", None))
    plan = autoplan.plan(step, w, x, mesh=MESH, cluster="a100-8x")
    pinned = plan.user_pinned
    assert [name for _, name in pinned] == ["user-pinned S(data)xR"]
    assert "user-pinned" in plan.summary()
    program = E.emit(plan, T.trace(step, w, x))
    np.testing.assert_allclose(np.asarray(program(w, x)), np.asarray(jax.jit(step)(w, x)), rtol=1e-6)
    hlo = program.lower(w, x).compile().as_text()
    # 16 rows over data=2: each device holds 8 rows of the constrained product.
    assert "f32[8,32]" in hlo, hlo[:2000]


def test_constraint_on_a_dim_its_axes_do_not_divide_names_dim_axes_and_line():
    step, w, x = _constrained_step(P("model", None), rows=6)
    with pytest.raises(UserShardingError, match=r"test_user_constraints.py:\d+.*dim 0 \(size 6\).*\('model',\)"):
        autoplan.plan(step, w, x, mesh=MESH, cluster="a100-8x")


def test_constraint_naming_a_missing_axis_names_it_and_the_line():
    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    step, w, x = _constrained_step(P("model", None))
    with pytest.raises(UserShardingError, match=r"test_user_constraints.py:\d+.*axis 'model'"):
        autoplan.plan(step, w, x, mesh=mesh, cluster="a100-8x")


def _remat_steps():
    def block(w, x):
        return jnp.tanh(jnp.tanh(x @ w) @ w)

    def loss(w, x, policy):
        f = block if policy is False else jax.checkpoint(block, policy=policy)
        for _ in range(4):
            x = f(w, x)
        return (x ** 2).mean()

    def step(policy):
        return lambda w, x: w - 0.1 * jax.grad(loss)(w, x, policy)

    return step


def _find_remat(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _find_remat(inner)


def test_user_checkpoint_keeps_its_policy_and_barrier():
    """The emitted program has the checkpoints, policies and optimization barriers of jax.jit's program.

    (XLA on CPU drops the barriers after scheduling, so they are counted in the lowered StableHLO.)
    """
    make = _remat_steps()
    w, x = jnp.eye(64) * 0.5, jnp.ones((256, 64))
    policy = jax.checkpoint_policies.dots_saveable
    step = make(policy)
    plan = autoplan.plan(step, w, x, num_devices=8, cluster="a100-8x")
    program = E.emit(plan, T.trace(step, w, x))
    found = list(_find_remat(program.trace(w, x).jaxpr.jaxpr))
    reference = list(_find_remat(jax.make_jaxpr(step)(w, x).jaxpr))
    assert len(found) == len(reference) > 0
    assert all(eqn.params["policy"] is policy and eqn.params["prevent_cse"] for eqn in found)
    barriers = program.lower(w, x).as_text().count("optimization_barrier")
    assert barriers == jax.jit(step).lower(w, x).as_text().count("optimization_barrier") > 0
    np.testing.assert_allclose(np.asarray(program(w, x)), np.asarray(jax.jit(step)(w, x)), rtol=1e-5)


def test_shard_map_region_takes_its_specs_and_pays_its_collectives():
    mesh = _user_mesh()

    def step(w, x):
        h = x @ w
        y = jax.shard_map(lambda a: jax.lax.psum(a, "model"), mesh=mesh, in_specs=P("data", "model"),
                          out_specs=P("data"))(h)
        return jnp.tanh(y).sum()

    w, x = jnp.ones((32, 64)) * 0.01, jnp.ones((16, 32))
    plan = autoplan.plan(step, w, x, mesh=MESH, cluster="a100-8x")
    graph = T.trace(step, w, x)
    (region,) = [op for op in graph.ops if op.primitive == "shard_map"]
    dot = graph.ops[graph.tensors[region.inputs[0]].producer]
    assert plan.op_strategies[dot.id] == "l0=data·r0=model"  # produced as the region reads it: no reshard
    (psum,) = [c for c in plan.collectives if c.op == "shard_map"]
    # The body's psum all-reduces one (16/2, 64/4) float32 block over "model".
    assert (psum.kind, psum.axes, psum.nbytes) == ("all-reduce", ("model",), 8 * 16 * 4)
    program = E.emit(plan, graph)
    np.testing.assert_allclose(float(program(w, x)), float(jax.jit(step)(w, x)), rtol=1e-6)


# ---------------------------------------------------------------------------
# Operators autoplan cannot see into: replicated, warned about with the user's line, never priced as cheap.


def _kernel_step(cost_estimate):
    from jax.experimental import pallas as pl

    def double_tanh(x_ref, o_ref):
        o_ref[...] = jnp.tanh(x_ref[...]) * 2

    def step(w, x):
        h = x @ w
        y = pl.pallas_call(double_tanh, out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype), interpret=True,
                           cost_estimate=cost_estimate)(h)  # the kernel
        return y.sum()

    return step


def test_pallas_call_is_priced_from_its_cost_estimate():
    from jax.experimental import pallas as pl

    args = (jax.ShapeDtypeStruct((256, 256), jnp.float32), jax.ShapeDtypeStruct((512, 256), jnp.float32))
    cluster = autoplan.clusters["a100-8x"]
    compute = {}
    for tflops in (1, 3):
        estimate = pl.CostEstimate(flops=tflops * 10**12, transcendentals=0, bytes_accessed=10**6)
        with pytest.warns(autoplan.UnsupportedPrimitiveWarning,
                          match=r"'pallas_call' \(at .*test_user_constraints.py:\d+ .*priced from its cost_estimate"):
            plan = autoplan.plan(_kernel_step(estimate), *args, mesh=MESH, cluster=cluster)
        kernel, = (op.id for op in T.trace(_kernel_step(estimate), *args).ops if op.primitive == "pallas_call")
        assert plan.op_strategies[kernel] == "replicated"
        compute[tflops] = plan.cost.compute_seconds
    # Two more TFLOP at the device's headline rate, on every device (the kernel runs replicated).
    assert compute[3] - compute[1] == pytest.approx(2e12 / cluster.device_flops, rel=1e-9)


def test_opaque_operators_without_an_estimate_are_priced_from_the_jaxpr_they_carry():
    from jax.experimental.custom_partitioning import custom_partitioning

    @custom_partitioning
    def fused(x, w):
        return jnp.tanh(x @ w)

    def partition(mesh, arg_shapes, result_shape):
        replicated = NamedSharding(mesh, P())
        return mesh, (lambda x, w: jnp.tanh(x @ w)), replicated, (replicated, replicated)

    fused.def_partition(partition=partition, sharding_rule="i j, j k -> i k",
                        infer_sharding_from_operands=lambda mesh, arg_shapes, result_shape: NamedSharding(mesh, P()))
    cluster = autoplan.clusters["a100-8x"]
    x, w = jax.ShapeDtypeStruct((4096, 4096), jnp.float32), jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    with pytest.warns(autoplan.UnsupportedPrimitiveWarning,
                      match=r"'custom_partitioning' \(at .*test_user_constraints.py:\d+ .*FLOPs of the jaxpr"):
        plan = autoplan.plan(lambda x, w: fused(x, w).sum(), x, w, mesh=MESH, cluster=cluster)
    matmul = 2 * 4096**3 / cluster.device_flops  # replicated: every device runs the whole product
    assert matmul <= plan.cost.compute_seconds <= 1.1 * matmul
