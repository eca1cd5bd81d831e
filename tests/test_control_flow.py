"""Control flow as structure: scan / while / cond bodies planned once, re-emitted as loops and branches."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autoplan
from autoplan._src import emit as E
from autoplan._src import trace as T
from autoplan.models import gpt

import scanned_gpt

MESH = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
CLUSTER = "a100-8x"
# The GPTs below are scanned_gpt's, narrower (same 4 layers, 4 heads, vocabulary): how the blocks are
# stacked, or what wraps the optimizer or the loss, is a question of the graph's structure, not its width,
# and the plans solve in seconds instead of ~20 s each.  At this size too, scan and loop price within 0.2%,
# remat adds 6%, and remat's compiled temporaries are less than half of scan's.
SMALL_GPT = dataclasses.replace(scanned_gpt.CONFIG, hidden=64, seq_len=16, batch=8)


def _plan(step, *args, mesh=MESH):
    return autoplan.plan(step, *args, mesh=mesh, cluster=CLUSTER)


def _emit(plan, step, *args):
    return E.emit(plan, T.trace(step, *args))


# ---------------------------------------------------------------------------
# The graph: one body, repeated.


def test_scan_body_is_walked_once_and_repeated():
    def f(w, xs):
        def body(c, x):
            h = jnp.tanh(c @ w + x)
            return h, h.sum()
        c, ys = jax.lax.scan(body, xs[0], xs)
        return c.sum() + ys.sum()

    graph = T.trace(f, jnp.ones((8, 8)), jnp.ones((5, 4, 8)))
    dots = [op for op in graph.ops if op.primitive == "dot_general"]
    assert len(dots) == 1 and dots[0].repeat == 5 and dots[0].key.startswith("2/body/")
    kinds = sorted(op.params["kind"] for op in graph.ops if op.primitive in ("loop_in", "loop_out"))
    assert kinds == ["carry", "carry", "const", "xs", "ys"]
    (enter, leave), = graph.ties
    assert graph.ops[enter].params["kind"] == graph.ops[leave].params["kind"] == "carry"
    assert len({op.key for op in graph.ops if op.key}) == len([op for op in graph.ops if op.key])


def test_while_trip_count_seen_or_defaulted_with_a_warning():
    def counted(x):
        return jax.lax.while_loop(lambda c: c[0] < 6, lambda c: (c[0] + 1, jnp.sin(c[1])), (0, x))[1]

    graph = T.trace(counted, jnp.ones((8,)))
    assert {op.repeat for op in graph.ops if op.primitive == "sin"} == {6}

    def dynamic(x):
        return jax.lax.while_loop(lambda c: c.sum() < 100.0, lambda c: c * 2, x)

    with pytest.warns(T.DynamicTripCountWarning, match=r"test_control_flow.py:\d+.*Pass trip_count="):
        graph = T.trace(dynamic, jnp.ones((8,)))
    assert {op.repeat for op in graph.ops if op.primitive == "mul"} == {T.DEFAULT_WHILE_TRIP_COUNT}

    # The trip_count= hint: no warning, and the body is priced that many times.
    def dynamic_matmul(w, x):
        return jax.lax.while_loop(lambda c: c.sum() < 100.0, lambda c: jnp.tanh(c @ w), x).sum()

    w, x = jax.ShapeDtypeStruct((512, 512), jnp.float32), jax.ShapeDtypeStruct((512, 512), jnp.float32)
    one_device = jax.sharding.AbstractMesh((1,), ("data",))  # nothing to split: compute is the body's times n
    compute = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", T.DynamicTripCountWarning)
        for count in (3, 6, 9):
            compute[count] = autoplan.plan(dynamic_matmul, w, x, mesh=one_device, cluster=CLUSTER,
                                           trip_count=count).cost.compute_seconds
    matmul = 2 * 512**3 / autoplan.clusters[CLUSTER].flops_for(("float32", "float32"), None)
    # Each 3 more trips add the same time: 3 matmuls and the tanh and test around them.
    assert compute[9] - compute[6] == pytest.approx(compute[6] - compute[3], rel=1e-9)
    assert 3 * matmul < compute[6] - compute[3] < 3 * 2 * matmul
    with pytest.raises(ValueError, match="trip_count must be a positive int"):
        autoplan.autoparallel(dynamic_matmul, trip_count=0)


def test_cond_plans_the_dearest_branch():
    def f(w, x):
        return jax.lax.cond(x.sum() > 0, lambda x: jnp.tanh(x @ w), lambda x: x * 2.0, x).sum()

    graph = T.trace(f, jnp.ones((16, 16)), jnp.ones((4, 16)))
    assert [op.key for op in graph.ops if op.primitive == "dot_general"] == ["3/branch1/0"]


# ---------------------------------------------------------------------------
# One GPT, three ways.


@functools.cache
def _variant(style):
    step, params, opt_state, batch = scanned_gpt.make(style, SMALL_GPT)
    plan = _plan(step, params, opt_state, batch)
    return step, (params, opt_state, batch), plan


def _per_layer_specs(plan, style):
    """{(param path below the block, layer): spec without the stacked axis}."""
    out = {}
    for leaf in plan.inputs:
        parts = leaf.path.split("/")
        if parts[0] != "params":
            continue
        if style == "loop" and parts[1].startswith("block"):
            out[("/".join(parts[2:]))] = out.get("/".join(parts[2:]), set()) | {leaf.spec}
        elif style != "loop" and parts[1] == "blocks":
            out[("/".join(parts[3:]))] = out.get("/".join(parts[3:]), set()) | {leaf.spec[1:]}
    return out


def test_three_ways_same_layer_specs_and_step_time():
    plans = {style: _variant(style)[2] for style in ("loop", "scan", "remat_scan")}
    loop = _per_layer_specs(plans["loop"], "loop")
    assert all(len(specs) == 1 for specs in loop.values()), loop  # equal layers, equal specs
    for style in ("scan", "remat_scan"):
        assert _per_layer_specs(plans[style], style) == loop, style
        for leaf in plans[style].inputs:
            if "/blocks/" in leaf.path:
                assert leaf.spec[0] == (), leaf  # the stacked axis stays whole
    t = {style: p.cost.step_seconds for style, p in plans.items()}
    assert t["scan"] == pytest.approx(t["loop"], rel=0.02)
    # Remat adds the recomputed forward pass (and its collectives): more, but less than a second forward
    # and backward (the forward is about a third of a step).
    assert t["scan"] < t["remat_scan"] < 1.5 * t["scan"]


@pytest.mark.parametrize("style", ["loop", "scan", "remat_scan"])
def test_three_ways_numerics_match_single_device(style):
    step, args, plan = _variant(style)
    ref_losses, ref_params = scanned_gpt.run(jax.jit(step), *args)
    program = _emit(plan, step, *args)
    losses, params = scanned_gpt.run(program, *args)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_scanned_program_keeps_its_loop_and_remat_saves_memory():
    """The emitted scans compile to while loops; remat keeps its barriers and saves what jax.jit's saves."""
    temp, reference, barriers = {}, {}, {}
    for style in ("scan", "remat_scan"):
        step, args, plan = _variant(style)
        lowered = _emit(plan, step, *args).lower(*args)
        compiled = lowered.compile()
        text = compiled.as_text()
        assert "while(" in text and '"known_trip_count":{"n":"4"}' in text
        ref_lowered = jax.jit(step).lower(*args)
        barriers[style] = lowered.as_text().count("optimization_barrier")
        assert barriers[style] == ref_lowered.as_text().count("optimization_barrier")
        temp[style] = compiled.memory_analysis().temp_size_in_bytes
        reference[style] = ref_lowered.compile().memory_analysis().temp_size_in_bytes
    assert (temp["remat_scan"] < temp["scan"]) == (reference["remat_scan"] < reference["scan"]), (temp, reference)
    assert temp["remat_scan"] < temp["scan"], (temp, reference)


# ---------------------------------------------------------------------------
# Gradient accumulation, optimizer wrappers and conds leave the plan alone.


def _mlp_loss(w, batch):
    h = jnp.tanh(batch["x"] @ w["w1"])
    return ((h @ w["w2"] - batch["y"]) ** 2).mean()


def test_scan_gradient_accumulation_splits_the_batch_inside_the_loop():
    # Planned at a size where compute dominates (abstract arrays); run at a small one.
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    w = {"w1": f32((512, 1024)), "w2": f32((1024, 8))}
    micro = {"x": f32((4, 16384, 512)), "y": f32((4, 16384, 8))}

    def accumulate(w, micro):
        def body(acc, mb):
            g = jax.grad(_mlp_loss)(w, mb)
            return jax.tree.map(jnp.add, acc, g), None
        grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, w), micro)
        return grads

    def one(w, mb):
        return jax.grad(_mlp_loss)(w, mb)

    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    plan = _plan(accumulate, w, micro, mesh=mesh)
    single = _plan(one, w, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro), mesh=mesh)
    graph = T.trace(accumulate, w, micro)
    dots = [op for op in graph.ops if op.primitive == "dot_general"]
    assert dots and all("/body/" in op.key and op.repeat == 4 for op in dots)
    results = {a.key: a.spec for a in plan.anchors if a.operand is None}
    forward = [op.key for op in dots if op.output_shapes[0][0] == 16384]
    assert forward and all(results[key][0] == ("data",) for key in forward), results
    assert plan.cost.compute_seconds == pytest.approx(4 * single.cost.compute_seconds, rel=0.02)
    w = {"w1": jnp.ones((64, 128)) * 0.01, "w2": jnp.ones((128, 8)) * 0.01}
    micro = {"x": jnp.ones((4, 256, 64)), "y": jnp.ones((4, 256, 8))}
    program = _emit(_plan(accumulate, w, micro, mesh=mesh), accumulate, w, micro)
    want = jax.jit(accumulate)(w, micro)
    for got, ref in zip(jax.tree_util.tree_leaves(program(w, micro)), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5)


def _gpt_param_specs(optimizer=None, loss_cond=False, config=SMALL_GPT):
    step, params, opt_state, batch = scanned_gpt.make("loop", config, optimizer=optimizer or scanned_gpt.OPTIMIZER,
                                                      abstract=True)
    if loss_cond:
        model = scanned_gpt.StackedGPT(config, "loop")

        def loss_fn(params, batch):
            loss = gpt.lm_loss(model.apply({"params": params}, *gpt.lm_inputs(batch)), batch)
            return jax.lax.cond(loss > 100.0, lambda l: l * 0.0, lambda l: l, loss)

        optimizer = scanned_gpt.OPTIMIZER

        def step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

    plan = _plan(step, params, opt_state, batch)
    return {leaf.path: leaf.spec for leaf in plan.inputs if leaf.path.startswith("params/")}


def test_multisteps_and_cond_in_the_loss_leave_the_plan_alone():
    # Wide enough (d=1024) that the plain plan splits weights: a replicated plan could not show a change.
    config = dataclasses.replace(scanned_gpt.CONFIG, hidden=1024, seq_len=128, batch=16)
    plain = _gpt_param_specs(config=config)
    assert sum(1 for spec in plain.values() if any(spec)) >= 16, plain
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoplan.UnsupportedPrimitiveWarning)
        multi = _gpt_param_specs(optimizer=optax.MultiSteps(scanned_gpt.OPTIMIZER, every_k_schedule=2), config=config)
        cond = _gpt_param_specs(loss_cond=True, config=config)
    assert cond == plain
    # MultiSteps adds its accumulation and a cond around the update: the planner still sees through
    # them and splits the weights.  Its plan need not be the plain step's: on this one-node mesh the
    # plain plan's layout is priced 0.15% dearer for the MultiSteps step than the plan it picks (which
    # splits the MLP over 'data' and keeps the attention output projections whole).
    assert multi.keys() == plain.keys()
    assert sum(1 for spec in multi.values() if any(spec)) >= 16, multi


def test_opaque_primitive_in_a_loop_body_warns_with_the_users_line():
    import inspect

    def f(w, xs):
        def body(c, x):
            y = jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(c.shape, c.dtype), c @ w)  # the line
            return y, None
        return jax.lax.scan(body, xs[0], xs)[0].sum()

    line = next(i for i, text in enumerate(inspect.getsourcelines(f)[0], inspect.getsourcelines(f)[1])
                if "# the line" in text)
    with pytest.warns(autoplan.UnsupportedPrimitiveWarning, match=rf"'pure_callback' \(at .*test_control_flow.py:{line} "):
        _plan(f, jnp.ones((8, 8)), jnp.ones((3, 4, 8)))


# ---------------------------------------------------------------------------
# Flax NNX: a stack made with nnx.vmap and run with nnx.scan (the NNX form of nn.scan).


def _nnx_stack(width: int, abstract: bool = False):
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(width, rngs=rngs)
            self.up = nnx.Linear(width, 4 * width, rngs=rngs)
            self.down = nnx.Linear(4 * width, width, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.gelu(self.up(self.norm(x))))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=4)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return Block(rngs)

            self.blocks = create(rngs)
            self.head = nnx.Linear(width, 8, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return self.head(body(x, self.blocks))

    model = nnx.eval_shape(lambda: Stack(nnx.Rngs(0))) if abstract else Stack(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2, eps=1e-3)

    def step(params, opt_state, batch):
        def loss_fn(params):
            return jnp.mean((nnx.merge(graphdef, params)(batch["x"]) - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, jax.eval_shape(tx.init, params) if abstract else tx.init(params)


def _nnx_batch(width: int, batch: int):
    keys = jax.random.split(jax.random.key(1))
    return {"x": jax.random.normal(keys[0], (batch, 32, width)), "y": jax.random.normal(keys[1], (batch, 32, 8))}


def test_nnx_scan_stack_is_planned_through_its_loop_and_trains_like_jit():
    """At d=1024 on A100s the stacked weights split on a non-stacked dim; the stacked axis stays whole."""
    width = 1024
    step, params, opt_state = _nnx_stack(width, abstract=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoplan.UnsupportedPrimitiveWarning)
        plan = _plan(step, params, opt_state, jax.eval_shape(lambda: _nnx_batch(width, 32)))
    specs = {leaf.path: leaf.spec for leaf in plan.inputs if leaf.path.startswith("params/blocks/")}
    assert all(spec[0] == () for spec in specs.values()), specs  # the stacked axis
    for kernel in ("up", "down"):
        assert any(specs[f"params/blocks/{kernel}/kernel/value"][1:]), specs  # not replicated
    # Numerics of single-device jit after 3 steps, at a width that runs fast; the program keeps its loop.
    step, params, opt_state = _nnx_stack(64)
    data = _nnx_batch(64, 16)
    planned = autoplan.autoparallel(step, mesh=jax.make_mesh((2, 4), ("data", "model"),
                                                             axis_types=(jax.sharding.AxisType.Auto,) * 2),
                                    cluster=CLUSTER, donate=False)
    got = want = (params, opt_state)
    for _ in range(3):
        *got, loss = planned(*got, data)
        *want, want_loss = jax.jit(step)(*want, data)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    text = planned.lower(params, opt_state, data).compile().as_text()
    assert "while(" in text and '"known_trip_count":{"n":"4"}' in text
