"""A traced training step cut into pipeline stage programs and run as one SPMD pipeline.

`autoparallel` runs a plan with several stages through this module, on the step
exactly as the user wrote it: no layer list, no second differentiation.  The
step is traced at the microbatch size and cut at its gradients (`pipeline.
split_at_gradients`).  Each op of the gradient part gets a virtual stage: the
stage of its pipeline layer (`inter.layer_units`), moved later for a forward op
whose operand is made later, and earlier for a backward op whose cotangent
operand is made earlier, so that forward values only flow to later stages and
cotangents only to earlier ones.  Then:

* ``F(vs)`` runs the forward ops of virtual stage ``vs`` and sends the next
  stage every forward value that a later stage reads (its own, and those it
  received and passes on);
* ``B(vs)`` recomputes the stage's forward from the values it received and
  stashed (activation checkpointing at stage boundaries), runs the stage's own
  backward ops (the user's: custom VJPs and remat policies are kept), and
  sends the previous stage every value an earlier stage's backward reads;
* the gradients and losses each stage makes (the values the update reads) are
  summed over microbatches on their stage and averaged; the update part runs
  once, after the pipeline, under ``jax.jit`` with the plan's shardings.

Values crossing a stage boundary travel packed: one flat buffer per dtype, as
long as the longest boundary needs, moved with ``lax.ppermute`` every tick
(`pipeline.run_ticks`).  The parameters and optimizer state are held as the
plan's leaf shardings say, which do not split over ``"stage"``: every stage row
keeps all of them, its stages read them in place (no transfer), and after
the ticks one all-gather gives every row every stage's gradient sums
for the update, which every row runs.  So a pipeline saves activation memory
and per-microbatch traffic, not weight memory, and its gradient all-gather
costs the stage axis about what data parallelism's reduction would
(`traffic` prices both; stage-owned state is not built).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from autoplan._src import graph as G
from autoplan._src import inter
from autoplan._src import pipeline as PL

_COMPUTE = (G.FORWARD, G.BACKWARD, G.OPTIMIZER)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Packing:
    """Groups of tensors, each packed into flat per-dtype buffers from offset 0; every group's buffers
    have one length per dtype (the longest group's), so any group fits the same buffers.

    >>> layout = packing([[0, 1], [2]], dtype_of=lambda t: "float32", size_of=lambda t: 3)
    >>> layout.lengths, layout.slots[0][1]
    ({'float32': 6}, ('float32', 3))
    """

    groups: tuple[tuple[int, ...], ...]
    slots: tuple[dict, ...]  # per group: tensor -> (dtype, offset)
    lengths: dict  # dtype -> buffer length

    def zeros(self) -> dict:
        return {dtype: jnp.zeros((n,), dtype) for dtype, n in self.lengths.items()}

    def pack(self, values: dict, group: int) -> dict:
        parts: dict[str, list] = {dtype: [] for dtype in self.lengths}
        for t in self.groups[group]:
            parts[self.slots[group][t][0]].append(jnp.ravel(values[t]))
        out = {}
        for dtype, n in self.lengths.items():
            flat = jnp.concatenate(parts[dtype]) if parts[dtype] else jnp.zeros((0,), dtype)
            out[dtype] = jnp.pad(flat, (0, n - flat.shape[0]))
        return out

    def unpack(self, buffers: dict, group: int, shapes: dict) -> dict:
        values = {}
        for t in self.groups[group]:
            dtype, offset = self.slots[group][t]
            size = math.prod(shapes[t])
            values[t] = jax.lax.slice_in_dim(buffers[dtype], offset, offset + size).reshape(shapes[t])
        return values


def packing(groups: Sequence[Sequence[int]], dtype_of: Callable[[int], str], size_of: Callable[[int], int]) -> Packing:
    """The `Packing` of ``groups`` of tensor ids."""
    slots, lengths = [], {}
    for group in groups:
        used: dict[str, int] = {}
        slot = {}
        for t in group:
            dtype = dtype_of(t)
            slot[t] = (dtype, used.get(dtype, 0))
            used[dtype] = used.get(dtype, 0) + size_of(t)
        slots.append(slot)
        for dtype, n in used.items():
            lengths[dtype] = max(lengths.get(dtype, 0), n)
    return Packing(groups=tuple(tuple(g) for g in groups), slots=tuple(slots), lengths=lengths)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StageCut:
    """The gradient part of a step cut into ``n`` virtual stages (see the module docstring)."""

    split: PL.GradientSplit
    stage_of: tuple[int, ...]  # per op; -1 for inputs, constants and ops outside the gradient part
    forward: tuple[tuple[int, ...], ...]  # F(vs): ops in order, constants they read included
    backward: tuple[tuple[int, ...], ...]  # B(vs): the stage's forward (recomputed) and its backward ops
    ahead: tuple[tuple[int, ...], ...]  # tensors vs sends to vs + 1
    back: tuple[tuple[int, ...], ...]  # tensors vs sends to vs - 1
    inputs: tuple[tuple[int, ...], ...]  # input leaves (not batch) each virtual stage reads
    forward_cut: tuple[tuple[int, ...], ...]  # gradients / losses made by F(vs)
    backward_cut: tuple[tuple[int, ...], ...]  # made by B(vs); those made by no stage, `run_update` makes

    @property
    def num_stages(self) -> int:
        return len(self.forward)


def _assign(split: PL.GradientSplit, unit_stage: Sequence[int]) -> list[int]:
    """Virtual stage of each op: its layer's, later for forward ops, earlier for backward ops as their
    operands need."""
    graph = split.graph
    stage = [-1] * len(graph.ops)
    for i in split.gradient_ops:
        op = graph.ops[i]
        if op.role not in _COMPUTE:
            continue
        producers = [graph.ops[graph.tensors[t].producer] for t in op.inputs if t != G.LITERAL]
        if op.role == G.BACKWARD:
            stage[i] = min([unit_stage[i]] + [stage[p.id] for p in producers if p.role == G.BACKWARD])
            continue
        for p in producers:
            if p.role == G.BACKWARD:
                raise NotImplementedError(
                    f"{op.label} at {op.source} is a forward op that reads a backward value ({p.label}); "
                    "the pipeline cannot place it. Run this step with stages=1")
        stage[i] = max([unit_stage[i]] + [stage[p.id] for p in producers])
    return stage


def cut_stages(split: PL.GradientSplit, bounds: Sequence[tuple[int, int]]) -> StageCut:
    """Cut ``split``'s gradient part into virtual stages, stage ``k`` owning pipeline layers
    ``bounds[k]`` (ranges of `inter.layer_units` of the traced graph)."""
    graph = split.graph
    units = inter.layer_units(graph)
    if bounds[-1][1] != len(units):
        raise ValueError(f"stage layer ranges {list(bounds)} do not cover the step's {len(units)} layers")
    stage_of_unit = {u: k for k, (start, end) in enumerate(bounds) for u in range(start, end)}
    stage = _assign(split, [stage_of_unit[u] for u in inter.op_units(graph, units)])
    n = len(bounds)
    ahead: list[set[int]] = [set() for _ in range(n)]
    back: list[set[int]] = [set() for _ in range(n)]
    for i in split.gradient_ops:
        for t in graph.ops[i].inputs:
            made = stage[graph.tensors[t].producer] if t != G.LITERAL else -1
            if stage[i] < 0 or made < 0:
                continue
            for k in range(made, stage[i]):  # forward value to a later stage
                ahead[k].add(t)
            for k in range(stage[i] + 1, made + 1):  # to an earlier stage's backward
                back[k].add(t)

    def ops_reading(ops):
        extra = {graph.tensors[t].producer for i in ops for t in graph.ops[i].inputs
                 if t != G.LITERAL and graph.ops[graph.tensors[t].producer].role == G.CONSTANT}
        return tuple(sorted(set(ops) | extra))

    forward, backward, inputs, forward_cut, backward_cut = [], [], [], [], []
    batch = {graph.input_ops[leaf] for leaf in split.batch_inputs}
    for k in range(n):
        mine = [i for i in split.gradient_ops if stage[i] == k]
        fwd = [i for i in mine if graph.ops[i].role != G.BACKWARD]
        forward.append(ops_reading(fwd))
        backward.append(ops_reading(mine))
        read = {graph.tensors[t].producer for i in mine for t in graph.ops[i].inputs if t != G.LITERAL}
        inputs.append(tuple(graph.input_ops.index(o) for o in sorted(read)
                            if graph.ops[o].role == G.INPUT and o not in batch))
        made = [t for t in split.cut if stage[graph.tensors[t].producer] == k]
        forward_cut.append(tuple(t for t in made if graph.ops[graph.tensors[t].producer].role != G.BACKWARD))
        backward_cut.append(tuple(t for t in made if graph.ops[graph.tensors[t].producer].role == G.BACKWARD))
    return StageCut(split=split, stage_of=tuple(stage), forward=tuple(forward), backward=tuple(backward),
                    ahead=tuple(tuple(sorted(a)) for a in ahead), back=tuple(tuple(sorted(b)) for b in back),
                    inputs=tuple(inputs), forward_cut=tuple(forward_cut), backward_cut=tuple(backward_cut))


def cut_for_schedule(split: PL.GradientSplit, sched: PL.Schedule,
                     bounds: Sequence[tuple[int, int]] | None = None) -> StageCut:
    """`cut_stages` into the schedule's ``S * v`` virtual stages: ``bounds``, or equal layer ranges."""
    parts = sched.num_stages * sched.virtual
    bounds = bounds or PL.even_bounds(len(inter.layer_units(split.graph)), parts,
                                      what="the step has only {n} pipeline layers")
    if len(bounds) != parts:
        raise ValueError(f"{len(bounds)} layer ranges for {sched.num_stages} stages x {sched.virtual} chunks; "
                         "give one per virtual stage")
    return cut_stages(split, bounds)


class StagedStep:
    """``step`` run as a pipeline: its traced gradient part cut into the stages of ``bounds`` and driven by
    ``schedule`` on ``mesh``'s ``"stage"`` axis; called like the step (under ``jax.jit``).

    ``bounds`` are the layer ranges (of `inter.layer_units`) of the ``S * v`` virtual stages in order;
    virtual stage ``c * S + s`` runs on stage row ``s``.
    """

    def __init__(self, step: Callable, schedule: PL.Schedule, mesh: jax.sharding.Mesh,
                 bounds: Sequence[tuple[int, int]] | None = None, batch_argnum: int = -1):
        if mesh.shape.get("stage") != schedule.num_stages:
            raise ValueError(f"the pipeline needs a 'stage' mesh axis of size {schedule.num_stages}; "
                             f"mesh has {dict(mesh.shape)}")
        self.schedule, self.mesh, self.bounds = schedule, mesh, bounds
        self.accumulated = PL.Accumulated(step, schedule.num_microbatches, batch_argnum)
        self._cuts: dict[int, StageCut] = {}

    def cut(self, *args) -> StageCut:
        split = self.accumulated.split(*args)
        if id(split) not in self._cuts:
            self._cuts[id(split)] = cut_for_schedule(split, self.schedule, self.bounds)
        return self._cuts[id(split)]

    def __call__(self, *args):
        cut = self.cut(*args)
        split, graph = cut.split, cut.split.graph
        leaves = jax.tree_util.tree_leaves(args)
        leaf_tensor = [graph.ops[o].outputs[0] for o in graph.input_ops]
        read = sorted({i for ins in cut.inputs for i in ins})
        sums = self._pipeline(cut, leaf_tensor)([leaves[i] for i in read], [leaves[i] for i in split.batch_inputs])
        b = self.schedule.num_microbatches
        return PL.run_update(split, leaves, {t: (total / b).astype(graph.tensors[t].dtype)
                                             for t, total in sums.items()})

    def p2p_bytes(self, *args) -> float:
        """Bytes each device sends point-to-point per step (see `traffic`)."""
        return traffic(self.cut(*args), self.schedule)[0]

    def gather_bytes(self, *args) -> float:
        """Bytes of the gradient all-gather after the ticks (see `traffic`)."""
        return traffic(self.cut(*args), self.schedule)[1]

    def _pipeline(self, cut: StageCut, leaf_tensor):
        """``(inputs the stages read, batch) -> per-stage sums of the cut values`` as one shard_map."""
        graph, split, sched = cut.split.graph, cut.split, self.schedule
        n = cut.num_stages
        shapes = {t.id: t.shape for t in graph.tensors}
        acts, cots, sums = _layouts(cut)
        made = sums.groups
        batch_tensors = [leaf_tensor[i] for i in split.batch_inputs]
        read = sorted({i for ins in cut.inputs for i in ins})

        def environment(vs, inputs: dict, micro, received: dict):
            env = {leaf_tensor[i]: inputs[leaf_tensor[i]] for i in cut.inputs[vs]}
            env.update(zip(batch_tensors, micro))
            env.update(received)
            return env

        def contributions(env, vs, tensors):
            values = {t: env[t].astype(jnp.float32) if t in tensors else jnp.zeros(shapes[t], jnp.float32)
                      for t in made[vs]}
            return (sums.pack(values, vs),)

        def branches(inputs):
            def idle(_params, act, cot, micro):
                return acts.zeros(), (sums.zeros(),), cots.zeros()

            def forward(vs):
                def run(_params, act, cot, micro):
                    received = acts.unpack(act, vs - 1, shapes) if vs else {}
                    env = PL.evaluate_ops(graph, split.items, cut.forward[vs],
                                          environment(vs, inputs, micro, received))
                    out = acts.pack(env, vs) if vs < n - 1 else acts.zeros()
                    return out, contributions(env, vs, cut.forward_cut[vs]), cots.zeros()
                return run

            def backward(vs):
                def run(_params, act, cot, micro):
                    received = acts.unpack(act, vs - 1, shapes) if vs else {}
                    if vs < n - 1:
                        received.update(cots.unpack(cot, vs + 1, shapes))
                    env = PL.evaluate_ops(graph, split.items, cut.backward[vs],
                                          environment(vs, inputs, micro, received))
                    out = cots.pack(env, vs) if vs else cots.zeros()
                    return acts.zeros(), contributions(env, vs, cut.backward_cut[vs]), out
                return run

            return [idle] + [forward(vs) for vs in range(n)] + [backward(vs) for vs in range(n)]

        def body(read_values, batch):
            inputs = dict(zip([leaf_tensor[i] for i in read], read_values))
            (total,) = PL.run_ticks(sched, branches(inputs), {}, batch, acts.zeros(), cots.zeros(), (sums.zeros(),))
            # Every row runs the update on whole gradients: gather the stages' sums (one all-gather).
            return {dtype: jax.lax.all_gather(x, "stage") for dtype, x in total.items()}

        spec = jax.sharding.PartitionSpec
        shard = jax.shard_map(body, mesh=self.mesh, in_specs=(spec(), spec()),
                              out_specs=spec(), axis_names={"stage"}, check_vma=False)

        def run(read_values, batch):
            total = shard(read_values, batch)  # [S, v, length]
            values = {}
            for vs in range(n):
                row = {dtype: x[vs % sched.num_stages, vs // sched.num_stages] for dtype, x in total.items()}
                values.update(sums.unpack(row, vs, shapes))
            return values

        return run



def traffic(cut: StageCut, sched: PL.Schedule) -> tuple[float, float]:
    """What the runtime sends per step: (point-to-point bytes per device: every tick moves the packed
    forward buffers ahead and the packed backward buffers back, idle ticks too, as a collective runs on
    every device; bytes of the one all-gather after the ticks that gives every stage row every stage's
    float32 sums of gradients and losses, for the update every row runs)."""
    acts, cots, sums = _layouts(cut)
    per_tick = sum(n * G.itemsize(d) for layout in (acts, cots) for d, n in layout.lengths.items())
    gathered = sched.num_stages * sched.virtual * 4 * sums.lengths.get("float32", 0)
    return float(sched.num_ticks * per_tick), float(gathered)


def stash_bytes(cut: StageCut, sched: PL.Schedule) -> float:
    """Bytes each device keeps for the values it received: forward and backward buffers for each of its
    ``v`` chunks and every microbatch (the backward recomputes its forward from them)."""
    acts, cots, _ = _layouts(cut)
    per_slot = sum(n * G.itemsize(d) for layout in (acts, cots) for d, n in layout.lengths.items())
    return float(sched.virtual * sched.num_microbatches * per_slot)


def _layouts(cut: StageCut) -> tuple[Packing, Packing, Packing]:
    """How values travel: ahead, back, and the per-stage sums of gradients and losses (float32)."""
    graph = cut.split.graph
    dtype_of, size_of = (lambda t: graph.tensors[t].dtype), (lambda t: graph.tensors[t].size)
    made = [cut.forward_cut[k] + cut.backward_cut[k] for k in range(cut.num_stages)]
    return (packing(cut.ahead, dtype_of, size_of), packing(cut.back, dtype_of, size_of),
            packing(made, lambda t: "float32", size_of))


def plan_bounds(stages, schedule: str) -> list[tuple[int, int]] | None:
    """The virtual stages' layer ranges a plan (or a stage DP choice) runs with: its stages' ranges, or
    for interleaved 1F1B (``v`` chunks per stage row, which the stage DP does not choose) None: equal
    ranges."""
    if schedule == "interleaved":
        return None
    return [(stage.start, stage.end) for stage in stages]


def staged_step(plan, fun: Callable, mesh: jax.sharding.Mesh) -> StagedStep:
    """``fun`` pipelined as ``plan`` says (its stages, schedule and microbatches) on ``mesh``."""
    sched = PL.schedule(plan.schedule, stages=len(plan.stages), microbatches=plan.microbatches)
    return StagedStep(fun, sched, mesh, plan_bounds(plan.stages, plan.schedule))
