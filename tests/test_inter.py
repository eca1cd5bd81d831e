"""The stage DP against brute force over every stage partition and submesh assignment."""

import itertools
import math

import numpy as np
import pytest

from autoplan._src import cluster as C
from autoplan._src import inter


def _synthetic(seed, sizes, microbatches):
    """A random but fixed cost table: 1-3 logical meshes per (layer range, devices, B)."""
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(6):
        for j in range(i + 1, 7):
            for d in sizes:
                for b in microbatches:
                    options = []
                    for k in range(int(rng.integers(1, 4))):
                        mesh = C.MeshShape(axis_names=(f"data{k}", "model"), axis_sizes=(d, 1))
                        work = sum(rng.uniform(0.5, 2.0) for _ in range(i, j))
                        options.append(inter.StageOption(
                            mesh=mesh, seconds=float(work / d ** rng.uniform(0.5, 1.0) / b + rng.uniform(0, 0.1)),
                            weight_bytes=float((j - i) * rng.uniform(1, 3) / d),
                            activation_bytes=float((j - i) * rng.uniform(0.2, 1.0) / b)))
                    table[(i, j, d, b)] = options
    return lambda i, j, d, b: table[(i, j, d, b)]


def _compositions(n, parts):
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield list(zip(bounds[:-1], bounds[1:]))


def _brute_force(num_layers, num_devices, cost, sizes, microbatches, schedule, budget, stages=None):
    best = math.inf
    for b in microbatches:
        for s in stages or range(1, num_layers + 1):
            for ranges in _compositions(num_layers, s):
                for devs in itertools.product(sizes, repeat=s):
                    if sum(devs) != num_devices:
                        continue
                    per_stage = []
                    for k, ((i, j), d) in enumerate(zip(ranges, devs)):
                        keep = b if schedule == "gpipe" else min(s - k, b)
                        per_stage.append([o.seconds for o in cost(i, j, d, b) if o.memory(keep) <= budget])
                    for ts in itertools.product(*per_stage):
                        best = min(best, sum(ts) + (b - 1) * max(ts))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("budget", [math.inf, 4.0])
def test_dp_equals_brute_force_synthetic(seed, schedule, budget):
    sizes, microbatches = [1, 2, 4], [1, 2, 4]
    cost = _synthetic(seed, sizes, microbatches)
    expected = _brute_force(6, 4, cost, sizes, microbatches, schedule, budget)
    if math.isinf(expected):
        with pytest.raises(inter.NoPipelineFits, match="no pipeline plan fits"):
            inter.solve_stages(6, 4, cost, microbatches=microbatches, schedule=schedule, memory_budget=budget,
                               sizes=sizes)
        return
    choice = inter.solve_stages(6, 4, cost, microbatches=microbatches, schedule=schedule, memory_budget=budget,
                                sizes=sizes)
    assert choice.step_seconds == pytest.approx(expected, rel=1e-12)
    # The plan the DP returns is valid and its predicted step is the formula evaluated on it.
    assert [s.start for s in choice.stages] == [0] + [s.end for s in choice.stages[:-1]]
    assert choice.stages[-1].end == 6 and sum(s.devices for s in choice.stages) == 4
    ts = []
    for k, s in enumerate(choice.stages):
        option = next(o for o in cost(s.start, s.end, s.devices, choice.microbatches)
                      if o.mesh == s.mesh and o.seconds == s.seconds)
        keep = choice.microbatches if schedule == "gpipe" else min(len(choice.stages) - k, choice.microbatches)
        assert option.memory(keep) <= budget and s.memory_bytes == option.memory(keep)
        ts.append(option.seconds)
    assert choice.step_seconds == pytest.approx(sum(ts) + (choice.microbatches - 1) * max(ts), rel=1e-12)
    # Runner-ups are sorted and no better than the choice.
    assert all(a.step_seconds >= choice.step_seconds for a in choice.alternatives)


def test_pinned_stage_count_and_uniform_submeshes():
    sizes, microbatches = [1, 2, 4], [2]
    cost = _synthetic(7, sizes, microbatches)
    choice = inter.solve_stages(6, 4, cost, microbatches=microbatches, sizes=sizes, num_stages=[2], uniform=True)
    assert len(choice.stages) == 2 and all(s.devices == 2 for s in choice.stages)
    assert choice.step_seconds == pytest.approx(
        _brute_force_uniform(6, 4, cost, 2, 2), rel=1e-12)


def _brute_force_uniform(num_layers, num_devices, cost, stages, b):
    best = math.inf
    d = num_devices // stages
    for ranges in _compositions(num_layers, stages):
        for ts in itertools.product(*[[o.seconds for o in cost(i, j, d, b)] for i, j in ranges]):
            best = min(best, sum(ts) + (b - 1) * max(ts))
    return best


@pytest.mark.parametrize("seed", range(3))
def test_equal_share_dp_equals_brute_force_over_stages_holding_equal_chunks(seed):
    """A scanned stack cut into 4 chunks (layers 1-4 of 6: an embedding before, a head after): every
    stage must hold the same number of chunks.  The DP's choice equals brute force over the partitions
    that do, for 2 and 4 stages; 3 stages cannot share 4 chunks and are skipped."""
    share = [0, 1, 1, 1, 1, 0]
    cost = _synthetic(seed, [1, 2, 4], [2])
    for stages in (2, 4):
        best = math.inf
        for ranges in _compositions(6, stages):
            if any(sum(share[i:j]) != 4 // stages for i, j in ranges):
                continue
            for ts in itertools.product(*[[o.seconds for o in cost(i, j, 4 // stages, 2)] for i, j in ranges]):
                best = min(best, sum(ts) + max(ts))
        choice = inter.solve_stages(6, 4, cost, microbatches=[2], sizes=[4 // stages], num_stages=[stages],
                                    uniform=True, equal_share=share)
        assert choice.step_seconds == pytest.approx(best, rel=1e-12)
        assert all(sum(share[s.start:s.end]) == 4 // stages for s in choice.stages)
    with pytest.raises(ValueError, match="no pipeline plan fits"):
        inter.solve_stages(6, 3, cost, microbatches=[2], sizes=[1], num_stages=[3], uniform=True, equal_share=share)


def test_more_stages_than_layers():
    cost = _synthetic(0, [1], [1])
    with pytest.raises(ValueError, match="7 pipeline stages requested but the model has only 6 layers"):
        inter.solve_stages(6, 7, cost, microbatches=[1], sizes=[1], num_stages=[7])


def _tiny_gpt_costs(cluster="a100-8x"):
    import jax

    import autoplan
    from autoplan._src import trace

    spec = autoplan.models.get("gpt-tiny", layers=4, hidden=32, seq_len=8, vocab_size=64)
    params, opt_state = spec.abstract_state()

    def trace_at(b):
        batch = {k: jax.ShapeDtypeStruct((v.shape[0] // b, *v.shape[1:]), v.dtype)
                 for k, v in spec.abstract_batch().items()}
        return trace.trace(spec.train_step, params, opt_state, batch)

    return trace_at, C.get_cluster(cluster)


def test_dp_equals_brute_force_on_ilp_costs():
    trace_at, cluster = _tiny_gpt_costs()
    cost = inter.GraphStageCosts(trace_at, cluster)
    units = cost.units(2)
    assert units[0] == ("wte", "wpe", "block0") and units[-1] == ("ln_f", "head") and len(units) == 5
    sizes = [1, 2]
    choice = inter.solve_stages(len(units), 2, cost, microbatches=[2], sizes=sizes, schedule="1f1b")
    solves = cost.solves
    assert choice.step_seconds == pytest.approx(
        _brute_force(len(units), 2, cost, sizes, [2], "1f1b", math.inf), rel=1e-12)
    # Identical layer ranges were solved once: blocks 1, 2 (and 1-2, 2-3) share their solves.
    assert solves < sum(len(inter.logical_meshes(d)) for d in sizes) * len(units) * (len(units) + 1) // 2
    # The prediction is the cost model's evaluation of the chosen plan, each stage solved afresh.
    fresh = inter.GraphStageCosts(trace_at, cluster)
    ts = [min(o.seconds for o in fresh(s.start, s.end, s.devices, 2) if o.mesh == s.mesh) for s in choice.stages]
    assert choice.step_seconds == pytest.approx(inter.pipeline_seconds(ts, 2), rel=1e-9)


# -- autoplan.plan(stages=, microbatches=, schedule=) -----------------------------------------------


def _tiny_step():
    import autoplan

    spec = autoplan.models.get("gpt-tiny", layers=4, hidden=32, seq_len=8, vocab_size=64)
    params, opt_state = spec.abstract_state()
    return spec.train_step, (params, opt_state, spec.abstract_batch())


def test_plan_with_pinned_pipeline(tmp_path):
    import autoplan

    step, args = _tiny_step()
    plan = autoplan.plan(step, *args, num_devices=4, cluster="a100-8x", stages=2, microbatches=2,
                         schedule="1f1b")
    assert len(plan.stages) == 2 and plan.microbatches == 2 and plan.schedule == "1f1b"
    assert plan.mesh.as_dict() == {"stage": 2, **plan.stages[0].mesh.as_dict()}
    assert [s.in_flight for s in plan.stages] == [2, 1]  # 1F1B: S - s microbatches alive on stage s
    assert plan.stages[0].layers[0] == "wte+wpe+block0" and plan.stages[-1].layers[-1] == "ln_f+head"
    t = [s.seconds for s in plan.stages]
    # Each stage updates its own weights from its own gradients (Adam): nothing else crosses stages.
    ticks, sends = _lockstep_reference(plan)
    parts = plan.solver["pipeline_seconds"]
    assert {key: parts[key] for key in ("ticks", "sends", "exchange")} == pytest.approx(
        {"ticks": ticks, "sends": sends, "exchange": 0.0}, rel=1e-12)
    _assert_update_priced(plan)
    assert plan.cost.step_seconds == pytest.approx(sum(parts.values()), rel=1e-12)
    assert plan.bubble_fraction == pytest.approx(1 - 2 * sum(t) / (2 * plan.cost.step_seconds))
    text = plan.summary()
    assert "pipeline: 2 stage(s), schedule 1f1b, 2 microbatches, bubble" in text and "stage 1: layers" in text
    # Each stage row keeps its own weights and Adam moments; only Adam's step count is on every row.
    assert [leaf.stage for leaf in plan.inputs if leaf.path.startswith("params/block0/")] == [0] * 12
    assert {leaf.stage for leaf in plan.inputs if leaf.path.startswith("params/ln_f/")} == {1}
    assert [leaf.path for leaf in plan.inputs if leaf.stage is None and leaf.path.startswith("opt_state")] == \
        [leaf.path for leaf in plan.inputs if leaf.path.endswith("count")]
    assert "state kept per stage row (parameters, optimizer state): stage 0 " in text
    plan.save(str(tmp_path / "plan.json"))
    loaded = autoplan.load_plan(str(tmp_path / "plan.json"))
    assert loaded == plan and loaded.stages == plan.stages and loaded.microbatches == 2


def test_interleaved_plan_says_which_chunks_each_stage_row_runs(tmp_path):
    """Interleaved 1F1B: each of 2 stage rows runs 2 chunks of equal layers (row s: chunks s and s + 2),
    the plan lists them, and the runtime runs exactly those ranges.  The step is priced as the runtime
    runs it (ticks in lock step, each as long as its slowest row's task): no shorter than the busiest
    row's own work (B microbatches through its chunks, forward and backward: B t_max) and than
    Megatron's interleaved step (B + (S - 1) / v) t_max, no longer than every tick at the slowest row."""
    import autoplan
    from autoplan._src import pipeline as PL
    from autoplan._src import staging

    step, args = _tiny_step()
    plan = autoplan.plan(step, *args, num_devices=4, cluster="a100-8x", stages=2, microbatches=4,
                         schedule="interleaved")
    units = 5  # wte+wpe+block0, block1, block2, block3, ln_f+head
    assert [s.chunks for s in plan.stages] == [tuple(PL.even_bounds(units, 4)[s::2]) for s in range(2)] \
        == [((0, 2), (3, 4)), ((2, 3), (4, 5))]
    assert plan.stages[0].layers == ("wte+wpe+block0", "block1", "block3")
    t = max(s.seconds for s in plan.stages)
    parts = plan.solver["pipeline_seconds"]
    assert plan.cost.step_seconds == pytest.approx(sum(parts.values()), rel=1e-12)
    _assert_update_priced(plan)
    ticks = PL.schedule("interleaved", stages=2, microbatches=4).num_ticks
    assert max(4 * t, (4 + (2 - 1) / 2) * t) <= parts["ticks"] * (1 + 1e-12)
    assert parts["ticks"] <= ticks * t
    assert plan.bubble_fraction == pytest.approx(1 - 4 * sum(s.seconds for s in plan.stages) /
                                                 (2 * plan.cost.step_seconds))
    assert "stage 0: layers 0..1 + 3..3 (wte+wpe+block0, block1, block3)" in plan.summary()
    assert staging.plan_bounds(plan.stages, plan.schedule) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    plan.save(str(tmp_path / "plan.json"))
    assert autoplan.load_plan(str(tmp_path / "plan.json")).stages == plan.stages
    with pytest.raises(ValueError, match="do not fill 8 chunks"):
        autoplan.plan(step, *args, num_devices=4, cluster="a100-8x", stages=4, microbatches=4,
                      schedule="interleaved")


def test_pinned_pipeline_prices_the_exchange_global_norm_clipping_needs():
    """Under optax.clip_by_global_norm every stage's update reads every gradient: the plan adds one
    all-reduce over the stage axis of all of them (float32, elements counted from the parameter tree)."""
    import dataclasses

    import jax
    import optax

    import autoplan
    from autoplan._src import cluster as C

    spec = autoplan.models.get("gpt-tiny", layers=4, hidden=32, seq_len=8, vocab_size=64)
    spec = dataclasses.replace(spec, optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    params, opt_state = spec.abstract_state()
    plan = autoplan.plan(spec.train_step, params, opt_state, spec.abstract_batch(), num_devices=4,
                         cluster="a100-8x", stages=2, microbatches=2)
    elements = sum(leaf.size for leaf in jax.tree.leaves(params))
    exchange = C.collective_seconds("all-reduce", 4 * elements, ("stage",), plan.mesh, C.get_cluster("a100-8x"))
    ticks, sends = _lockstep_reference(plan)
    parts = plan.solver["pipeline_seconds"]
    # The copies around each tick are checked against the compiled tick loops in test_staging.
    assert plan.cost.step_seconds == pytest.approx(ticks + sends + exchange + parts["update"] + parts["accumulate"]
                                                   + parts["copies"], rel=1e-12)
    _assert_update_priced(plan)


def _lockstep_reference(plan):
    """(ticks, sends) of a pipelined plan's step as the SPMD runtime runs it, from its schedule's task
    table: every tick lasts as long as its slowest row's task (a forward is a third of the stage's
    forward + backward, a backward the rest: the forward's residuals are kept, not recomputed), and each
    tick and direction the runtime moves a buffer on pays one latency, within a node here."""
    from autoplan._src import pipeline as PL

    sched = PL.schedule(plan.schedule, stages=len(plan.stages), microbatches=plan.microbatches)
    seconds = [s.seconds for s in plan.stages]
    longest: dict[int, float] = {}
    for task in sched.tasks:
        cost = seconds[task.stage] / 3 if task.kind == PL.FORWARD else seconds[task.stage] * 2 / 3
        longest[task.tick] = max(longest.get(task.tick, 0.0), cost)
    assert len(longest) <= sched.num_ticks
    cluster = plan.cluster
    sends = int(PL.send_directions(sched).sum())
    return sum(longest.values()), sends * cluster.latency + plan.solver["p2p_bytes"] / cluster.intra_node_bandwidth


def _assert_update_priced(plan):
    """The plan's update and accumulation are `_update_reference`'s.  The stage DP counts a range's leaves
    by layer and the reference by home: Adam's step count (4 bytes, kept on every row) is in the DP's
    update only."""
    parts = plan.solver["pipeline_seconds"]
    update, accumulate = _update_reference(plan)
    assert parts["accumulate"] == pytest.approx(accumulate, rel=1e-12)
    assert parts["update"] == pytest.approx(update + 2 * 4 / plan.cluster.memory_bandwidth, rel=1e-9)


def _update_reference(plan):
    """(update, accumulate) seconds of a pipelined plan whose stages keep their weights whole, from the
    leaves each stage row keeps: the update reads and writes a row's parameters and optimizer state and
    reads its gradients (the size of its parameters), rows in parallel; each tick of the schedule
    writes a contribution the size of a row's parameters (float32 here), reads it and the sums and
    writes the sums."""
    from autoplan._src import pipeline as PL

    sched = PL.schedule(plan.schedule, stages=len(plan.stages), microbatches=plan.microbatches)
    bandwidth = plan.cluster.memory_bandwidth
    state = [sum(leaf.nbytes for leaf in plan.inputs if leaf.stage == row) for row in range(len(plan.stages))]
    params = [sum(leaf.nbytes for leaf in plan.inputs if leaf.stage == row and leaf.path.startswith("params/"))
              for row in range(len(plan.stages))]
    chunk = max(params)
    if any(stage.chunks for stage in plan.stages):  # the runtime's sums are as long as the longest chunk's
        chunk = 0
        for stage in plan.stages:
            names = iter(stage.layers)
            for start, end in stage.chunks:
                layers = {part for _ in range(end - start) for part in next(names).split("+")}
                chunk = max(chunk, sum(leaf.nbytes for leaf in plan.inputs if leaf.path.startswith("params/")
                                       and leaf.path.split("/")[1] in layers))
    return (max(2 * (s + p) for s, p in zip(state, params)) / bandwidth,
            sched.num_ticks * 4 * chunk / bandwidth)


def test_plan_pipeline_bad_input():
    import jax

    import autoplan
    from autoplan._src import pipeline

    step, args = _tiny_step()
    with pytest.raises(ValueError, match="8 pipeline stages requested but the model has only 5 layers"):
        autoplan.plan(step, *args, num_devices=8, stages=8, microbatches=1)
    with pytest.raises(ValueError, match="no 'stage' axis, but stages=2 forces a pipeline; add a leading 'stage'"):
        autoplan.plan(step, *args, mesh=jax.sharding.AbstractMesh((2, 2), ("data", "model")), stages=2)
    with pytest.raises(pipeline.MicrobatchError, match="'batch/tokens' has 8 examples, which do not split into 3"):
        autoplan.plan(step, *args, num_devices=2, microbatches=3)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        autoplan.plan(step, *args, num_devices=2, schedule="zb")


def test_pipelines_across_slow_nodes_only():
    """4 devices in nodes of 2, inter-node links 100x slower or equal, a GPT whose block weights (4 x
    d=256: 12.6 MB, 50 MB with Adam) make data parallelism across nodes costly, on slow devices (2.5 TF/s)
    so compute is not negligible.  With slow links the planner pipelines across the nodes (each stage
    keeps and updates its own weights, so only activations cross); with equal links it does not.  Either
    way the choice is the cheapest of the alternatives it prints, and one-stage and two-stage plans are
    both among them.  The schedule is the planner's: in lock step GPipe's forward ticks wait only for
    forwards, so it beats 1F1B here (whose pipelines are among the alternatives, dearer)."""
    import autoplan

    spec = autoplan.models.get("gpt-tiny", layers=4, hidden=256, seq_len=32, vocab_size=512, batch=64)
    params, opt_state = spec.abstract_state()
    chosen = {}
    for name, inter_bw in (("slow", 3e9), ("equal", 300e9)):
        cluster = autoplan.Cluster(name=name, device_flops=2.5e12, device_memory=80e9, devices_per_node=2,
                                   intra_node_bandwidth=300e9, inter_node_bandwidth=inter_bw, latency=10e-6)
        plan = autoplan.plan(spec.train_step, params, opt_state, spec.abstract_batch(), num_devices=4,
                             cluster=cluster, microbatches=4)
        assert plan.alternatives and all(a.step_seconds >= plan.cost.step_seconds for a in plan.alternatives)
        assert {len(a.stages) for a in plan.alternatives} | {len(plan.stages)} >= {1, 2}
        # The runtime runs several stages data parallel only: no tensor-parallel stage is offered.
        assert all(s.mesh.axis_size("model") == 1 for c in (plan, *plan.alternatives) if len(c.stages) > 1
                   for s in c.stages)
        chosen[name] = plan
    assert len(chosen["slow"].stages) == 2 and chosen["slow"].mesh.axis_sizes[0] == 2
    assert chosen["slow"].schedule == "gpipe"
    assert {a.schedule for a in chosen["slow"].alternatives if len(a.stages) > 1} == {"gpipe", "1f1b"}
    assert len(chosen["equal"].stages) == 1
