"""A traced training step cut into pipeline stage programs and run as one SPMD pipeline.

`autoparallel` runs a plan with several stages through this module, on the step
exactly as the user wrote it: no layer list, no second differentiation.  The
step is traced at the microbatch size and cut at its gradients (`pipeline.
split_at_gradients`).  Each op of the gradient part gets a virtual stage: the
stage of its pipeline layer (`inter.layer_units`), moved later for a forward op
whose operand is made later; a backward op goes with the latest forward value
it reads but no later than the cotangents it reads, so that forward values flow
to later stages and cotangents only to earlier ones.  Then:

* ``F(vs)`` runs the forward ops of virtual stage ``vs`` and sends the next
  stage every forward value that a later stage reads (its own, and those it
  received and passes on);
* ``F(vs)`` also keeps, on its own row until the microbatch's backward, the
  forward values it made that its backward reads (the residuals), except
  those of elementwise and layout operators, which the backward runs again
  (`RECOMPUTED`; no matmul is recomputed unless the user's own remat asks);
* ``B(vs)`` runs the stage's own backward ops (the user's: custom VJPs and
  remat policies are kept) on the values it received and kept, and sends the
  previous stage every value an earlier stage's backward reads;
* the gradients and losses each stage makes (the values the update reads) are
  summed over microbatches on their stage row and averaged.

Values crossing a stage boundary travel packed: one flat buffer per dtype, as
long as the longest boundary needs, moved with ``lax.ppermute`` on the ticks
that carry them (`pipeline.run_ticks`, `pipeline.send_directions`).

State is stage-owned (`homes`): a parameter lives on the devices of the one
stage row whose ops read it, its optimizer state with it, and that row's update
program updates them; no device holds another stage's weights.  A call packs
each row's parameters into one buffer per dtype on that row, assembles the rows
into one ``P("stage")`` array without copying, runs the pipeline, and runs each
row's update on the row's devices (MPMD dispatch of single-controller JAX, as
JaxPP does: a `NamedSharding` over the whole mesh cannot keep a leaf on one row,
and the step's outputs are the user's pytrees).  A gradient that another home's
update reads (a tied embedding's; every one under global-norm clipping) is
all-reduced over ``"stage"`` inside the pipeline program; `runtime_cost` says
how many bytes, and what the packed copy and the stash hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from autoplan._src import emit as E
from autoplan._src import graph as G
from autoplan._src import inter
from autoplan._src import pipeline as PL
from autoplan._src.strategies.base import FUSIBLE_PRODUCERS

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
    backward: tuple[tuple[int, ...], ...]  # B(vs): the stage's backward ops, constants they read included
    kept: tuple[tuple[int, ...], ...]  # forward values F(vs) makes that B(vs) reads or sends back
    ahead: tuple[tuple[int, ...], ...]  # tensors vs sends to vs + 1
    back: tuple[tuple[int, ...], ...]  # tensors vs sends to vs - 1
    inputs: tuple[tuple[int, ...], ...]  # input leaves (not batch) each virtual stage reads
    forward_cut: tuple[tuple[int, ...], ...]  # gradients / losses made by F(vs)
    backward_cut: tuple[tuple[int, ...], ...]  # made by B(vs); those made by no stage, `run_update` makes

    @property
    def num_stages(self) -> int:
        return len(self.forward)


def _assign(split: PL.GradientSplit, unit_stage: Sequence[int]) -> list[int]:
    """Virtual stage of each op: its layer's, later for forward ops as their operands need; a backward
    op goes with the latest forward value it reads, but no later than the cotangents it reads."""
    graph = split.graph
    stage = [-1] * len(graph.ops)
    for i in split.gradient_ops:
        op = graph.ops[i]
        if op.role not in _COMPUTE:
            continue
        producers = [graph.ops[graph.tensors[t].producer] for t in op.inputs if t != G.LITERAL]
        if op.role == G.BACKWARD:  # with the forward values it reads, before the cotangents it reads
            ahead = max([unit_stage[i]] + [stage[p.id] for p in producers if p.role != G.BACKWARD])
            stage[i] = min([ahead] + [stage[p.id] for p in producers if p.role == G.BACKWARD])
            continue
        for p in producers:
            if p.role == G.BACKWARD:
                raise NotImplementedError(
                    f"{op.label} at {op.source} is a forward op that reads a backward value ({p.label}); "
                    "the pipeline cannot place it. Run this step with stages=1")
        stage[i] = max([unit_stage[i]] + [stage[p.id] for p in producers])
    return stage


# Forward operators a stage's backward runs again rather than keep their results from the forward:
# elementwise and layout operators, which XLA fuses into their consumers at no extra memory traffic.
RECOMPUTED = frozenset(FUSIBLE_PRODUCERS) - {"iota"}


def _residuals(graph: G.Graph, forward_ops: Sequence[int], read: set[int]) -> tuple[tuple[int, ...], list[int]]:
    """What a stage's forward keeps for its backward, and which forward operators the backward runs
    again: of the forward values ``read`` (by the backward or sent back), those an elementwise or layout
    operator made are recomputed from its operands (recursively), the rest kept.  So a GELU keeps its
    matmul's output, not the half-dozen intermediates JAX's autodiff reads, as XLA's own fusion would."""
    mine = {t: i for i in forward_ops for t in graph.ops[i].outputs}
    keep: set[int] = set()
    again: set[int] = set()
    pending = [t for t in read if t in mine]
    while pending:
        t = pending.pop()
        op = graph.ops[mine[t]]
        if op.primitive not in RECOMPUTED:
            keep.add(t)
        elif op.id not in again:
            again.add(op.id)
            pending += [u for u in op.inputs if u != G.LITERAL and u in mine]
    return tuple(sorted(keep)), sorted(again)


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

    forward, backward, kept, inputs, forward_cut, backward_cut = [], [], [], [], [], []
    batch = {graph.input_ops[leaf] for leaf in split.batch_inputs}
    for k in range(n):
        mine = [i for i in split.gradient_ops if stage[i] == k]
        fwd = [i for i in mine if graph.ops[i].role != G.BACKWARD]
        bwd = [i for i in mine if graph.ops[i].role == G.BACKWARD]
        forward.append(ops_reading(fwd))
        read_back = {t for i in bwd for t in graph.ops[i].inputs if t != G.LITERAL} | back[k]
        keep, again = _residuals(graph, fwd, read_back)
        backward.append(ops_reading(bwd + again))
        kept.append(keep)
        read = {graph.tensors[t].producer for i in mine for t in graph.ops[i].inputs if t != G.LITERAL}
        inputs.append(tuple(graph.input_ops.index(o) for o in sorted(read)
                            if graph.ops[o].role == G.INPUT and o not in batch))
        made = [t for t in split.cut if stage[graph.tensors[t].producer] == k]
        forward_cut.append(tuple(t for t in made if graph.ops[graph.tensors[t].producer].role != G.BACKWARD))
        backward_cut.append(tuple(t for t in made if graph.ops[graph.tensors[t].producer].role == G.BACKWARD))
    return StageCut(split=split, stage_of=tuple(stage), forward=tuple(forward), backward=tuple(backward),
                    kept=tuple(kept),
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


GLOBAL = -1  # the home of state the whole mesh holds


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Homes:
    """Where a pipelined step keeps its state between steps, and which program updates what.

    A leaf that one stage row's pipeline reads lives on that row's devices only (home ``r``), and so
    does optimizer state whose update (an output aliased to it) reads only that row's gradients;
    the update of row ``r``'s state runs on row ``r``.  A leaf several rows read (a tied embedding)
    or whose update mixes rows lives on the whole mesh (`GLOBAL`), as do outputs that mix rows.  A
    gradient (cut value) an update of another home reads is *exchanged*: summed over the stage axis
    (an all-reduce); the others stay on the row that makes them.
    """

    leaves: tuple[int | None, ...]  # per input leaf: home; None for the batch
    outputs: tuple[int, ...]  # per output leaf: home
    packed: tuple[tuple[int, ...], ...]  # per virtual stage: row-homed leaves it reads (packed per row)
    shared: tuple[int, ...]  # GLOBAL leaves the pipeline reads, in place
    local: tuple[tuple[int, ...], ...]  # per virtual stage: cut values summed on its row and kept there
    exchanged: tuple[int, ...]  # cut values all-reduced over "stage"
    update_ops: dict  # home -> ops of its update, in order
    update_reads: dict  # home -> input leaves its update reads


def homes(cut: StageCut, rows: int) -> Homes:
    """The `Homes` of ``cut``'s step on ``rows`` stage rows."""
    split, graph = cut.split, cut.split.graph
    leaf_of = {graph.ops[o].outputs[0]: i for i, o in enumerate(graph.input_ops)}
    batch = set(split.batch_inputs)
    readers: dict[int, set[int]] = {}
    for vs, leaves in enumerate(cut.inputs):
        for i in leaves:
            readers.setdefault(i, set()).add(vs % rows)
    made_on = {t: cut.stage_of[graph.tensors[t].producer] % rows for t in split.cut
               if cut.stage_of[graph.tensors[t].producer] >= 0}
    outputs = [graph.ops[o].inputs[0] for o in graph.output_ops]
    ops_of, reads_of, cuts_of = [], [], []
    for t in outputs:
        ops = [] if t in made_on else PL.ancestors(graph, [t], known=set(made_on))
        ops_of.append(ops)
        reads_of.append({leaf_of[graph.ops[i].outputs[0]] for i in ops if graph.ops[i].role == G.INPUT})
        cuts_of.append({t} if t in made_on else {u for i in ops for u in graph.ops[i].inputs if u in made_on})

    def pipeline_home(i):
        return next(iter(readers[i])) if len(readers[i]) == 1 else GLOBAL

    def voted(o):
        """The home of an output that no pipeline reads: that of the gradients and pipeline-read leaves
        nearest to it (fewest ops back; Adam's moment of a weight is next to that weight's gradient,
        the global norm clipping mixes in is further), if they agree; else GLOBAL."""
        frontier, seen = {outputs[o]}, set()
        while frontier:
            votes = {made_on[t] for t in frontier if t in made_on}
            votes |= {pipeline_home(leaf_of[t]) for t in frontier if t in leaf_of and leaf_of[t] in readers}
            if votes:
                return votes.pop() if len(votes) == 1 else GLOBAL
            seen |= frontier
            frontier = {u for t in frontier if t not in leaf_of for u in graph.ops[graph.tensors[t].producer].inputs
                        if u != G.LITERAL and u not in seen}
        return GLOBAL

    alias_of = {i: o for o, i in graph.aliases.items()}
    leaf_home = tuple(None if i in batch else pipeline_home(i) if i in readers
                      else voted(alias_of[i]) if i in alias_of else GLOBAL
                      for i in range(len(graph.input_ops)))
    out_home = tuple(leaf_home[graph.aliases[o]] if o in graph.aliases else voted(o) for o in range(len(outputs)))
    exchanged = sorted({t for o, home in enumerate(out_home) for t in cuts_of[o] if made_on[t] != home})
    update_ops, update_reads = {}, {}
    for home in sorted(set(out_home)):
        mine = [o for o, h in enumerate(out_home) if h == home]
        update_ops[home] = tuple(sorted({i for o in mine for i in ops_of[o]}))
        update_reads[home] = tuple(sorted({i for o in mine for i in reads_of[o]}))
    n = cut.num_stages
    return Homes(
        leaves=leaf_home, outputs=out_home,
        packed=tuple(tuple(i for i in cut.inputs[vs] if leaf_home[i] != GLOBAL) for vs in range(n)),
        shared=tuple(sorted(i for i in readers if leaf_home[i] == GLOBAL)),
        local=tuple(tuple(t for t in cut.forward_cut[vs] + cut.backward_cut[vs] if t not in exchanged)
                    for vs in range(n)),
        exchanged=tuple(exchanged), update_ops=update_ops, update_reads=update_reads)


def _rows_of(array: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    """The part of ``array`` on ``mesh``'s devices (a row of a ``P("stage")`` array, or a replicated one)
    as an array on ``mesh``, replicated there; no copy."""
    devices = set(mesh.devices.flat)
    shards = [s.data for s in array.addressable_shards if s.device in devices]
    shape = (1, *array.shape[1:]) if array.sharding.spec and array.sharding.spec[0] == "stage" else array.shape
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, PartitionSpec()), shards)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Programs:
    """The jitted programs of one argument signature and how leaves are placed for them."""

    cut: StageCut
    homes: Homes
    in_shardings: tuple  # per input leaf
    out_shardings: tuple  # per output leaf
    pack: tuple  # per row: (owned leaves) -> {dtype: [1, v, N]}
    pipeline: Any  # (packed, shared leaves, batch leaves) -> (local sums [S, v, L], exchanged sums [K])
    update: dict  # home -> (read leaves, local row or None, exchanged) -> outputs of that home
    packed_leaves: tuple  # per row: the leaves its pack reads


class StagedStep:
    """``step`` run as a pipeline: its traced gradient part cut into the stages of ``bounds`` and driven
    by ``schedule`` on ``mesh``'s ``"stage"`` axis; called like the step (not under ``jax.jit``: it
    dispatches one program per stage row and phase, see below).

    ``bounds`` are the layer ranges (of `inter.layer_units`) of the ``S * v`` virtual stages in order;
    virtual stage ``c * S + s`` runs on stage row ``s``.  ``in_specs`` / ``out_specs`` are the
    PartitionSpecs of the step's input and output leaves inside a stage (default: replicated).
    ``data_axes`` are data parallel inside every stage, as in Megatron: each replica runs its own
    share of each microbatch (the batch's leading axis split over them) with the stage's whole
    parameters, and the gradient sums are averaged over the replicas once per step, after the ticks;
    the other axes are left to XLA.

    State lives where `homes` says: a stage row's parameters and optimizer state on that row's devices
    only.  A call (1) packs each row's parameters into one flat buffer per dtype on that row, (2) runs
    the pipeline (one SPMD program, `jax.shard_map` manual over ``"stage"``) which sums each row's
    gradients over the microbatches on that row and all-reduces only the exchanged ones, and (3) runs
    each home's update on its own devices.  Outputs are arrays on their home's devices.
    """

    def __init__(self, step: Callable, schedule: PL.Schedule, mesh: jax.sharding.Mesh,
                 bounds: Sequence[tuple[int, int]] | None = None, batch_argnum: int = -1, *,
                 in_specs: Sequence | None = None, out_specs: Sequence | None = None, donate: bool = False,
                 data_axes: Sequence[str] = ()):
        if mesh.shape.get("stage") != schedule.num_stages:
            raise ValueError(f"the pipeline needs a 'stage' mesh axis of size {schedule.num_stages}; "
                             f"mesh has {dict(mesh.shape)}")
        missing = [axis for axis in data_axes if axis not in mesh.shape or axis == "stage"]
        if missing:
            raise ValueError(f"data-parallel axis {missing[0]!r} is not a non-stage axis of the mesh "
                             f"{dict(mesh.shape)}")
        self.schedule, self.mesh, self.bounds = schedule, mesh, bounds
        self.in_specs, self.out_specs, self.donate = in_specs, out_specs, donate
        self.data_axes = tuple(data_axes)
        self.rows = [E.stage_row(mesh, r) for r in range(schedule.num_stages)]
        # Only its split is used (traced at one data-parallel replica's share of a microbatch).
        self.accumulated = PL.Accumulated(step, schedule.num_microbatches, batch_argnum, mesh=mesh,
                                          data_axes=self.data_axes)
        self._programs: dict[int, _Programs] = {}

    def cut(self, *args) -> StageCut:
        return self.programs(*args).cut

    def homes(self, *args) -> Homes:
        return self.programs(*args).homes

    def programs(self, *args) -> _Programs:
        split = self.accumulated.split(*args)
        if id(split) not in self._programs:
            self._programs[id(split)] = self._build(cut_for_schedule(split, self.schedule, self.bounds))
        return self._programs[id(split)]

    def in_shardings(self, *args):
        """Where each argument leaf lives (a pytree like ``args``)."""
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(args), self.programs(*args).in_shardings)

    def __call__(self, *args):
        programs = self.programs(*args)
        graph, homes_ = programs.cut.split.graph, programs.homes
        leaves = [x if getattr(x, "sharding", None) == s else jax.device_put(x, s)
                  for x, s in zip(jax.tree_util.tree_leaves(args), programs.in_shardings)]
        packed_rows = [pack([leaves[i] for i in reads]) for pack, reads in zip(programs.pack, programs.packed_leaves)]
        packed = {dtype: _assemble([row[dtype] for row in packed_rows], self.mesh) for dtype in packed_rows[0]}
        local, exchanged = programs.pipeline(packed, [leaves[i] for i in homes_.shared],
                                             [leaves[i] for i in programs.cut.split.batch_inputs])
        outputs: list = [None] * len(graph.output_ops)
        meshes = {home: self.mesh if home == GLOBAL else self.rows[home] for home in programs.update}
        copies = {home: [jax.device_put(leaves[i], _on(meshes[home], leaves[i]))
                         for i in _own_and_foreign(homes_, home)[1]] for home in programs.update}
        for home, update in programs.update.items():
            mesh = meshes[home]
            row = None if home == GLOBAL else {dtype: _rows_of(x, mesh) for dtype, x in local.items()}
            done = update([leaves[i] for i in _own_and_foreign(homes_, home)[0]], copies[home], row,
                          exchanged if home == GLOBAL else {d: _rows_of(x, mesh) for d, x in exchanged.items()})
            for o, value in zip([o for o, h in enumerate(homes_.outputs) if h == home], done):
                outputs[o] = value
        return jax.tree_util.tree_unflatten(graph.output_tree, outputs)

    def compile(self, *args) -> dict:
        """Every program of a call, compiled for these arguments: ``{"pack/r", "pipeline", "update/r" or
        "update/global": jax.stages.Compiled}``."""
        programs = self.programs(*args)
        homes_ = programs.homes
        structs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                   for x, s in zip(jax.tree_util.tree_leaves(args), programs.in_shardings)]
        out: dict = {}
        packed = {}
        for r, (pack, reads) in enumerate(zip(programs.pack, programs.packed_leaves)):
            lowered = pack.lower([structs[i] for i in reads])
            out[f"pack/{r}"] = lowered.compile()
            for dtype, x in lowered.out_info.items():
                packed[dtype] = jax.ShapeDtypeStruct((self.schedule.num_stages, *x.shape[1:]), x.dtype,
                                                     sharding=NamedSharding(self.mesh, PartitionSpec("stage")))
        pipeline = programs.pipeline.lower(packed, [structs[i] for i in homes_.shared],
                                           [structs[i] for i in programs.cut.split.batch_inputs])
        out["pipeline"] = pipeline.compile()
        local, exchanged = pipeline.out_info
        for home, update in programs.update.items():
            mesh = self.mesh if home == GLOBAL else self.rows[home]

            def on(x, spec):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
            own, foreign = _own_and_foreign(homes_, home)
            row = None if home == GLOBAL else {d: on(jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), PartitionSpec())
                                               for d, x in local.items()}
            name = "update/global" if home == GLOBAL else f"update/{home}"
            copies = [on(structs[i], structs[i].sharding.spec) for i in foreign]
            out[name] = update.lower([structs[i] for i in own], copies, row,
                                     {d: on(x, PartitionSpec()) for d, x in exchanged.items()}).compile()
        return out

    def runtime_cost(self, *args) -> RuntimeCost:
        return runtime_cost(self.cut(*args), self.schedule)

    # -- building the programs ------------------------------------------------------------
    def _spec(self, specs, index):
        return PartitionSpec() if specs is None else specs[index]

    def _build(self, cut: StageCut) -> _Programs:
        homes_ = homes(cut, self.schedule.num_stages)
        meshes = {GLOBAL: self.mesh, **dict(enumerate(self.rows))}
        in_shardings = tuple(NamedSharding(meshes[GLOBAL if home is None else home], self._spec(self.in_specs, i))
                             for i, home in enumerate(homes_.leaves))
        out_shardings = tuple(NamedSharding(meshes[home], self._spec(self.out_specs, o))
                              for o, home in enumerate(homes_.outputs))
        layouts = _layouts(cut, homes_)
        packs, packed_leaves = [], []
        for r in range(self.schedule.num_stages):
            chunks = range(r, cut.num_stages, self.schedule.num_stages)
            reads = tuple(sorted({i for vs in chunks for i in homes_.packed[vs]}))
            packs.append(jax.jit(self._packer(cut, layouts.params, reads, list(chunks)),
                                 out_shardings=NamedSharding(self.rows[r], PartitionSpec())))
            packed_leaves.append(reads)
        update = {home: self._updater(cut, homes_, layouts, home, out_shardings)
                  for home in homes_.update_ops}
        return _Programs(cut=cut, homes=homes_, in_shardings=in_shardings, out_shardings=out_shardings,
                         pack=tuple(packs), pipeline=self._pipeline(cut, homes_, layouts, in_shardings),
                         update=update, packed_leaves=tuple(packed_leaves))

    @staticmethod
    def _packer(cut: StageCut, layout: Packing, reads: Sequence[int], chunks: Sequence[int]):
        leaf_tensor = [cut.split.graph.ops[o].outputs[0] for o in cut.split.graph.input_ops]

        def pack(values):
            env = {leaf_tensor[i]: x for i, x in zip(reads, values)}
            per_chunk = [layout.pack(env, vs) for vs in chunks]
            return {dtype: jnp.stack([p[dtype] for p in per_chunk])[None] for dtype in layout.lengths}
        return pack

    def _updater(self, cut: StageCut, homes_: Homes, layouts: _Layouts, home: int, out_shardings):
        graph, split, sched = cut.split.graph, cut.split, self.schedule
        shapes = {t.id: t.shape for t in graph.tensors}
        leaf_tensor = [graph.ops[o].outputs[0] for o in graph.input_ops]
        mine = [o for o, h in enumerate(homes_.outputs) if h == home]
        chunks = [] if home == GLOBAL else list(range(home, cut.num_stages, sched.num_stages))
        b = sched.num_microbatches
        own, foreign = _own_and_foreign(homes_, home)

        def update(own_values, foreign_values, row, exchanged):
            env = {leaf_tensor[i]: x for i, x in zip(own + foreign, [*own_values, *foreign_values])}
            sums = layouts.exchanged.unpack(exchanged, 0, shapes) if homes_.exchanged else {}
            for c, vs in enumerate(chunks):
                sums.update(layouts.local.unpack({dtype: x[0, c] for dtype, x in row.items()}, vs, shapes))
            env.update({t: (total / b).astype(graph.tensors[t].dtype) for t, total in sums.items()})
            env = PL.evaluate_ops(graph, split.items, homes_.update_ops[home], env)
            return [env[graph.ops[graph.output_ops[o]].inputs[0]] for o in mine]

        # Donate this home's state when the update returns all of it updated (parameters, optimizer
        # state) and no other home's update reads it (a copy of it may share its buffer).
        aliased = {graph.aliases[o] for o in mine if o in graph.aliases}
        read_elsewhere = {i for h in homes_.update_ops if h != home for i in _own_and_foreign(homes_, h)[1]}
        donate = (0,) if self.donate and own and set(own) <= aliased and not read_elsewhere & set(own) else ()
        return jax.jit(update, out_shardings=[out_shardings[o] for o in mine], donate_argnums=donate)

    def _pipeline(self, cut: StageCut, homes_: Homes, layouts: _Layouts, in_shardings):
        """``(packed rows, shared leaves, batch) -> (per-row sums [S, v, L], exchanged sums [K])``: one
        shard_map manual over ``"stage"``."""
        graph, split, sched = cut.split.graph, cut.split, self.schedule
        n = cut.num_stages
        shapes = {t.id: t.shape for t in graph.tensors}
        leaf_tensor = [graph.ops[o].outputs[0] for o in graph.input_ops]
        batch_tensors = [leaf_tensor[i] for i in split.batch_inputs]
        acts, cots, kept, local, exchanged = layouts.acts, layouts.cots, layouts.kept, layouts.local, layouts.exchanged
        unpack_params = layouts.params.unpack
        leaf_shapes = {leaf_tensor[i]: shapes[leaf_tensor[i]] for i in range(len(leaf_tensor))}

        def environment(vs, params, shared: dict, micro, received: dict):
            env = {leaf_tensor[i]: shared[leaf_tensor[i]] for i in cut.inputs[vs] if i in homes_.shared}
            env.update(unpack_params(params, vs, leaf_shapes))
            env.update(zip(batch_tensors, micro))
            env.update(received)
            return env

        def contributions(env, vs, tensors):
            def values(group):
                return {t: env[t].astype(jnp.float32) if t in tensors else jnp.zeros(shapes[t], jnp.float32)
                        for t in group}
            return local.pack(values(local.groups[vs]), vs), exchanged.pack(values(exchanged.groups[0]), 0)

        def branches(shared):
            def idle(_params, act, cot, residuals, micro):  # every branch returns the residual slot it keeps
                return acts.zeros(), (local.zeros(), exchanged.zeros()), cots.zeros(), residuals

            def forward(vs):
                def run(params, act, cot, residuals, micro):
                    received = acts.unpack(act, vs - 1, shapes) if vs else {}
                    env = PL.evaluate_ops(graph, split.items, cut.forward[vs],
                                          environment(vs, params, shared, micro, received))
                    out = acts.pack(env, vs) if vs < n - 1 else acts.zeros()
                    return out, contributions(env, vs, cut.forward_cut[vs]), cots.zeros(), kept.pack(env, vs)
                return run

            def backward(vs):
                def run(params, act, cot, residuals, micro):
                    received = acts.unpack(act, vs - 1, shapes) if vs else {}
                    if vs < n - 1:
                        received.update(cots.unpack(cot, vs + 1, shapes))
                    received.update(kept.unpack(residuals, vs, shapes))
                    env = PL.evaluate_ops(graph, split.items, cut.backward[vs],
                                          environment(vs, params, shared, micro, received))
                    out = cots.pack(env, vs) if vs else cots.zeros()
                    return acts.zeros(), contributions(env, vs, cut.backward_cut[vs]), out, residuals
                return run

            return [idle] + [forward(vs) for vs in range(n)] + [backward(vs) for vs in range(n)]

        data = self.data_axes

        def average(x):  # over the data-parallel replicas of a stage: each ran its own share of the examples
            return jax.lax.pmean(x, data) if data else x

        def body(packed, shared_values, batch):
            shared = dict(zip([leaf_tensor[i] for i in homes_.shared], shared_values))
            row = {dtype: x[0] for dtype, x in packed.items()}
            sums, summed = PL.run_ticks(sched, branches(shared), row, batch, acts.zeros(), cots.zeros(),
                                        (local.zeros(), exchanged.zeros()), kept.zeros())
            total = {dtype: average(jax.lax.psum(x.sum(0), "stage")) for dtype, x in summed.items()}
            return {dtype: average(x)[None] for dtype, x in sums.items()}, total

        spec = PartitionSpec
        shard = jax.shard_map(body, mesh=self.mesh, in_specs=(spec("stage"), spec(), spec(data or None)),
                              out_specs=(spec("stage"), spec()), axis_names={"stage", *data}, check_vma=False)
        return jax.jit(
            shard, in_shardings=({dtype: NamedSharding(self.mesh, spec("stage")) for dtype in layouts.params.lengths},
                                 [in_shardings[i] for i in homes_.shared],
                                 [in_shardings[i] for i in split.batch_inputs]),
            out_shardings=(NamedSharding(self.mesh, spec("stage")), NamedSharding(self.mesh, spec())))


def _assemble(rows: Sequence[jax.Array], mesh: jax.sharding.Mesh) -> jax.Array:
    """Per-row ``[1, ...]`` arrays (each on its row's devices) as one ``P("stage")`` array; no copy."""
    shards = [s.data for row in rows for s in row.addressable_shards]
    return jax.make_array_from_single_device_arrays((len(rows), *rows[0].shape[1:]),
                                                    NamedSharding(mesh, PartitionSpec("stage")), shards)


def _own_and_foreign(homes_: Homes, home: int) -> tuple[list[int], list[int]]:
    """The leaves ``home``'s update reads: its own, and those copied in from another home."""
    reads = homes_.update_reads[home]
    return [i for i in reads if homes_.leaves[i] == home], [i for i in reads if homes_.leaves[i] != home]


def _on(mesh: jax.sharding.Mesh, leaf: jax.Array) -> NamedSharding:
    """``leaf``'s PartitionSpec on another mesh with the same axes (a copy between homes)."""
    return NamedSharding(mesh, getattr(leaf.sharding, "spec", PartitionSpec()))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RuntimeCost:
    """What the runtime does per step beyond the stages' own programs (what `inter` prices), and where
    it keeps the state (`Homes`: per input and output leaf, its stage row or `GLOBAL`)."""

    p2p_bytes: float  # sent per device: the packed buffers, on each tick and direction the runtime moves one
    exchanged_bytes: float  # float32 gradients all-reduced over the stage axis after the ticks
    stash_bytes: float  # received values (v chunks x B microbatches), residuals (v x stash slots + 2 in use)
    tick_copy_bytes: float  # read and written per tick by the copies around the tick's switch
    packed_bytes: float  # the packed parameters a stage row's devices hold while the pipeline runs
    leaf_homes: tuple[int | None, ...]
    output_homes: tuple[int, ...]


def runtime_cost(cut: StageCut, sched: PL.Schedule) -> RuntimeCost:
    """The `RuntimeCost` of running ``cut`` with ``sched``."""
    homes_ = homes(cut, sched.num_stages)
    layouts = _layouts(cut, homes_)

    def nbytes(*packings):
        return sum(n * G.itemsize(d) for layout in packings for d, n in layout.lengths.items())

    ahead, back = PL.send_directions(sched).sum(axis=0)
    received = sched.virtual * sched.num_microbatches * nbytes(layouts.acts, layouts.cots)
    # Residuals: v x slots kept, plus the two slot-sized buffers a tick holds besides (XLA gives
    # lax.switch's operand and result buffers of their own: the slot read, the slot a forward packs).
    residuals = (sched.virtual * PL.stash_slots(sched) + 2) * nbytes(layouts.kept)
    # Each tick copies a residual slot out of the stash for its switch, the switch returns one (a
    # forward's residuals, or the slot it read: a conditional's result gets a buffer of its own) and
    # the tick stores it back in place; with several chunks per row it also slices the chunk's packed
    # parameters out (with one, that slice is the buffer itself).  Each is a read and a write.
    copies = 2 * (3 * nbytes(layouts.kept) + (nbytes(layouts.params) if sched.virtual > 1 else 0))
    return RuntimeCost(p2p_bytes=float(ahead * nbytes(layouts.acts) + back * nbytes(layouts.cots)),
                       exchanged_bytes=float(nbytes(layouts.exchanged)),
                       stash_bytes=float(received + residuals), tick_copy_bytes=float(copies),
                       packed_bytes=float(sched.virtual * nbytes(layouts.params)),
                       leaf_homes=homes_.leaves, output_homes=homes_.outputs)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Layouts:
    """How values travel: the packed parameters of each virtual stage, the values sent ahead and back,
    each virtual stage's kept gradient sums and the exchanged sums (float32)."""

    params: Packing
    acts: Packing
    cots: Packing
    kept: Packing
    local: Packing
    exchanged: Packing


def _layouts(cut: StageCut, homes_: Homes) -> _Layouts:
    graph = cut.split.graph
    dtype_of, size_of = (lambda t: graph.tensors[t].dtype), (lambda t: graph.tensors[t].size)
    leaf_tensor = [graph.ops[o].outputs[0] for o in graph.input_ops]
    as_f32 = lambda t: "float32"  # noqa: E731
    return _Layouts(
        params=packing([[leaf_tensor[i] for i in group] for group in homes_.packed], dtype_of, size_of),
        acts=packing(cut.ahead, dtype_of, size_of), cots=packing(cut.back, dtype_of, size_of),
        kept=packing(cut.kept, dtype_of, size_of),
        local=packing(homes_.local, as_f32, size_of), exchanged=packing([homes_.exchanged], as_f32, size_of))


def plan_bounds(stages, schedule: str) -> list[tuple[int, int]] | None:
    """The virtual stages' layer ranges a plan (or a stage DP choice) runs with, in virtual-stage order
    (chunk ``c`` of row ``s`` is virtual stage ``c * S + s``); None for interleaved stages without
    chunks (equal ranges)."""
    if any(stage.chunks for stage in stages):
        return [stage.ranges[c] for c in range(len(stages[0].ranges)) for stage in stages]
    if schedule == "interleaved":
        return None
    return [(stage.start, stage.end) for stage in stages]


def staged_step(plan, fun: Callable, mesh: jax.sharding.Mesh, data_axes: Sequence[str] = (), *,
                donate: bool = False) -> StagedStep:
    """``fun`` pipelined as ``plan`` says (its stages, schedule, microbatches and leaf specs) on ``mesh``,
    its stages data parallel over ``data_axes``."""
    sched = PL.schedule(plan.schedule, stages=len(plan.stages), microbatches=plan.microbatches)
    return StagedStep(fun, sched, mesh, plan_bounds(plan.stages, plan.schedule),
                      in_specs=[leaf.partition_spec for leaf in plan.inputs],
                      out_specs=[leaf.partition_spec for leaf in plan.outputs], donate=donate, data_axes=data_axes)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StagedProgram:
    """A pipelined plan made runnable (what `autoparallel` runs): like `emit.Program`, but several
    programs run per call (`StagedStep`), so ``lower(...).compile()`` gives a `StagedCompiled`."""

    plan: Any
    mesh: jax.sharding.Mesh
    graph: G.Graph
    staged: StagedStep
    in_shardings: Any  # per argument leaf: its home's sharding (a pytree like the arguments)

    def __call__(self, *dynamic_args):
        return self.staged(*dynamic_args)

    def lower(self, *dynamic_args) -> StagedLowered:
        return StagedLowered(staged=self.staged, args=dynamic_args)

    def trace(self, *dynamic_args):
        raise NotImplementedError("a pipelined step runs several programs (see StagedStep); use .lower(...)"
                                  ".compile().programs to inspect them")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StagedLowered:
    staged: StagedStep
    args: tuple

    def compile(self) -> StagedCompiled:
        return StagedCompiled(programs=self.staged.compile(*self.args))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StagedCompiled:
    """The compiled programs of one pipelined step, by name (see `StagedStep.compile`)."""

    programs: dict


def priced_step(compiled: StagedCompiled, schedule: PL.Schedule, mesh: jax.sharding.Mesh, cluster) -> dict:
    """Seconds per device of one step of a compiled pipelined step under ``cluster``, from its HLO:
    the packing (the slowest row), the tick loops (each tick as long as its slowest stage's branch,
    which the schedule's task table picks, plus its loop's sends and stash updates), what the pipeline
    program runs outside them (the exchange, an inlined one-tick loop's sends), and the updates (the
    slowest row's, then the whole mesh's).  The runtime runs one loop per run of ticks alike
    (`pipeline.send_directions`); loops are matched to those runs by trip count (equal counts run the
    same branches)."""
    from autoplan._src import hlo

    parts = hlo.loop_branches(compiled.programs["pipeline"], mesh, cluster)
    kinds, virtual, _ = PL.task_tables(schedule)
    n = schedule.num_stages * schedule.virtual
    index = np.where(kinds == 0, 0, np.where(kinds == 1, 1 + virtual, 1 + n + virtual))
    runs = sorted(PL.tick_runs(PL.send_directions(schedule)), key=lambda run: run[1] - run[0])
    loops = sorted(parts.loops, key=lambda loop: loop.trip_count)
    if [end - start for start, end, _ in runs] != [loop.trip_count for loop in loops] or \
            any(len(loop.branch_seconds) != 1 + 2 * n for loop in loops):
        raise ValueError(f"the pipeline program has tick loops of {[loop.trip_count for loop in loops]} trips and "
                         f"{[len(loop.branch_seconds) for loop in loops]} branches; the schedule runs "
                         f"{[end - start for start, end, _ in runs]} with {1 + 2 * n}")
    ticks = sum(max(loop.branch_seconds[i] for i in row)
                for (start, end, _), loop in zip(runs, loops) for row in index[start:end])

    def report(name, row):
        program = compiled.programs.get(name)
        return 0.0 if program is None else hlo.compiled_report(
            program, mesh if row is None else E.stage_row(mesh, row), cluster).step_seconds

    rows = range(schedule.num_stages)
    out = dict(pack=max(report(f"pack/{r}", r) for r in rows), ticks=ticks,
               sends=sum(loop.trip_count * loop.iteration_seconds for loop in loops), outside=parts.outside_seconds,
               update=max(report(f"update/{r}", r) for r in rows) + report("update/global", None))
    return out | {"step": sum(out.values())}


def abstract_arguments(graph: G.Graph) -> tuple:
    """The traced step's arguments as ShapeDtypeStructs (a tuple of pytrees, like the call's)."""
    structs = [jax.ShapeDtypeStruct(graph.tensors[graph.ops[o].outputs[0]].shape,
                                    graph.tensors[graph.ops[o].outputs[0]].dtype) for o in graph.input_ops]
    return jax.tree_util.tree_unflatten(graph.input_tree, structs)


def emit_staged(plan, fun: Callable, graph: G.Graph, mesh: jax.sharding.Mesh, *, donate: bool = True) -> StagedProgram:
    """A plan with several stages as a `StagedProgram` on ``mesh``."""
    staged = staged_step(plan, fun, mesh, plan.data_axes, donate=donate)
    args = abstract_arguments(graph)
    runs = [None if home is None or home < 0 else home for home in staged.homes(*args).leaves]
    planned = [leaf.stage for leaf in plan.inputs]
    if any(p is not None for p in planned) and planned != runs:
        i = next(i for i, (p, r) in enumerate(zip(planned, runs)) if p != r)
        where = "every stage" if runs[i] is None else f"stage {runs[i]}"
        raise E.PlanMismatchError(f"plan {plan.name!r} keeps {plan.inputs[i].path!r} on stage {planned[i]} but this "
                                  f"step's pipeline reads it on {where}; re-plan this step")
    return StagedProgram(plan=plan, mesh=mesh, graph=graph, staged=staged, in_shardings=staged.in_shardings(*args))
