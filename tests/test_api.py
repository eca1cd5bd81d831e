"""`autoplan.plan` options: user-pinned input layouts (``in_shardings``) and their errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoplan
from autoplan._src.emit import emit
from autoplan._src.trace import trace

MESH = jax.sharding.AbstractMesh((2, 4), ("data", "model"))


def _mlp():
    spec = autoplan.models.get("mlp-tiny")
    return spec, (*spec.abstract_state(), spec.abstract_batch())


def test_in_shardings_pin_the_leaves_they_name_and_leave_auto_to_the_planner():
    spec, args = _mlp()
    free = autoplan.plan(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    pinned = autoplan.plan(spec.train_step, *args, mesh=MESH, cluster="a100-8x",
                           in_shardings=(P(), autoplan.AUTO, P("model")))
    specs = pinned.input_specs
    assert all(s == P() for path, s in specs.items() if path.startswith("params/"))
    assert all(s == P("model") for path, s in specs.items() if path.startswith("batch/"))
    assert pinned.cost.step_seconds >= free.cost.step_seconds * (1 - 1e-9)
    # A prefix: one spec for a whole argument, None as AUTO.
    again = autoplan.plan(spec.train_step, *args, mesh=MESH, cluster="a100-8x", in_shardings=(P(), None, P("model")))
    assert again.input_specs == specs


def test_a_pin_in_another_axis_order_is_planned_and_runs():
    """P(("model", "data")) is not in the leaf rule's mesh-ordered list; the pin adds it and the program runs."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 64)), jnp.float32)

    def step(w, x):
        return w - 0.1 * x.T @ jnp.tanh(x @ w), jnp.mean(jnp.tanh(x @ w) ** 2)

    plan = autoplan.plan(step, w, x, mesh=MESH, cluster="a100-8x", in_shardings=(P(), P(("model", "data"))))
    assert plan.input_specs["x"] == P(("model", "data"))
    program = emit(plan, trace(step, w, x), donate=False)
    got = program(w, x)
    want = jax.jit(step)(w, x)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-6)
    assert program.in_shardings[1].spec == P(("model", "data"))


@pytest.mark.parametrize("in_shardings,message", [
    ((P(), P(), P("stage")), "names mesh axis 'stage', which the mesh"),
    ((P(), P(), P(None, None, "model")), "has rank 2"),
    ((P(), P()), "has 3 non-static arguments"),
])
def test_bad_in_shardings_name_the_leaf_and_the_fix(in_shardings, message):
    spec, args = _mlp()
    with pytest.raises(ValueError, match=message) as info:
        autoplan.plan(spec.train_step, *args, mesh=MESH, in_shardings=in_shardings)
    if len(in_shardings) == 3:
        assert "batch/" in str(info.value)


def test_a_dim_the_axes_do_not_divide_is_refused():
    x = jax.ShapeDtypeStruct((6, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"in_shardings for 'x'.*dim 0 \(size 6\).*\('model',\)"):
        autoplan.plan(lambda x: (x * 2).sum(), x, mesh=MESH, in_shardings=(P("model"),))


def test_a_time_limited_ilp_never_returns_a_plan_slower_than_data_parallel(monkeypatch):
    """When the solve stops at its time limit above a manual plan (same search space, pinned), the manual
    plan is returned, with a warning and a solver record saying so."""
    from autoplan._src import api

    spec, args = _mlp()
    original = api.plan_graph
    slow = autoplan.baselines.zero1(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    calls = []

    def first_call_time_limited(*a, **k):
        calls.append(1)
        if len(calls) == 1:  # the free solve: stopped early, above data parallel
            return dataclasses.replace(slow, name="autoplan", solver={**slow.solver, "status": "feasible"})
        return original(*a, **k)

    monkeypatch.setattr(api, "plan_graph", first_call_time_limited)
    with pytest.warns(autoplan.PlanningTimeoutWarning, match="data_parallel is predicted"):
        plan = autoplan.plan(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    dp = autoplan.baselines.data_parallel(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    assert plan.cost.step_seconds == pytest.approx(dp.cost.step_seconds)
    assert dp.cost.step_seconds < slow.cost.step_seconds
    assert plan.solver["taken_from"] == "data_parallel" and plan.name == "autoplan"
    assert plan.input_specs == dp.input_specs
