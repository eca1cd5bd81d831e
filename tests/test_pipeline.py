"""Pipeline schedules against their published definitions, and the pipeline runtimes against jax.jit."""

import itertools
import re

import pytest

from autoplan._src import pipeline as pl

CASES = [("gpipe", s, b, 1) for s, b in itertools.product((1, 2, 3, 4), (1, 2, 4, 8))] + \
        [("1f1b", s, b, 1) for s, b in itertools.product((1, 2, 3, 4), (1, 2, 4, 8))] + \
        [("interleaved", s, b, v) for s, b, v in itertools.product((2, 4), (4, 8), (2, 3, 4)) if b % s == 0]


def _schedule(name, stages, microbatches, virtual):
    return pl.schedule(name, stages=stages, microbatches=microbatches, virtual=virtual if virtual > 1 else 2)


@pytest.mark.parametrize("name,stages,microbatches,virtual", CASES)
def test_bubble_matches_published_formula(name, stages, microbatches, virtual):
    # GPipe / 1F1B: (S-1)/(B+S-1) (GPipe paper; PipeDream-Flush has the same bubble);
    # interleaved: Megatron-LM SC'21 eq. for bubble time (p-1)/(v m) of ideal = (S-1)/(vB+S-1) of the step.
    s = _schedule(name, stages, microbatches, virtual)
    assert s.bubble_fraction == pytest.approx((stages - 1) / (s.virtual * microbatches + stages - 1), abs=1e-12)
    assert s.bubble_fraction == pytest.approx(pl.bubble_formula(name, stages, microbatches, s.virtual), abs=1e-12)


@pytest.mark.parametrize("name,stages,microbatches,virtual", CASES)
def test_table_is_a_valid_pipeline(name, stages, microbatches, virtual):
    s = _schedule(name, stages, microbatches, virtual)
    at = {(t.kind, t.microbatch, t.chunk * stages + t.stage): t.tick for t in s.tasks}
    last = stages * s.virtual - 1
    # Every (virtual stage, microbatch) runs F once and B once.
    assert len(s.tasks) == 2 * stages * s.virtual * microbatches == len(at)
    for m in range(microbatches):
        for vs in range(last + 1):
            assert at[("F", m, vs)] < at[("B", m, vs)]  # F before B
            if vs > 0:
                assert at[("F", m, vs - 1)] < at[("F", m, vs)]  # activations flow forward
            if vs < last:
                assert at[("B", m, vs + 1)] < at[("B", m, vs)]  # cotangents flow backward
    # One task per stage per tick.
    assert len({(t.stage, t.tick) for t in s.tasks}) == len(s.tasks)


@pytest.mark.parametrize("stages,microbatches", [(2, 4), (4, 4), (4, 8), (3, 7)])
def test_activations_in_flight(stages, microbatches):
    gpipe = pl.schedule("gpipe", stages=stages, microbatches=microbatches)
    one_f = pl.schedule("1f1b", stages=stages, microbatches=microbatches)
    for s in range(stages):
        assert gpipe.in_flight(s) == microbatches
        assert one_f.in_flight(s) == min(stages - s, microbatches)


def test_schedule_prints(capsys):
    s = pl.schedule("interleaved", stages=2, microbatches=4, virtual=2)
    print(s)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "interleaved: 2 stages, 4 microbatches, 2 chunks per stage, 18 ticks, bubble 11.1%"
    assert out.splitlines()[1].split()[3:7] == ["F0a", "F1a", "F0b", "F1b"]  # chunk a of mb 0, 1 then chunk b


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        pl.schedule("zb", stages=2, microbatches=2)
    with pytest.raises(ValueError, match="not a multiple of 4 stages"):
        pl.schedule("interleaved", stages=4, microbatches=6)


# -- gradient accumulation ----------------------------------------------------------------------

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import autoplan  # noqa: E402
from autoplan._src import hlo  # noqa: E402


def _gpt(**overrides):
    spec = autoplan.models.get("gpt-tiny", **overrides)
    return dataclasses.replace(spec, optimizer=optax.adamw(1e-2, eps=1e-3, weight_decay=0.01))


def _run(step, params, opt_state, batches):
    losses = []
    for batch in batches:
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
    return params, opt_state, losses


def _assert_same(a, b, rtol, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_accumulation_equals_full_batch_gpt_tiny():
    spec = _gpt()
    params, opt_state = spec.init(jax.random.key(0))
    batches = [spec.make_batch(jax.random.key(i)) for i in range(3)]
    ref = _run(jax.jit(spec.train_step), params, opt_state, batches)
    acc = _run(jax.jit(pl.accumulate(spec.train_step, microbatches=4)), params, opt_state, batches)
    np.testing.assert_allclose(np.asarray(acc[2]), np.asarray(ref[2]), rtol=2e-6)
    _assert_same(acc[0], ref[0], rtol=1e-5, atol=1e-6)
    _assert_same(acc[1], ref[1], rtol=1e-5, atol=1e-6)
    # Not vacuous: the parameters moved, and one microbatch alone gives a different loss.
    assert not np.allclose(ref[0]["head"]["kernel"], params["head"]["kernel"])
    first = jax.tree_util.tree_map(lambda x: x[:2], batches[0])
    assert abs(float(spec.loss(params, first)) - float(ref[2][0])) > 1e-4


def test_data_parallel_accumulation_equals_full_batch_and_reduces_once_per_step():
    """DDP-style accumulation: each of 8 replicas loops over its share of 2 microbatches; numerics equal
    jax.jit's and the compiled program reduces the gradients (and the loss) once per step, where plain
    accumulation under jax.jit all-reduces them in every loop iteration."""
    from autoplan._src import hlo

    spec = _gpt(batch=16)
    params, opt_state = spec.init(jax.random.key(0))
    batches = [spec.make_batch(jax.random.key(i)) for i in range(3)]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    accumulated = pl.Accumulated(spec.train_step, 2, -1, mesh=mesh, data_axes=("data",))
    ref = _run(jax.jit(spec.train_step), params, opt_state, batches)
    acc = _run(jax.jit(accumulated), params, opt_state, batches)
    np.testing.assert_allclose(np.asarray(acc[2]), np.asarray(ref[2]), rtol=2e-6)
    _assert_same(acc[0], ref[0], rtol=1e-5, atol=1e-6)
    collectives = hlo.collectives(jax.jit(accumulated).lower(params, opt_state, batches[0]).compile(), mesh)
    assert {(c.kind, c.axes, c.repeats) for c in collectives} == {("all-reduce", ("data",), 1)}
    assert sum(c.nbytes for c in collectives) == 4 * (sum(x.size for x in jax.tree_util.tree_leaves(params)) + 1)


def test_accumulation_splits_one_scan_over_microbatches():
    spec = _gpt()
    params, opt_state = spec.init(jax.random.key(0))
    batch = spec.make_batch(jax.random.key(1))
    text = jax.jit(pl.accumulate(spec.train_step, microbatches=4)).lower(params, opt_state, batch).as_text()
    assert "while" in text or "scan" in text
    split = pl.accumulate(spec.train_step, microbatches=4).split(params, opt_state, batch)
    # One cut value per parameter gradient plus the loss.
    assert len(split.cut) == len(jax.tree_util.tree_leaves(params)) + 1


def test_batch_norm_is_refused_with_op_and_line():
    def step(w, batch):
        def loss(w):
            h = batch["x"] @ w
            h = (h - h.mean(axis=0)) / (h.std(axis=0) + 1e-5)  # batch norm: statistics over examples
            return (h ** 2).mean()
        value, g = jax.value_and_grad(loss)(w)
        return w - 0.1 * g, value

    w, batch = jnp.ones((4, 4)), {"x": jnp.ones((8, 4))}
    with pytest.raises(pl.MicrobatchError, match=r"sub at .*test_pipeline.py:\d+.*batch norm"):
        pl.accumulate(step, microbatches=2)(w, batch)


def test_layer_norm_and_mean_loss_are_accepted():
    def step(w, batch):
        def loss(w):
            h = batch["x"] @ w
            h = (h - h.mean(axis=-1, keepdims=True))  # per example: fine
            return (h ** 2).mean()
        value, g = jax.value_and_grad(loss)(w)
        return w - 0.1 * g, value

    w, batch = jnp.arange(16.0).reshape(4, 4) / 16, {"x": jnp.arange(32.0).reshape(8, 4) / 8}
    _assert_same(pl.accumulate(step, microbatches=2)(w, batch), step(w, batch), rtol=1e-6, atol=1e-7)


def test_batch_not_divisible_into_microbatches():
    spec = _gpt()
    params, opt_state = spec.abstract_state()
    with pytest.raises(pl.MicrobatchError, match=r"'batch/tokens' has 8 examples, which do not split into 3 .*"
                                                 r"\[1, 2, 4, 8\]"):
        pl.accumulate(spec.train_step, microbatches=3).split(params, opt_state, spec.abstract_batch())


# -- the SPMD pipeline runtime ------------------------------------------------------------------


def _auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.mark.parametrize("name,stages,microbatches,virtual", [
    ("1f1b", 2, 4, 1), ("gpipe", 4, 4, 1), ("interleaved", 2, 4, 2)])
def test_pipelined_gpt_equals_single_device(name, stages, microbatches, virtual):
    spec = _gpt(layers=8, hidden=32, seq_len=8, vocab_size=64)
    params, opt_state = spec.init(jax.random.key(0))
    batches = [spec.make_batch(jax.random.key(i)) for i in range(3)]
    ref_params, _, ref_losses = _run(jax.jit(spec.train_step), params, opt_state, batches)

    schedule = pl.schedule(name, stages=stages, microbatches=microbatches, virtual=virtual)
    pipe = pl.Pipeline.even(pl.gpt_layers(spec), schedule)
    mesh = _auto_mesh((stages, 8 // stages), ("stage", "data"))
    packed = pipe.pack(params)
    assert packed.shape[:2] == (stages, schedule.virtual)
    opt = spec.optimizer.init(packed)
    step = jax.jit(pipe.train_step(spec.optimizer, mesh, params, batches[0])).lower(packed, opt, batches[0]).compile()
    packed, _, losses = _run(step, packed, opt, batches)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=1e-6)
    _assert_same(pipe.unpack(packed), ref_params, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref_params["block7"]["mlp_out"]["kernel"], params["block7"]["mlp_out"]["kernel"])
    # Honest traffic: the compiled program's collective-permute bytes per step (loop bodies x XLA's
    # known_trip_count) are what the pipeline predicts; a buffer moves only on the ticks that carry one.
    trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', step.as_text())]
    assert 0 < sum(trips) <= schedule.num_ticks  # one loop per run of alike ticks (a 1-tick one is inlined)
    permutes = [c for c in hlo.collectives(step, mesh) if c.kind == "collective-permute"]
    assert permutes and sum(c.repeats for c in permutes) == pl.send_directions(schedule).sum()
    sent = sum(c.nbytes * c.repeats for c in permutes)
    assert sent == pytest.approx(pipe.p2p_bytes(params, batches[0]), rel=0.2)


def test_pipeline_bad_input():
    spec = _gpt(layers=2, hidden=32, seq_len=8, vocab_size=64)
    layers = pl.gpt_layers(spec)
    with pytest.raises(ValueError, match="8 pipeline stages .* only 4 layers; use at most 4 stages"):
        pl.Pipeline.even(layers, pl.schedule("gpipe", stages=8, microbatches=2))
    pipe = pl.Pipeline.even(layers, pl.schedule("gpipe", stages=2, microbatches=3))
    params, _ = spec.abstract_state()
    with pytest.raises(ValueError, match="'stage' mesh axis of size 2"):
        pipe.gradients(_auto_mesh((2, 4), ("data", "model")), params, spec.abstract_batch())
    with pytest.raises(pl.MicrobatchError, match="8 examples does not split into 3 microbatches"):
        pipe.gradients(_auto_mesh((2, 4), ("stage", "data")), params, spec.abstract_batch())


# -- autoparallel(microbatches=, stages=) ----------------------------------------------------------


def test_one_stage_microbatched_plan_loops_data_parallel_in_the_plans_layouts():
    """`autoparallel(microbatches=2, stages=1)` with links slow enough that reducing the gradients every
    microbatch (the loop left to XLA) costs more than once: the loop runs data parallel over both axes
    (each device its share of every microbatch, the sums all-reduced once after the loop) in the plan's
    layouts: numerics equal jax.jit, and the compiled program reduces the gradients and the loss once
    per step, nothing inside the loop."""
    spec = _gpt(layers=2, hidden=32, seq_len=16, vocab_size=64, batch=16)
    params, opt_state = spec.init(jax.random.key(0))
    batches = [spec.make_batch(jax.random.key(i)) for i in range(3)]
    cluster = autoplan.Cluster(name="slow-links", device_flops=1e10, device_memory=80e9, devices_per_node=8,
                               intra_node_bandwidth=1e9, inter_node_bandwidth=1e9, latency=1e-6)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    step = autoplan.autoparallel(spec.train_step, mesh=mesh, cluster=cluster, microbatches=2, stages=1,
                                 donate=False)
    ref = _run(jax.jit(spec.train_step), params, opt_state, batches)
    got = _run(step, params, opt_state, batches)
    plan = step.plan
    assert plan.microbatches == 2 and len(plan.stages) == 1
    assert plan.data_axes == ("data", "model") and "data parallel over data x model" in plan.summary()
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), rtol=2e-6)
    _assert_same(got[0], ref[0], rtol=1e-5, atol=1e-6)
    collectives = hlo.collectives(step.lower(params, opt_state, batches[0]).compile(), mesh)
    assert collectives and all(c.repeats == 1 for c in collectives)
    reduced = sum(c.nbytes for c in collectives if c.kind == "all-reduce")
    assert reduced == 4 * (sum(x.size for x in jax.tree_util.tree_leaves(params)) + 1)
    # Its step pays what the stage DP leaves out: summing 2 microbatches' gradients and the update, at
    # memory bandwidth.  Every data-parallel replica sums the whole model's float32 gradients (they are
    # averaged once, after the loop): a read and a write of all of them per microbatch.
    parts = plan.solver["pipeline_seconds"]
    assert set(parts) == {"stage", "update", "accumulate"} and plan.cost.step_seconds == pytest.approx(
        sum(parts.values()), rel=1e-12)
    whole = 4 * sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert parts["accumulate"] == pytest.approx(2 * 2 * whole / cluster.memory_bandwidth, rel=1e-6)


def test_one_stage_loop_left_to_xla_reduces_every_microbatch_as_priced():
    """With fast links and slow devices the planner leaves the loop to XLA (its plan shards the update 8
    ways; reducing 2 microbatches' gradients costs less than the replicated update of a data-parallel
    loop).  XLA then reduce-scatters every microbatch's gradients inside the loop, and the plan prices
    them so: its communication is the compiled program's (reduce-scatters as a GPU runs them; the CPU
    writes all-reduce + slice) within 2%, its step within 3%."""
    spec = _gpt(layers=2, hidden=32, seq_len=16, vocab_size=64, batch=16)
    params, opt_state = spec.abstract_state()
    cluster = autoplan.Cluster(name="slow-device", device_flops=1e10, device_memory=80e9, devices_per_node=8,
                               intra_node_bandwidth=300e9, inter_node_bandwidth=300e9, latency=1e-6)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    step = autoplan.autoparallel(spec.train_step, mesh=mesh, cluster=cluster, microbatches=2, stages=1,
                                 donate=False)
    compiled = step.lower(params, opt_state, spec.abstract_batch()).compile()
    report = hlo.compiled_report(compiled, mesh, cluster)
    gpu = hlo.with_reduce_scatters(report, hlo.sliced_all_reduces(compiled, report.collectives), mesh, cluster)
    plan = step.plan
    assert plan.data_axes == () and any(c.repeats == 2 for c in report.collectives)
    assert "the microbatch loop is left to XLA" in plan.summary()
    assert plan.cost.communication_bytes == pytest.approx(gpu.communication_bytes, rel=0.02)
    assert plan.cost.step_seconds == pytest.approx(gpu.step_seconds, rel=0.03)


def test_one_stage_loop_is_planned_with_its_update_and_sends_what_it_predicts():
    """A one-stage loop over 4 microbatches on a 2x4 mesh whose 'data' axis crosses slow links: the
    planner plans the step at microbatch size with its update and picks the loop as it runs it (left to
    XLA, or data parallel over some axes with the summed gradients all-reduced once after the loop;
    `GraphStageCosts._looped_option`).  Here it runs data parallel over the in-node 'model' axis, and
    the compiled program's collectives are the plan's, byte for byte, none of them inside the loop.
    (Looping in the full-batch plan's layouts, this program all-reduced over 'data' inside the loop,
    every microbatch; on gpt-small that plan split the head's vocabulary over 'model', so its loop could
    not run data parallel and XLA reduced all gradients every microbatch, unpriced.)"""
    spec = _gpt(layers=2, hidden=64, seq_len=128, vocab_size=16384, batch=32)
    params, opt_state = spec.abstract_state()
    batch = spec.abstract_batch()
    cluster = autoplan.Cluster(name="slow-link", device_flops=312e12, device_memory=80e9, devices_per_node=4,
                               intra_node_bandwidth=300e9, inter_node_bandwidth=3e9, latency=10e-6)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    step = autoplan.autoparallel(spec.train_step, mesh=mesh, cluster=cluster, microbatches=4, stages=1,
                                 donate=False)
    report = hlo.compiled_report(step.lower(params, opt_state, batch).compile(), mesh, cluster)
    plan = step.plan
    assert plan.data_axes == ("model",) and plan.solver["pipeline_seconds"]["update"] == 0.0
    assert report.collectives and all(c.repeats == 1 and c.axes == ("model",) for c in report.collectives)
    assert plan.cost.communication_bytes == pytest.approx(report.communication_bytes, rel=1e-4)
    after_loop = [c for c in plan.collectives if c.where == "<after the microbatch loop>"]
    gradients = 4 * sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert len(after_loop) == 1 and after_loop[0].nbytes == gradients


def test_pipeline_bounds_from_plan_stages():
    spec = _gpt(layers=4, hidden=32, seq_len=8, vocab_size=64)
    layers = pl.gpt_layers(spec)
    # Stage layer names as the inter-operator pass writes them (plan.stages[i].layers).
    bounds = pl.bounds_from_stages(layers, [("wte+wpe+block0", "block1"), ("block2",), ("block3", "ln_f+head")])
    assert bounds == [(0, 3), (3, 4), (4, 6)]
    with pytest.raises(ValueError, match="contiguous"):
        pl.bounds_from_stages(layers, [("wte+wpe+block0", "block2"), ("block1", "block3", "ln_f+head")])
