"""The ILP against brute force, and the plans it must rediscover."""

import dataclasses
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoplan
from autoplan._src import api, intra
from autoplan._src import cluster as C
from autoplan._src.strategies import base as S
from autoplan._src.trace import trace

A100 = autoplan.clusters["a100-8x"]


def brute_force(problem: intra.Problem) -> tuple[float, np.ndarray]:
    """Minimum of the ILP objective over every combination of choices (vectorized in chunks)."""
    sizes = problem.num_choices
    assert np.prod(sizes, dtype=float) < 3e6, sizes
    best, best_choice = np.inf, None
    grids = list(itertools.product(*[range(n) for n in sizes[:-1]]))
    last = np.arange(sizes[-1])
    for start in range(0, len(grids), 20000):
        head = np.array(grids[start:start + 20000]).reshape(-1, len(sizes) - 1)
        combos = np.concatenate([np.repeat(head, len(last), axis=0),
                                 np.tile(last, len(head))[:, None]], axis=1)
        cost = np.zeros(len(combos))
        for v, c in enumerate(problem.node_cost):
            cost += c[combos[:, v]]
        for (a, b), m in problem.edge_cost.items():
            cost += m[combos[:, a], combos[:, b]]
        i = int(np.argmin(cost))
        if cost[i] < best:
            best, best_choice = float(cost[i]), combos[i]
    return best, best_choice


def _problem(fn, *args, mesh, merge=False):
    graph = trace(fn, *args)
    ctx = S.Context(mesh=C.MeshShape.from_mesh(mesh), cluster=A100)
    options = intra.SolveOptions(merge_followers=merge, tie_layers=False)
    return graph, intra.build_problem(graph, ctx, options), options


def mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2


def linear_attention(x, wq, wk, wv):
    q, k, v = x @ wq, x @ wk, x @ wv
    return jnp.einsum("id,jd->ij", q, k) @ v  # no transpose op: layout ops have choices of their own


@pytest.mark.parametrize("solver", ["highs", "cp-sat"])
@pytest.mark.parametrize("case", ["mlp-small-batch", "mlp-large-batch", "attention"])
def test_ilp_equals_brute_force(case, solver):
    f32 = jnp.float32
    if case.startswith("mlp"):
        tokens = 16 if case == "mlp-small-batch" else 1 << 14
        args = [jax.ShapeDtypeStruct((tokens, 512), f32), jax.ShapeDtypeStruct((512, 2048), f32),
                jax.ShapeDtypeStruct((2048, 512), f32)]
        fn, mesh, merge = mlp, jax.sharding.AbstractMesh((4,), ("model",)), False
    else:
        args = [jax.ShapeDtypeStruct((64, 256), f32)] + [jax.ShapeDtypeStruct((256, 256), f32)] * 3
        fn, mesh, merge = linear_attention, jax.sharding.AbstractMesh((2,), ("model",)), True
    graph, problem, options = _problem(fn, *args, mesh=mesh, merge=merge)
    solution = intra.solve(problem, dataclasses.replace(options, solver=solver))
    best, _ = brute_force(problem)
    assert solution.objective_seconds == pytest.approx(best, rel=1e-6)
    # The objective is the cost model's own evaluation of the plan.
    cost, _ = api.evaluate(problem, solution.op_strategy, solution.peak_memory)
    assert cost.step_seconds == pytest.approx(solution.objective_seconds, rel=1e-9)


def test_merging_followers_keeps_the_optimum_on_mlp():
    args = [jax.ShapeDtypeStruct((16, 512), jnp.float32), jax.ShapeDtypeStruct((512, 2048), jnp.float32),
            jax.ShapeDtypeStruct((2048, 512), jnp.float32)]
    mesh = jax.sharding.AbstractMesh((4,), ("model",))
    _, full, options = _problem(mlp, *args, mesh=mesh, merge=False)
    _, merged, merged_options = _problem(mlp, *args, mesh=mesh, merge=True)
    assert merged.num_vars < full.num_vars
    a = intra.solve(full, options).objective_seconds
    b = intra.solve(merged, merged_options).objective_seconds
    assert b == pytest.approx(a, rel=1e-9)


def test_merged_followers_stay_near_the_full_search_on_a_pinned_gpt2_block():
    """FSDP's inputs pinned on a Hugging Face GPT-2 block (code we did not write): with layout
    operators as followers the merged ILP stopped at 320.7 us, 1.73x the optimum of the unmerged
    one; now merged is within 6% (it measures 5.4%) at under a third of the variables."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import hand
    import workloads

    pytest.importorskip("transformers")
    work = workloads.get("hf-gpt2-block")
    args = work.abstract_args()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    in_specs, _ = hand.shardings("fsdp", work.train_step, args, mesh)
    graph = trace(work.train_step, *args)
    shape = C.MeshShape.from_mesh(mesh)
    ctx = S.Context(mesh=shape, cluster=dataclasses.replace(A100, name="a100-4x", devices_per_node=4))
    found = {}
    for merge in (True, False):
        options = intra.SolveOptions(pinned=api.pinned_inputs(graph, in_specs, shape), merge_followers=merge)
        problem = intra.build_problem(graph, ctx, options)
        found[merge] = (problem.num_vars, intra.solve(problem, options).objective_seconds)
    assert 3 * found[True][0] < found[False][0]
    assert found[False][1] <= found[True][1] <= 1.06 * found[False][1], found


def test_identical_layers_share_variables():
    two = autoplan.models.get("mlp-tiny", layers=4)
    six = autoplan.models.get("mlp-tiny", layers=8)
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
    sizes = []
    for spec in (two, six):
        graph = trace(spec.train_step, *spec.abstract_state(), spec.abstract_batch())
        problem = intra.build_problem(graph, S.Context(mesh=C.MeshShape.from_mesh(mesh), cluster=A100))
        sizes.append(problem.num_vars)
    assert sizes[1] == sizes[0], sizes  # the first and last layers differ; the middle ones tie


# ---------------------------------------------------------------------------
# Rediscovery of the classic plans.


class TransformerMLP:
    """One transformer MLP block trained with adamw: x + W2 gelu(W1 x)."""

    def __init__(self, batch, seq, hidden):
        import optax

        self.tx = optax.adamw(1e-3)
        d, f = hidden, 4 * hidden
        self.params = {"mlp_in": {"kernel": jax.ShapeDtypeStruct((d, f), jnp.float32)},
                       "mlp_out": {"kernel": jax.ShapeDtypeStruct((f, d), jnp.float32)}}
        self.opt_state = jax.eval_shape(self.tx.init, self.params)
        self.batch = {"x": jax.ShapeDtypeStruct((batch, seq, d), jnp.float32)}

    def step(self, params, opt_state, batch):
        import optax

        def loss(p):
            h = jax.nn.gelu(batch["x"] @ p["mlp_in"]["kernel"])
            y = batch["x"] + h @ p["mlp_out"]["kernel"]
            return jnp.mean(y ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def args(self):
        return self.params, self.opt_state, self.batch


def test_rediscovers_megatron_on_model_mesh():
    block = TransformerMLP(batch=1, seq=8, hidden=1024)
    mesh = jax.sharding.AbstractMesh((1, 8), ("data", "model"))
    plan = autoplan.plan(block.step, *block.args(), mesh=mesh, cluster="a100-8x")
    specs = plan.input_shardings[0]
    assert specs["mlp_in"]["kernel"] == jax.P(None, "model")  # column parallel
    assert specs["mlp_out"]["kernel"] == jax.P("model")  # row parallel
    forward_allreduce = [c for c in plan.collectives if c.where.endswith("forward") and c.kind == "all-reduce"]
    assert len(forward_allreduce) == 1, plan.summary()
    # Its cost beats data parallelism on this mesh.
    dp = autoplan.baselines.data_parallel(block.step, *block.args(), mesh=mesh, cluster="a100-8x")
    assert plan.cost.step_seconds < dp.cost.step_seconds


def test_rediscovers_data_parallel_on_data_mesh():
    block = TransformerMLP(batch=64, seq=512, hidden=128)
    mesh = jax.sharding.AbstractMesh((8, 1), ("data", "model"))
    plan = autoplan.plan(block.step, *block.args(), mesh=mesh, cluster="a100-8x")
    params, opt_state, batch = plan.input_shardings
    assert params["mlp_in"]["kernel"] == jax.P() and params["mlp_out"]["kernel"] == jax.P()
    # Split over tokens (batch or sequence: the block is per token, both are data parallel), not features.
    assert batch["x"] in (jax.P("data"), jax.P(None, "data"))
    kinds = {c.kind for c in plan.collectives}
    assert "all-reduce" in kinds or "reduce-scatter" in kinds  # gradients are combined


def test_memory_budget_below_data_parallel_forces_sharding():
    block = TransformerMLP(batch=8, seq=16, hidden=1024)  # parameters and Adam state dominate memory
    mesh = jax.sharding.AbstractMesh((8, 1), ("data", "model"))
    dp = autoplan.baselines.data_parallel(block.step, *block.args(), mesh=mesh, cluster="a100-8x")
    budget = 0.5 * dp.cost.memory_bytes
    tight = autoplan.plan(block.step, *block.args(), mesh=mesh, cluster="a100-8x", memory_budget=budget)
    assert tight.cost.memory_bytes <= budget
    params, opt_state, _ = tight.input_shardings
    split = [spec for spec in jax.tree_util.tree_leaves(
        (params, opt_state), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) if spec != jax.P()]
    assert split, tight.summary()  # ZeRO-like: parameters or optimizer state are sharded
    # Whichever sharded baseline fits the budget is no cheaper than the plan.
    for name in ("zero1", "zero2", "fsdp"):
        baseline = getattr(autoplan.baselines, name)(block.step, *block.args(), mesh=mesh, cluster="a100-8x")
        if baseline.cost.memory_bytes <= budget:
            assert tight.cost.step_seconds <= baseline.cost.step_seconds * (1 + 1e-9), name


def test_infeasible_budget_reports_minimum():
    block = TransformerMLP(batch=8, seq=128, hidden=512)
    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    with pytest.raises(autoplan.PlanningError, match=r"needs [0-9.]+ (MiB|GiB) per device") as info:
        autoplan.plan(block.step, *block.args(), mesh=mesh, cluster="a100-8x", memory_budget=1024)
    need = float(str(info.value).split("needs ")[1].split(" ")[0])
    unit = 2**20 if "MiB per device" in str(info.value).split("needs ")[1][:20] else 2**30
    plan = autoplan.plan(block.step, *block.args(), mesh=mesh, cluster="a100-8x",
                         memory_budget=need * unit * 1.01)
    assert plan.cost.memory_bytes <= need * unit * 1.01


def test_unsupported_primitive_warns_and_replicates():
    def fn(x, w):
        y = jax.lax.bitcast_convert_type(x @ w, jnp.int32)
        return jax.lax.bitcast_convert_type(y, jnp.float32).sum()

    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    with pytest.warns(autoplan.UnsupportedPrimitiveWarning, match=r"bitcast_convert_type.*test_intra.py:\d+"):
        plan = autoplan.plan(fn, jax.ShapeDtypeStruct((64, 32), jnp.float32),
                             jax.ShapeDtypeStruct((32, 32), jnp.float32), mesh=mesh)
    graph = trace(fn, jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 32), jnp.float32))
    idx = [op.id for op in graph.ops if op.primitive == "bitcast_convert_type"]
    assert idx and all(plan.op_strategies[i] == "replicated" for i in idx)


def test_batch_not_divisible_is_not_split():
    block = TransformerMLP(batch=6, seq=1, hidden=64)
    mesh = jax.sharding.AbstractMesh((4,), ("data",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoplan.PlanningTimeoutWarning)
        plan = autoplan.plan(block.step, *block.args(), mesh=mesh, cluster="a100-8x")
    spec = plan.input_shardings[2]["x"]
    assert spec == jax.P() or spec[0] is None


def test_time_limit_returns_best_found_with_warning():
    spec = autoplan.models.get("gpt-tiny")
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
    with pytest.warns(autoplan.PlanningTimeoutWarning, match="time limit"):
        plan = autoplan.plan(spec.train_step, *spec.abstract_state(), spec.abstract_batch(), mesh=mesh,
                             cluster="a100-8x", time_limit=0.05)
    assert plan.solver["status"] == "feasible"


def test_a_tensor_resharded_alike_for_two_consumers_is_paid_once():
    """XLA gathers a gradient once for both backward matmuls that read it; the plan's cost says so."""
    spec = autoplan.models.get("mlp-small")
    graph = trace(spec.train_step, *spec.abstract_state(), spec.abstract_batch())
    ctx = S.Context(mesh=C.MeshShape(axis_names=("data",), axis_sizes=(8,)), cluster=A100)
    problem = intra.build_problem(graph, ctx)
    solution = intra.solve(problem)
    per_edge, _ = api.evaluate(problem, solution.op_strategy, solution.peak_memory)
    shared, uses = api.evaluate(problem, solution.op_strategy, solution.peak_memory, share_reshards=True)
    assert per_edge.step_seconds == pytest.approx(solution.objective_seconds, rel=1e-9)
    assert shared.communication_bytes < per_edge.communication_bytes  # this plan reshards for two consumers
    assert shared.compute_seconds == per_edge.compute_seconds
    reshards = [(u.where, u.op, u.kind, u.nbytes) for u in uses if u.op.startswith("reshard")]
    plan = autoplan.plan(spec.train_step, *spec.abstract_state(), spec.abstract_batch(),
                         mesh=jax.sharding.AbstractMesh((8,), ("data",)), cluster=A100)
    assert plan.cost.communication_bytes == pytest.approx(shared.communication_bytes)
    assert len(reshards) == len([u for u in plan.collectives if u.op.startswith("reshard")])
