"""Pipeline schedules as data, and the runtimes that execute them.

Three parts: `schedule` (GPipe, 1F1B and interleaved 1F1B tables); `accumulate`
(any traced step cut at its gradients and run over microbatches: gradient
accumulation, exact for a loss that is a mean over independent examples); and
`Pipeline`, the SPMD pipeline runtime for a model written as a sequence of
`Layer`s whose stage boundaries carry one activation shape (`gpt_layers`
adapts the zoo GPT).  A general traced step runs as a pipeline through
`autoplan._src.staging`, which shares this module's tick loop (`run_ticks`).

A schedule is a table of `Task`s ``(tick, stage, microbatch, kind, chunk)``:
at ``tick`` the devices of pipeline ``stage`` run the forward ("F") or
backward ("B") pass of ``microbatch`` through their model ``chunk`` (always 0
except for interleaved 1F1B, where each device holds ``v`` chunks and chunk
``c`` of stage ``s`` is virtual stage ``c * S + s``).  Every task takes one
tick: a forward and a backward of one chunk are assumed to cost the same, the
convention under which the published bubble formulas are stated.

Schedules are built from each stage's *order* of tasks (as Megatron-LM and
JaxPP write them) by a list-scheduling simulation: a task runs at the first
tick at which its stage is free and its inputs exist (the forward of the
previous virtual stage, or the backward of the next one, at an earlier tick).

Bubble fraction = idle slots / all slots = 1 - busy / (S * ticks); with
``S`` stages, ``B`` microbatches and ``v`` chunks per stage:

* GPipe (Huang et al. 2019): all forwards, then all backwards:
  ``(S - 1) / (B + S - 1)``.
* 1F1B (PipeDream-Flush; Narayanan et al. 2021): the same bubble, but stage
  ``s`` holds at most ``S - s`` microbatches' activations instead of ``B``.
* Interleaved 1F1B (Megatron-LM, Narayanan et al. SC'21, section 2.2.2): the
  bubble time shrinks by ``v``: ``(S - 1) / (v * B + S - 1)`` of the step
  (the paper's ``(p - 1) / (v * m)`` is the same bubble relative to the ideal
  time), for ``B`` a multiple of ``S``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autoplan._src import compat
from autoplan._src import graph as G

FORWARD = "F"
BACKWARD = "B"
SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, order=True)
class Task:
    """One unit of pipeline work: a forward or backward of one microbatch through one stage's chunk."""

    tick: int
    stage: int
    microbatch: int
    kind: str  # FORWARD or BACKWARD
    chunk: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """A pipeline schedule: which stage runs which microbatch's forward or backward at each tick.

    >>> s = schedule("1f1b", stages=2, microbatches=3)
    >>> print(s)
    1f1b: 2 stages, 3 microbatches, 8 ticks, bubble 25.0%
    stage 0 | F0 F1 .  B0 F2 B1 .  B2
    stage 1 | .  F0 B0 F1 B1 F2 B2 .
    >>> s.bubble_fraction == (2 - 1) / (3 + 2 - 1)
    True
    """

    name: str
    num_stages: int
    num_microbatches: int
    virtual: int
    tasks: tuple[Task, ...]

    @property
    def num_ticks(self) -> int:
        return 1 + max(t.tick for t in self.tasks)

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks."""
        return 1.0 - len(self.tasks) / (self.num_stages * self.num_ticks)

    def grid(self) -> list[list[Task | None]]:
        """``grid[stage][tick]``: the task a stage runs at a tick, or None when it idles."""
        cells: list[list[Task | None]] = [[None] * self.num_ticks for _ in range(self.num_stages)]
        for task in self.tasks:
            cells[task.stage][task.tick] = task
        return cells

    def in_flight(self, stage: int) -> int:
        """The most microbatches whose forward has run on ``stage`` and backward has not (any chunk)."""
        live = peak = 0
        for task in sorted((t for t in self.tasks if t.stage == stage), key=lambda t: t.tick):
            live += 1 if task.kind == FORWARD else -1
            peak = max(peak, live)
        return peak

    def __str__(self) -> str:
        chunk_name = (lambda c: "abcdefghijklmnopqrstuvwxyz"[c]) if self.virtual > 1 else (lambda c: "")
        cells = [[f"{t.kind}{t.microbatch}{chunk_name(t.chunk)}" if t else "." for t in row] for row in self.grid()]
        width = max(len(c) for row in cells for c in row)
        head = (f"{self.name}: {self.num_stages} stages, {self.num_microbatches} microbatches"
                + (f", {self.virtual} chunks per stage" if self.virtual > 1 else "")
                + f", {self.num_ticks} ticks, bubble {100 * self.bubble_fraction:.1f}%")
        rows = [f"stage {s} | " + " ".join(c.ljust(width) for c in row).rstrip() for s, row in enumerate(cells)]
        return "\n".join([head, *rows])


def bubble_formula(name: str, stages: int, microbatches: int, virtual: int = 1) -> float:
    """The published bubble fraction of a schedule (idle share of the step, F and B of equal cost).

    >>> bubble_formula("gpipe", 4, 8)
    0.2727272727272727
    """
    v = virtual if name == "interleaved" else 1
    return (stages - 1) / (v * microbatches + stages - 1)


def schedule(name: str, *, stages: int, microbatches: int, virtual: int = 2) -> Schedule:
    """Build the schedule table ``name`` ("gpipe", "1f1b" or "interleaved") for a pipeline.

    ``virtual`` (chunks per stage) only applies to "interleaved", which also
    needs ``microbatches`` to be a multiple of ``stages`` (Megatron-LM's
    grouping of microbatches).

    >>> schedule("gpipe", stages=4, microbatches=8).num_ticks
    22
    """
    if stages < 1 or microbatches < 1:
        raise ValueError(f"a pipeline needs stages >= 1 and microbatches >= 1, got {stages} and {microbatches}")
    if name == "gpipe":
        orders = [[(FORWARD, m, 0) for m in range(microbatches)] + [(BACKWARD, m, 0) for m in range(microbatches)]
                  for _ in range(stages)]
        virtual = 1
    elif name == "1f1b":
        orders = [_one_f_one_b([(m, 0) for m in range(microbatches)], min(stages - s - 1, microbatches),
                               [(m, 0) for m in range(microbatches)]) for s in range(stages)]
        virtual = 1
    elif name == "interleaved":
        orders = _interleaved_orders(stages, microbatches, virtual)
    else:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}")
    tasks = _simulate(orders, stages, virtual)
    return Schedule(name=name, num_stages=stages, num_microbatches=microbatches, virtual=virtual,
                    tasks=tuple(sorted(tasks, key=lambda t: (t.tick, t.stage))))


def _one_f_one_b(forwards: Sequence[tuple[int, int]], warmup: int,
                 backwards: Sequence[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """Warm-up forwards, then alternate one forward and one backward, then the remaining backwards."""
    order = [(FORWARD, m, c) for m, c in forwards[:warmup]]
    rest_f, rest_b = list(forwards[warmup:]), list(backwards)
    while rest_f:
        m, c = rest_f.pop(0)
        order.append((FORWARD, m, c))
        m, c = rest_b.pop(0)
        order.append((BACKWARD, m, c))
    order += [(BACKWARD, m, c) for m, c in rest_b]
    return order


def _interleaved_orders(stages: int, microbatches: int, virtual: int) -> list[list[tuple[str, int, int]]]:
    """Megatron-LM's interleaved 1F1B order per stage (``forward_backward_pipelining_with_interleaving``)."""
    if virtual < 1:
        raise ValueError(f"interleaved 1F1B needs virtual >= 1 chunks per stage, got {virtual}")
    if microbatches % stages:
        raise ValueError(f"interleaved 1F1B runs microbatches in groups of the stage count: {microbatches} "
                         f"microbatches is not a multiple of {stages} stages; pass a multiple of {stages}")
    total = virtual * microbatches

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // stages) % virtual
        return (k // (stages * virtual)) * stages + k % stages, (virtual - 1 - chunk) if backward else chunk

    forwards = [unit(k, False) for k in range(total)]
    backwards = [unit(k, True) for k in range(total)]
    orders = []
    for s in range(stages):
        warmup = total if microbatches == stages else min((stages - s - 1) * 2 + (virtual - 1) * stages, total)
        orders.append(_one_f_one_b(forwards, warmup, backwards))
    return orders


def _simulate(orders: list[list[tuple[str, int, int]]], stages: int, virtual: int) -> list[Task]:
    """Assign ticks: each stage runs its order in sequence, a task waits for its producer's earlier tick."""
    done: dict[tuple[str, int, int], int] = {}  # (kind, microbatch, virtual stage) -> tick
    position = [0] * stages
    free = [0] * stages
    tasks: list[Task] = []
    last = stages * virtual - 1
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(stages):
            if position[s] == len(orders[s]):
                continue
            kind, m, chunk = orders[s][position[s]]
            vs = chunk * stages + s
            if kind == FORWARD:
                deps = [(FORWARD, m, vs - 1)] if vs > 0 else []
            else:
                deps = [(FORWARD, m, vs)] + ([(BACKWARD, m, vs + 1)] if vs < last else [])
            if any(d not in done for d in deps):
                continue
            tick = max([free[s]] + [done[d] + 1 for d in deps])
            done[(kind, m, vs)] = tick
            tasks.append(Task(tick=tick, stage=s, microbatch=m, kind=kind, chunk=chunk))
            free[s] = tick + 1
            position[s] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise ValueError("the schedule's per-stage orders deadlock (a task waits on one that never runs)")
    return tasks


# ---------------------------------------------------------------------------
# Gradient accumulation: the step split at its gradients, run over microbatches.


class MicrobatchError(ValueError):
    """A step cannot be run over microbatches (batch not divisible, examples mixed across the batch)."""


def flat_items(closed) -> list[tuple[str, Any]]:
    """The step's jaxpr as the flat list `trace` builds its Graph from with ``opaque_structure``: item i
    is Graph op i.

    Items are ("constant", value), ("input", None), ("equation", eqn) and
    ("output", None), inlined exactly as `autoplan._src.trace` inlines; a loop,
    branch or remat region is one equation (its literal operands constants).
    """
    items: list[tuple[str, Any]] = [("constant", value) for value in closed.consts]
    items += [("input", None)] * len(closed.jaxpr.invars)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            body = compat.inline_body(eqn)
            if body is None:
                if compat.structure_kind(eqn) is not None:
                    items.extend(("constant", compat.literal_value(atom)) for atom in eqn.invars
                                 if compat.is_literal(atom))
                items.append(("equation", eqn))
                continue
            sub_jaxpr, consts = body
            items.extend(("constant", value) for value in consts)
            items.extend(("constant", compat.literal_value(atom)) for atom in eqn.invars if compat.is_literal(atom))
            walk(sub_jaxpr)
            items.extend(("constant", compat.literal_value(atom))
                         for atom in sub_jaxpr.outvars if compat.is_literal(atom))

    walk(closed.jaxpr)
    for atom in closed.jaxpr.outvars:
        if compat.is_literal(atom):
            items.append(("constant", compat.literal_value(atom)))
        items.append(("output", None))
    return items


def evaluate_ops(graph: G.Graph, items: Sequence[tuple[str, Any]], ops: Sequence[int], env: dict,
                 pins: Mapping[int, tuple[dict, dict]] | None = None) -> dict:
    """Run Graph ops ``ops`` (in order) on ``env`` (tensor id -> value); constants are filled in.  ``pins``
    (`emit.microbatch_pins`) pin an op's results and the operands it reads resharded."""
    from autoplan._src import emit as E

    pins = pins or {}
    for i in ops:
        op = graph.ops[i]
        kind, payload = items[i]
        if kind == "constant":
            env[op.outputs[0]] = payload
        elif kind == "equation":
            results, operands = pins.get(i, ({}, {}))
            invals = [compat.literal_value(atom) if t == G.LITERAL else env[t]
                      for t, atom in zip(op.inputs, payload.invars)]
            outs = compat.bind_equation(payload, E._pin(invals, operands))
            env.update(zip(op.outputs, E._pin(list(outs), results)))
    return env


def ancestors(graph: G.Graph, tensors: Sequence[int], known: set[int] = frozenset()) -> list[int]:
    """The ops (in order) needed to compute ``tensors`` when the tensors in ``known`` are given."""
    needed: set[int] = set()
    stack = [t for t in tensors if t not in known]
    seen = set(stack)
    while stack:
        producer = graph.ops[graph.tensors[stack.pop()].producer]
        if producer.id in needed:
            continue
        needed.add(producer.id)
        for t in producer.inputs:
            if t != G.LITERAL and t not in known and t not in seen:
                seen.add(t)
                stack.append(t)
    return sorted(needed)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GradientSplit:
    """A step cut at its gradients: what runs per microbatch and what runs once.

    ``cut`` are the tensors the per-microbatch part hands to the update: the
    gradients and the loss (forward/backward results of the batch that the
    optimizer or the step's outputs read).
    """

    graph: G.Graph
    items: tuple
    batch_inputs: tuple[int, ...]  # input leaf indices that are the batch
    cut: tuple[int, ...]
    gradient_ops: tuple[int, ...]
    update_ops: tuple[int, ...]


def split_at_gradients(graph: G.Graph, batch_inputs: Sequence[int]) -> GradientSplit:
    """Slice ``graph`` into the per-microbatch gradient part and the once-per-step update part."""
    equation = (G.FORWARD, G.BACKWARD, G.OPTIMIZER)
    depends = [False] * len(graph.tensors)
    for leaf in batch_inputs:
        depends[graph.ops[graph.input_ops[leaf]].outputs[0]] = True
    op_depends = [False] * len(graph.ops)
    for op in graph.ops:
        if op.role in equation and any(t != G.LITERAL and depends[t] for t in op.inputs):
            op_depends[op.id] = True
            for t in op.outputs:
                depends[t] = True
    in_gradient = [op_depends[op.id] and op.role in (G.FORWARD, G.BACKWARD) for op in graph.ops]
    cut = sorted({t for op in graph.ops if not in_gradient[op.id] for t in op.inputs
                  if t != G.LITERAL and in_gradient[graph.tensors[t].producer]})
    outputs = [graph.ops[o].inputs[0] for o in graph.output_ops]
    update = ancestors(graph, outputs, known=set(cut))
    for i in update:
        op = graph.ops[i]
        if op.role == G.INPUT and graph.input_ops.index(i) in batch_inputs:
            reader = next(graph.ops[c] for c, _ in graph.consumers[op.outputs[0]] if not in_gradient[c])
            raise MicrobatchError(
                f"the step reads the batch leaf {op.path!r} outside its forward and backward pass ({reader.label} "
                f"at {reader.source}), so it cannot be split at the gradients into microbatches; compute "
                "everything that reads the batch inside the differentiated loss function")
    for t in cut:
        dtype = graph.tensors[t].dtype
        if not any(dtype.startswith(k) for k in ("float", "bfloat", "complex")):
            producer = graph.ops[graph.tensors[t].producer]
            raise MicrobatchError(
                f"{producer.label} at {producer.source} hands a {dtype} value to the optimizer; only float "
                "gradients and losses can be averaged over microbatches")
    _check_examples_independent(graph, batch_inputs, in_gradient)
    return GradientSplit(graph=graph, items=tuple(flat_items(graph.closed_jaxpr)), batch_inputs=tuple(batch_inputs),
                         cut=tuple(cut), gradient_ops=tuple(ancestors(graph, cut)), update_ops=tuple(update))


_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                         "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
                         "reduce_precision_sum"})


def _check_examples_independent(graph: G.Graph, batch_inputs: Sequence[int], in_gradient: Sequence[bool]) -> None:
    """Refuse a forward pass that mixes examples: a reduction over the batch axis whose result meets
    a tensor that still has the batch axis (batch norm's ``x - mean(x, axis=0)``).  A reduction that
    only ends in the loss (a mean over examples) is fine: averaging it over microbatches is exact.

    The batch axis is followed through elementwise ops, broadcasts, reshapes, transposes,
    reductions and dot_general; where a rule is missing it is the one dimension whose size is the
    batch size, if there is exactly one.
    """
    axis: dict[int, int] = {}
    mixed: set[int] = set()
    batch_sizes = set()
    for leaf in batch_inputs:
        t = graph.ops[graph.input_ops[leaf]].outputs[0]
        if graph.tensors[t].shape:
            axis[t] = 0
            batch_sizes.add(graph.tensors[t].shape[0])
    for op in graph.ops:
        if not in_gradient[op.id] or op.role != G.FORWARD:
            continue
        ins = [(k, t) for k, t in enumerate(op.inputs) if t != G.LITERAL]
        carried = [(k, axis[t]) for k, t in ins if t in axis]
        is_mixed = any(t in mixed for _, t in ins)
        reduced, out_axes = _batch_axis_rule(op, carried, batch_sizes)
        if is_mixed and (carried or any(a is not None for a in out_axes)):
            raise MicrobatchError(
                f"{op.label} at {op.source} combines a value reduced over the batch (a statistic of several "
                "examples, as batch norm computes) with per-example values, so the step's result depends on how "
                "the batch is split: microbatching (gradient accumulation, pipelining) would change the "
                "numerics. Use a per-example normalization (LayerNorm, GroupNorm) or run without microbatches")
        for k, t in enumerate(op.outputs):
            if reduced or is_mixed:
                mixed.add(t)
            elif out_axes[k] is not None:
                axis[t] = out_axes[k]


def _batch_axis_rule(op: G.Op, carried: list[tuple[int, int]], batch_sizes: set[int]):
    """(reduces over the batch axis?, batch axis of each output or None)."""
    none = [None] * len(op.outputs)
    if not carried:
        return False, none
    k, a = carried[0]
    in_shape = op.input_shapes[k]
    name, params = op.primitive, op.params
    if name in _REDUCTIONS and "axes" in params:
        axes = tuple(params["axes"])
        if a in axes:
            return True, none
        return False, [a - sum(1 for x in axes if x < a)] * len(op.outputs)
    if name in _REDUCTIONS and "axis" in params:
        return (params["axis"] == a), ([a] * len(op.outputs) if params["axis"] != a else none)
    if name == "broadcast_in_dim":
        return False, [params["broadcast_dimensions"][a]]
    if name == "transpose":
        return False, [list(params["permutation"]).index(a)]
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        contract, batch = (lc, lb) if k == 0 else (rc, rb)
        if a in contract:
            return True, none
        if a in batch:
            return False, [list(batch).index(a)]
        rank_other = len(op.input_shapes[1 - k])
        free = [d for d in range(len(in_shape)) if d not in contract and d not in batch]
        other_free = rank_other - len(lc) - len(lb)
        return False, [len(lb) + (0 if k == 0 else other_free) + free.index(a)]
    if name == "squeeze":
        dims = tuple(params["dimensions"])
        return (a in dims), [None if a in dims else a - sum(1 for d in dims if d < a)]
    if name == "gather" and k == 1:
        offset = tuple(params["dimension_numbers"].offset_dims)
        batch_out = [d for d in range(len(op.output_shapes[0])) if d not in offset]
        return False, [batch_out[a] if a < len(batch_out) and a < len(in_shape) - 1 else None]
    if name == "reshape":
        before = math.prod(in_shape[:a])
        out = op.output_shapes[0]
        for d in range(len(out)):
            if math.prod(out[:d]) == before and out[d] == in_shape[a]:
                return False, [d]
        return False, none
    out_axes = []
    for shape in op.output_shapes:
        if shape == in_shape or (len(shape) == len(in_shape) and shape[a] == in_shape[a]):
            out_axes.append(a)
        else:
            hits = [d for d, n in enumerate(shape) if n in batch_sizes]
            out_axes.append(hits[0] if len(hits) == 1 else None)
    return False, out_axes


def _batch_leaves(graph: G.Graph, name: str) -> list[int]:
    return [i for i, path in enumerate(graph.input_paths) if path == name or path.startswith(name + "/")]


def microbatch_shapes(args: Sequence[Any], batch_argnum: int, microbatches: int, names: Sequence[str]):
    """``args`` with every batch leaf's leading axis cut by ``microbatches``, as ShapeDtypeStructs."""
    if microbatches < 1:
        raise MicrobatchError(f"microbatches must be >= 1, got {microbatches}")

    def cut(keypath, leaf):
        from autoplan._src.trace import _path_string

        path = _path_string(names[batch_argnum], keypath)
        if not getattr(leaf, "shape", ()):
            raise MicrobatchError(f"batch leaf {path!r} is a scalar: every batch leaf needs a leading batch axis")
        if leaf.shape[0] % microbatches:
            divisors = [d for d in range(1, leaf.shape[0] + 1) if leaf.shape[0] % d == 0]
            raise MicrobatchError(
                f"batch leaf {path!r} has {leaf.shape[0]} examples, which do not split into {microbatches} equal "
                f"microbatches; pass microbatches= one of {divisors} or a batch that {microbatches} divides")
        return jax.ShapeDtypeStruct((leaf.shape[0] // microbatches, *leaf.shape[1:]), leaf.dtype)

    shapes = [jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), a) for a in args]
    shapes[batch_argnum] = jax.tree_util.tree_map_with_path(cut, args[batch_argnum])
    return shapes


class Accumulated:
    """``step`` run over microbatches: gradients and loss averaged, the optimizer applied once.

    Built by `accumulate`; call it like the step (inside or outside ``jax.jit``).
    The split is traced once per argument signature.  With ``data_axes`` (of
    ``mesh``) the microbatch loop runs data parallel, as DDP does: manual over
    those axes, each replica loops over its share of the batch, and the sums
    are averaged over the replicas once, after the loop (left to XLA, the
    loop's carried gradients are all-reduced every microbatch).
    """

    def __init__(self, step: Callable, microbatches: int, batch_argnum: int, *,
                 mesh: jax.sharding.Mesh | None = None, data_axes: Sequence[str] = (), anchors: Sequence = ()):
        self.step, self.microbatches, self.batch_argnum = step, microbatches, batch_argnum
        self.mesh, self.data_axes, self.anchors = mesh, tuple(data_axes), tuple(anchors)
        self.replicas = math.prod(mesh.shape[axis] for axis in self.data_axes) if self.data_axes else 1
        self._splits: dict[Any, GradientSplit] = {}

    def split(self, *args) -> GradientSplit:
        """The step cut at its gradients, traced at one replica's share of a microbatch."""
        from autoplan._src import trace as T

        batch_argnum = self.batch_argnum % len(args)
        key = jax.tree_util.tree_structure(args), tuple((tuple(x.shape), str(x.dtype))
                                                         for x in jax.tree_util.tree_leaves(args))
        if key not in self._splits:
            names = T._argument_names(self.step, len(args))
            for leaf in jax.tree_util.tree_leaves(args[batch_argnum]):
                if self.replicas > 1 and leaf.shape and leaf.shape[0] % (self.microbatches * self.replicas):
                    raise MicrobatchError(
                        f"a batch of {leaf.shape[0]} examples does not split into {self.microbatches} microbatches "
                        f"x {self.replicas} data-parallel replicas ({self.data_axes}); use a batch that "
                        f"{self.microbatches * self.replicas} divides, fewer microbatches, or no data axes")
            micro = microbatch_shapes(args, batch_argnum, self.microbatches * self.replicas, names)
            full = T.trace(self.step, *[jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), a)
                                        for a in args], opaque_structure=True)
            batch = _batch_leaves(full, names[batch_argnum])
            split_at_gradients(full, batch)  # examples must not mix at the real batch size
            graph = T.trace(self.step, *micro, opaque_structure=True)
            self._splits[key] = split_at_gradients(graph, _batch_leaves(graph, names[batch_argnum]))
        return self._splits[key]

    def __call__(self, *args):
        from autoplan._src import emit as E

        split = self.split(*args)
        leaves = jax.tree_util.tree_leaves(args)
        batch = set(split.batch_inputs)
        fixed = [i for i in range(len(leaves)) if i not in batch]
        sums = self._loop(split, fixed)
        if self.data_axes:
            spec = jax.sharding.PartitionSpec
            sums = jax.shard_map(sums, mesh=self.mesh, in_specs=(spec(), spec(self.data_axes)), out_specs=spec(),
                                 axis_names=set(self.data_axes), check_vma=False)
        total = sums([leaves[i] for i in fixed], [leaves[i] for i in split.batch_inputs])
        # The update runs once, outside the loop, on the whole mesh: its ops keep the plan's layouts.
        pins = E.microbatch_pins(self.anchors, split.graph, self.mesh) if self.anchors else None
        return run_update(split, leaves, {t: acc / self.microbatches for t, acc in zip(split.cut, total)}, pins)

    def _loop(self, split: GradientSplit, fixed: Sequence[int]) -> Callable:
        """``(fixed leaves, batch leaves) -> sums of the cut values over the microbatches`` (averaged over
        the data-parallel replicas)."""
        from autoplan._src import emit as E

        graph, b = split.graph, self.microbatches

        def sums(fixed_values, batch_values):
            # Inside the manual region the pins name its abstract mesh (data axes Manual).
            mesh = jax.sharding.get_abstract_mesh() if self.data_axes else self.mesh
            pins = E.microbatch_pins(self.anchors, graph, mesh, self.data_axes) if self.anchors else {}
            env_fixed = {graph.ops[graph.input_ops[i]].outputs[0]: x for i, x in zip(fixed, fixed_values)}
            stacked = [jnp.reshape(x, (b, x.shape[0] // b, *x.shape[1:])) for x in batch_values]

            def one(total, micro):
                env = dict(env_fixed)
                env.update({graph.ops[graph.input_ops[i]].outputs[0]: x for i, x in zip(split.batch_inputs, micro)})
                env = evaluate_ops(graph, split.items, split.gradient_ops, env, pins)
                return [acc + env[t].astype(acc.dtype) for acc, t in zip(total, split.cut)], None

            zeros = [jnp.zeros(graph.tensors[t].shape, graph.tensors[t].dtype) for t in split.cut]
            if self.anchors:  # the sums keep the layout the plan makes each in (else whole): XLA would pick
                zeros = [jax.lax.with_sharding_constraint(z, self._sum_layout(pins, graph, t, mesh))
                         for z, t in zip(zeros, split.cut)]
            total, _ = jax.lax.scan(one, zeros, stacked)
            return [jax.lax.pmean(x, self.data_axes) for x in total] if self.data_axes else total
        return sums

    @staticmethod
    def _sum_layout(pins, graph: G.Graph, tensor: int, mesh) -> jax.sharding.NamedSharding:
        producer = graph.ops[graph.tensors[tensor].producer]
        results = pins.get(producer.id, ({}, {}))[0]
        index = producer.outputs.index(tensor)
        return results.get(index, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def run_update(split: GradientSplit, leaves: Sequence[Any], averaged: dict,
               pins: Mapping[int, tuple[dict, dict]] | None = None):
    """The update part of a split step, once: the step's input ``leaves`` (the batch is not read) and the
    ``averaged`` gradients and losses (cut tensor -> value) in, the step's outputs (a pytree) out.  Cut
    values missing from ``averaged`` (made from constants and inputs alone) are computed here.  ``pins``
    (`emit.microbatch_pins`) fix the update ops' layouts (left to XLA, it may compute an update in an
    optimizer state's split and gather the parameters after)."""
    graph = split.graph
    batch = set(split.batch_inputs)
    env = {graph.ops[graph.input_ops[i]].outputs[0]: x for i, x in enumerate(leaves) if i not in batch}
    env.update(averaged)
    missing = [t for t in split.cut if t not in env]
    if missing:
        env = evaluate_ops(graph, split.items, ancestors(graph, missing, known=set(env)), env)
    env = evaluate_ops(graph, split.items, split.update_ops, env, pins)
    outs = [env[graph.ops[o].inputs[0]] for o in graph.output_ops]
    return jax.tree_util.tree_unflatten(graph.output_tree, outs)


def accumulate(step: Callable, *, microbatches: int, batch_argnum: int = -1) -> Accumulated:
    """Run ``step`` over ``microbatches`` microbatches of its batch argument, updating once.

    The traced step is cut at its gradients: the forward and backward ops that
    read the batch run once per microbatch (a ``lax.scan``), the values they
    hand to the optimizer (gradients, the loss) are averaged, and the optimizer
    runs once.  This equals the full-batch step when the loss is a mean over
    examples and the forward pass treats examples independently; a step whose
    forward mixes examples (batch norm) is refused with `MicrobatchError`.

    >>> import jax, jax.numpy as jnp
    >>> def step(w, batch):
    ...     loss, g = jax.value_and_grad(lambda w: ((batch["x"] @ w) ** 2).mean())(w)
    ...     return w - 0.1 * g, loss
    >>> w, batch = jnp.ones((4, 2)), {"x": jnp.arange(32.0).reshape(8, 4) / 32}
    >>> full, acc = step(w, batch), jax.jit(accumulate(step, microbatches=4))(w, batch)
    >>> bool(jnp.allclose(full[0], acc[0])), bool(jnp.allclose(full[1], acc[1]))
    (True, True)
    """
    return Accumulated(step, microbatches, batch_argnum)


# ---------------------------------------------------------------------------
# The SPMD pipeline runtime: one jit program, shard_map manual over "stage".


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Layer:
    """One layer of a model written as a sequence: ``apply(params, x, batch)``.

    ``keys`` are the top-level entries of the parameter dict the layer owns.
    The first layer ignores ``x`` and reads the batch (embeddings); the last
    returns the scalar loss of its microbatch (a mean over its examples).
    Every layer in between maps an activation to one of the same shape.
    """

    name: str
    keys: tuple[str, ...]
    apply: Callable[[Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Packing:
    """Where each virtual stage's parameters sit in its flat, padded buffer."""

    keys: tuple[tuple[str, ...], ...]  # per virtual stage
    treedefs: tuple[Any, ...]
    shapes: tuple[tuple[tuple[int, ...], ...], ...]
    length: int
    dtype: Any


def even_bounds(num_layers: int, parts: int, *, what: str = "the model has only {n} layers") -> list[tuple[int, int]]:
    """``num_layers`` layers in ``parts`` contiguous ranges of equal size (the first get the remainder);
    ``what`` names the layers in the error when there are fewer than ``parts``.

    >>> even_bounds(5, 2)
    [(0, 3), (3, 5)]
    """
    if parts > num_layers:
        raise ValueError(f"{parts} pipeline stages (x chunks) but {what.format(n=num_layers)}; "
                         f"use at most {num_layers} stages")
    size, extra = divmod(num_layers, parts)
    ends = list(itertools.accumulate(size + (k < extra) for k in range(parts)))
    return list(zip([0] + ends[:-1], ends))


class Pipeline:
    """A model's layers cut into pipeline stages, run as one SPMD program on a ``stage`` mesh axis.

    ``bounds`` gives the layer ranges of the ``S * v`` virtual stages in order
    (``v`` chunks per device for interleaved 1F1B; virtual stage ``c * S + s``
    runs on device row ``s``).  Parameters live packed: one flat buffer per
    virtual stage, padded to a common length and stacked ``[S, v, length]``
    with the first axis sharded over ``stage``, so no device holds another
    stage's weights.  Inside ``jax.shard_map`` (manual over ``stage`` only, so
    other mesh axes stay automatic) a loop over the schedule's ticks runs each
    device's task with ``lax.switch``: a forward sends its activation to the
    next stage, a backward recomputes the stage's forward from its saved input
    (activation checkpointing at stage boundaries), takes the VJP, accumulates
    the parameter gradient and sends the input cotangent back, all with
    ``lax.ppermute``.  The loss is the mean of the microbatch losses.
    """

    def __init__(self, layers: Sequence[Layer], bounds: Sequence[tuple[int, int]], schedule: Schedule):
        stages, v = schedule.num_stages, schedule.virtual
        if len(bounds) != stages * v:
            raise ValueError(f"{len(bounds)} layer ranges for {stages} stages x {v} chunks; give one per virtual stage")
        if [b[0] for b in bounds] != [0] + [b[1] for b in bounds[:-1]] or bounds[-1][1] != len(layers) \
                or any(b[1] <= b[0] for b in bounds):
            raise ValueError(f"layer ranges {list(bounds)} must cover layers 0..{len(layers)} in order, none empty")
        self.layers, self.bounds, self.schedule = tuple(layers), tuple(bounds), schedule
        self._packing: _Packing | None = None

    @classmethod
    def even(cls, layers: Sequence[Layer], schedule: Schedule) -> Pipeline:
        """Equal layer counts per virtual stage (the first ones get the remainder)."""
        return cls(layers, even_bounds(len(layers), schedule.num_stages * schedule.virtual), schedule)

    # -- parameters, packed per stage ---------------------------------------------------------
    def _stage_params(self, params, vs: int) -> dict:
        start, end = self.bounds[vs]
        return {k: params[k] for layer in self.layers[start:end] for k in layer.keys}

    def packing(self, params) -> _Packing:
        if self._packing is None:
            trees = [self._stage_params(params, vs) for vs in range(len(self.bounds))]
            leaves = [jax.tree_util.tree_leaves(t) for t in trees]
            dtypes = {jnp.dtype(x.dtype) for ls in leaves for x in ls}
            if len(dtypes) != 1:
                raise ValueError(f"pipeline parameters must share one dtype to be packed per stage, got {dtypes}")
            self._packing = _Packing(
                keys=tuple(tuple(t) for t in trees), treedefs=tuple(jax.tree_util.tree_structure(t) for t in trees),
                shapes=tuple(tuple(tuple(x.shape) for x in ls) for ls in leaves),
                length=max(sum(math.prod(x.shape) for x in ls) for ls in leaves), dtype=dtypes.pop())
        return self._packing

    def pack(self, params) -> jax.Array:
        """``params`` (the model's dict) as ``[S, v, length]``: row s, chunk c = virtual stage c * S + s."""
        packing = self.packing(params)
        stages, v = self.schedule.num_stages, self.schedule.virtual
        rows = []
        for vs in range(stages * v):
            flat = [jnp.ravel(x) for x in jax.tree_util.tree_leaves(self._stage_params(params, vs))]
            flat = jnp.concatenate(flat) if flat else jnp.zeros((0,), packing.dtype)
            rows.append(jnp.pad(flat, (0, packing.length - flat.shape[0])))
        return jnp.stack(rows).reshape(v, stages, packing.length).transpose(1, 0, 2)

    def unpack(self, packed: jax.Array) -> dict:
        """The model's parameter dict from a packed ``[S, v, length]`` buffer."""
        stages = self.schedule.num_stages
        params = {}
        for vs in range(len(self.bounds)):
            params.update(self._unflatten(packed[vs % stages, vs // stages], vs))
        return params

    def _unflatten(self, flat: jax.Array, vs: int):
        packing = self._packing
        leaves, offset = [], 0
        for shape in packing.shapes[vs]:
            size = math.prod(shape)
            leaves.append(jax.lax.slice_in_dim(flat, offset, offset + size).reshape(shape))
            offset += size
        return jax.tree_util.tree_unflatten(packing.treedefs[vs], leaves)

    # -- the program -------------------------------------------------------------------------------
    def _run(self, vs: int, flat, x, batch):
        params = self._unflatten(flat, vs)
        start, end = self.bounds[vs]
        for layer in self.layers[start:end]:
            x = layer.apply({k: params[k] for k in layer.keys}, x, batch)
        return x

    def activation_shape(self, params, batch) -> jax.ShapeDtypeStruct:
        """The activation between layers for one microbatch; every boundary must have this shape."""
        micro = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((x.shape[0] // self.schedule.num_microbatches, *x.shape[1:]), x.dtype),
            batch)
        x = None
        shapes = []
        for layer in self.layers[:-1]:
            x = jax.eval_shape(layer.apply, {k: params[k] for k in layer.keys}, x, micro)
            shapes.append((layer.name, x))
        first = shapes[0][1]
        for name, shape in shapes:
            if (shape.shape, shape.dtype) != (first.shape, first.dtype):
                raise ValueError(f"layer {name!r} returns {shape.shape} {shape.dtype} but the first layer returns "
                                 f"{first.shape} {first.dtype}: stage boundaries must carry one activation shape")
        return first

    def p2p_bytes(self, params_for_shapes, batch_for_shapes) -> float:
        """Bytes each device sends point-to-point per step: one activation ahead or one cotangent back on
        each tick and direction `send_directions` moves (zeros on a row with nothing to send, as a
        collective runs on every device)."""
        act = self.activation_shape(params_for_shapes, batch_for_shapes)
        sends = int(send_directions(self.schedule).sum())
        return float(sends * math.prod(act.shape) * jnp.dtype(act.dtype).itemsize)

    def gradients(self, mesh: jax.sharding.Mesh, params_for_shapes, batch_for_shapes) -> Callable:
        """``(packed, batch) -> (packed gradients, mean loss)`` as one shard_map over the ``stage`` axis."""
        sched = self.schedule
        stages, v, b = sched.num_stages, sched.virtual, sched.num_microbatches
        n_virtual = stages * v
        if mesh.shape.get("stage") != stages:
            raise ValueError(f"the pipeline needs a 'stage' mesh axis of size {stages}; mesh has {dict(mesh.shape)}")
        for leaf in jax.tree_util.tree_leaves(batch_for_shapes):
            if leaf.shape[0] % b:
                raise MicrobatchError(f"a batch of {leaf.shape[0]} examples does not split into {b} microbatches; "
                                      f"pass a number of microbatches that divides {leaf.shape[0]}")
        packing = self.packing(params_for_shapes)
        act = self.activation_shape(params_for_shapes, batch_for_shapes)
        zeros_act = jnp.zeros(act.shape, act.dtype)
        zeros_grad = jnp.zeros((packing.length,), packing.dtype)
        no_loss = jnp.zeros((), jnp.float32)

        def idle(flat, x, cot, kept, batch):
            return zeros_act, (zeros_grad, no_loss), zeros_act, kept

        def forward(vs):
            def run(flat, x, cot, kept, batch):
                out = self._run(vs, flat, x, batch)
                if vs == n_virtual - 1:
                    return zeros_act, (zeros_grad, out.astype(jnp.float32)), zeros_act, kept
                return out, (zeros_grad, no_loss), zeros_act, kept
            return run

        def backward(vs):
            def run(flat, x, cot, kept, batch):  # recomputes the stage's forward (nothing kept)
                out, vjp = jax.vjp(lambda p, x: self._run(vs, p, x, batch), flat, x)
                seed = cot
                if vs == n_virtual - 1:  # d(mean of B losses)/d(loss of one); varying over "stage" like out
                    seed = jax.lax.pcast(jnp.full(out.shape, 1.0 / b, out.dtype), "stage", to="varying")
                grad, dx = vjp(seed)
                return zeros_act, (grad, no_loss), (zeros_act if vs == 0 else dx), kept
            return run

        branches = [idle] + [forward(vs) for vs in range(n_virtual)] + [backward(vs) for vs in range(n_virtual)]

        def body(packed, batch):
            grads, loss = run_ticks(sched, branches, packed[0], batch, zeros_act, zeros_act, (zeros_grad, no_loss))
            return grads[None], jax.lax.psum(loss.sum(), "stage") / b

        P = jax.sharding.PartitionSpec
        return jax.shard_map(body, mesh=mesh, in_specs=(P("stage"), P()), out_specs=(P("stage"), P()),
                             axis_names={"stage"})

    def train_step(self, optimizer, mesh: jax.sharding.Mesh, params_for_shapes, batch_for_shapes) -> Callable:
        """``(packed, opt_state, batch) -> (packed, opt_state, loss)``: the pipeline's gradients, then one
        optimizer update on the packed parameters (elementwise optimizers such as Adam(W) and SGD update
        the packed buffer exactly as they would the parameter tree; padding stays zero)."""
        import optax

        grads_of = self.gradients(mesh, params_for_shapes, batch_for_shapes)

        def step(packed, opt_state, batch):
            grads, loss = grads_of(packed, batch)
            updates, opt_state = optimizer.update(grads, opt_state, packed)
            return optax.apply_updates(packed, updates), opt_state, loss

        return step


def task_tables(sched: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[tick, stage]`` arrays the runtime indexes: kind (0 idle, 1 forward, 2 backward), virtual stage
    (``chunk * S + stage``) and microbatch.

    >>> kinds, _, micro = task_tables(schedule("gpipe", stages=2, microbatches=2))
    >>> kinds.T.tolist(), micro.T.tolist()
    ([[1, 1, 0, 0, 2, 2], [0, 1, 1, 2, 2, 0]], [[0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 1, 0]])
    """
    kinds = np.zeros((sched.num_ticks, sched.num_stages), np.int32)
    virtual = np.zeros_like(kinds)
    micro = np.zeros_like(kinds)
    for task in sched.tasks:
        kinds[task.tick, task.stage] = 1 if task.kind == FORWARD else 2
        virtual[task.tick, task.stage] = task.chunk * sched.num_stages + task.stage
        micro[task.tick, task.stage] = task.microbatch
    return kinds, virtual, micro


# Tick loops per pipeline program.  Each loop compiles the whole switch of stage branches again: a
# 4-stage, 8-microbatch GPT-tiny pipeline compiled in 17 s with one loop, 25-32 s with two, 42-48 s
# with the four or five its runs of alike ticks make (2 CPU cores).
MAX_SEND_LOOPS = 2


def send_directions(sched: Schedule) -> np.ndarray:
    """``[tick, 2]`` booleans: whether the runtime moves the packed buffer ahead, and the cotangents back,
    at each tick.  A direction moves where some stage row sends that way (a forward whose virtual stage
    is not the last; a backward whose virtual stage is not the first); `run_ticks` runs one loop per run
    of alike ticks, so where those runs would be more than `MAX_SEND_LOOPS` (1F1B's steady state
    alternates), the adjacent runs whose merge adds the fewest sends are merged, moving where either did.

    GPipe needs ahead on ticks 0-1 and back on ticks 3-4; ticks 2 and 5, where no row sends, join
    their neighbours and move too:

    >>> send_directions(schedule("gpipe", stages=2, microbatches=2)).astype(int).T.tolist()
    [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
    """
    ahead, back = _sending(sched)
    needed = np.stack([ahead.any(axis=1), back.any(axis=1)], axis=1)
    runs = [[start, end, np.array(flags)] for start, end, flags in tick_runs(needed)]
    while len(runs) > MAX_SEND_LOOPS:
        def added(i):
            (a0, a1, fa), (b0, b1, fb) = runs[i], runs[i + 1]
            merged = fa | fb
            return (merged & ~fa).sum() * (a1 - a0) + (merged & ~fb).sum() * (b1 - b0)
        i = min(range(len(runs) - 1), key=added)
        runs[i:i + 2] = [[runs[i][0], runs[i + 1][1], runs[i][2] | runs[i + 1][2]]]
    out = np.zeros_like(needed)
    for start, end, flags in runs:
        out[start:end] = flags
    return out


def _sending(sched: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """``[tick, row]`` booleans: whether a row's task sends its output ahead (a forward whose virtual
    stage is not the last) and its cotangent back (a backward whose virtual stage is not the first)."""
    kinds, virtual, _ = task_tables(sched)
    last = sched.num_stages * sched.virtual - 1
    return (kinds == 1) & (virtual < last), (kinds == 2) & (virtual > 0)


def stash_slots(sched: Schedule) -> int:
    """How many microbatch slots a stage row's per-chunk stash needs when microbatch ``m`` is kept in slot
    ``m % slots`` from its forward to its backward: the most microbatches in flight on one chunk (1F1B:
    at most S - s), or B when that modular assignment would collide.

    >>> stash_slots(schedule("1f1b", stages=4, microbatches=8)), stash_slots(schedule("gpipe", stages=4, microbatches=8))
    (4, 8)
    """
    ordered = sorted(sched.tasks, key=lambda t: t.tick)

    def fits(slots: int) -> bool:
        live: dict[tuple[int, int], set[int]] = {}
        for task in ordered:
            held = live.setdefault((task.stage, task.chunk), set())
            if task.kind != FORWARD:
                held.discard(task.microbatch)
            elif len(held) >= slots or any(m % slots == task.microbatch % slots for m in held):
                return False
            else:
                held.add(task.microbatch)
        return True

    return next(slots for slots in range(1, sched.num_microbatches + 1) if fits(slots))


def tick_runs(flags: np.ndarray) -> list[tuple[int, int, tuple[bool, ...]]]:
    """Runs of consecutive ticks with equal ``flags`` rows, as ``(start, end, flags)``: the runtime's
    tick loops, one per run of `send_directions`.

    >>> tick_runs(np.array([[True, False], [True, False], [False, False], [False, True]]))
    [(0, 2, (True, False)), (2, 3, (False, False)), (3, 4, (False, True))]
    """
    runs: list[tuple[int, int, tuple[bool, ...]]] = []
    for tick, row in enumerate(map(tuple, flags.tolist())):
        if runs and runs[-1][2] == row:
            runs[-1] = (runs[-1][0], tick + 1, row)
        else:
            runs.append((tick, tick + 1, row))
    return runs


def run_ticks(sched: Schedule, branches: Sequence[Callable], params_row, batch, act_zero, cot_zero, contrib_zero,
              kept_zero=None):
    """The schedule's tick loop on one device row, inside ``jax.shard_map`` manual over ``"stage"``.

    ``branches`` are ``[idle, forward(vs) for each virtual stage, backward(vs) for each]``, each
    ``(params of the chunk, activation in, cotangent in, kept, microbatch) -> (activation out,
    contribution, cotangent out, kept out)``; activations and cotangents are pytrees shaped like
    ``act_zero`` / ``cot_zero`` and move to the next / previous stage with ``lax.ppermute`` on the ticks
    where some row sends one (`send_directions`: one loop per run of ticks alike, so an idle direction
    moves nothing); what a forward keeps for its backward (``kept``, a pytree like ``kept_zero``; the
    residuals) stays on its row, in slot ``m % stash_slots`` of its chunk, until the backward of
    microbatch ``m`` reads it.  Each task's contribution (gradients, losses: a pytree like
    ``contrib_zero``) is summed per chunk.  ``params_row`` is this row's ``[v, ...]`` parameters.
    Returns the summed contributions, each leaf ``[v, ...]``.
    """
    stages, v, b = sched.num_stages, sched.virtual, sched.num_microbatches
    n_virtual = stages * v
    kinds, virtual, micro = task_tables(sched)
    slots = stash_slots(sched)
    kept_zero = {} if kept_zero is None else kept_zero

    def varying(branch):  # lax.switch needs every branch's outputs varying over "stage" alike
        def run(*args):
            return jax.tree_util.tree_map(lambda x: x + jax.lax.pcast(jnp.zeros((), x.dtype), "stage", to="varying"),
                                          branch(*args))
        return run

    branches = [varying(f) for f in branches]
    ahead = [(i, (i + 1) % stages) for i in range(stages)]
    behind = [(i, (i - 1) % stages) for i in range(stages)]
    s = jax.lax.axis_index("stage")
    tables = jnp.asarray(kinds), jnp.asarray(virtual), jnp.asarray(micro)
    sends_ahead, sends_back = map(jnp.asarray, _sending(sched))

    def task(t, stage):
        return tuple(table[t, stage] for table in tables)

    def stashed(buffers, chunk, m):
        return jax.tree_util.tree_map(lambda x: x[chunk, m], buffers)

    def store(buffers, got, chunk, m, value):  # one slot rewritten in place, itself if nothing arrived
        return jax.tree_util.tree_map(lambda x, y: x.at[chunk, m].set(jnp.where(got, y, x[chunk, m])),
                                      buffers, value)

    def tick(send_ahead, send_back):
        def run(t, carry):
            act_in, cot_in, kept, acc = carry
            kind, vs, m = task(t, s)
            chunk = vs // stages
            mb = jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, m * (x.shape[0] // b), x.shape[0] // b), batch)
            index = jnp.where(kind == 0, 0, jnp.where(kind == 1, 1 + vs, 1 + n_virtual + vs))
            y, contrib, dx, keep = jax.lax.switch(
                index, branches, jax.tree_util.tree_map(lambda x: x[chunk], params_row),
                stashed(act_in, chunk, m), stashed(cot_in, chunk, m), stashed(kept, chunk, m % slots), mb)
            acc = jax.tree_util.tree_map(lambda a, g: a.at[chunk].add(g), acc, contrib)
            # Every branch returns the slot it read, rewritten by a forward: stored in place, without the
            # bounds select of a scatter (the slot index is always in range).
            kept = jax.tree_util.tree_map(
                lambda x, y: jax.lax.dynamic_update_slice(x, y[None, None], (chunk, m % slots) + (0,) * y.ndim),
                kept, keep)
            if send_ahead:
                y = jax.lax.ppermute(y, "stage", ahead)
                _, vs_p, m_p = task(t, (s - 1) % stages)
                act_in = store(act_in, sends_ahead[t, (s - 1) % stages], (vs_p + 1) // stages, m_p, y)
            if send_back:
                dx = jax.lax.ppermute(dx, "stage", behind)
                _, vs_n, m_n = task(t, (s + 1) % stages)
                cot_in = store(cot_in, sends_back[t, (s + 1) % stages], (vs_n - 1) // stages, m_n, dx)
            return act_in, cot_in, kept, acc
        return run

    def buffers(zero, count):
        return jax.tree_util.tree_map(lambda x: jnp.zeros((v, count, *x.shape), x.dtype), zero)

    carry = (buffers(act_zero, b), buffers(cot_zero, b), buffers(kept_zero, slots),
             jax.tree_util.tree_map(lambda x: jnp.zeros((v, *x.shape), x.dtype), contrib_zero))
    carry = jax.tree_util.tree_map(lambda x: jax.lax.pcast(x, "stage", to="varying"), carry)
    for start, end, (send_ahead, send_back) in tick_runs(send_directions(sched)):
        carry = jax.lax.fori_loop(start, end, tick(send_ahead, send_back), carry)
    return carry[-1]


def gpt_layers(spec) -> list[Layer]:
    """The zoo GPT (`autoplan.models.gpt`) as a layer sequence: embeddings, each block, final norm + head + loss."""
    import flax.linen as nn

    from autoplan.models import gpt

    cfg = spec.config

    class Embed(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return gpt.embed_tokens(cfg, tokens)

    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = gpt.layer_norm("ln_f", cfg.dtype)(x)
            return gpt.dense(cfg.vocab_size, "head", cfg.dtype, use_bias=False)(x)

    block = gpt.Block(cfg)
    layers = [Layer(name="embed", keys=("wte", "wpe"),
                    apply=lambda p, x, batch: Embed().apply({"params": p}, *spec.inputs_fn(batch)))]
    for i in range(cfg.layers):
        layers.append(Layer(name=f"block{i}", keys=(f"block{i}",),
                            apply=lambda p, x, batch, i=i: block.apply({"params": p[f"block{i}"]}, x)))
    layers.append(Layer(name="head", keys=("ln_f", "head"),
                        apply=lambda p, x, batch: spec.loss_fn(Head().apply({"params": p}, x), batch)))
    return layers


def emit_accumulated(plan, fun: Callable, graph: G.Graph, mesh: jax.sharding.Mesh, *, donate: bool = True):
    """A plan with microbatches as a runnable program: for one stage `accumulate` under ``jax.jit`` with
    the plan's input and output shardings, data parallel over ``plan.data_axes`` and the plan's
    (microbatch-sized) anchors pinned inside the loop; for several the pipeline of
    `autoplan._src.staging` (a `staging.StagedProgram`).
    """
    from autoplan._src import emit as E
    from autoplan._src import staging

    if plan.stack_chunks:
        from autoplan._src import stacked

        return stacked.emit_unstacked(plan, fun, graph, mesh, donate=donate)
    if len(plan.stages) > 1:
        return staging.emit_staged(plan, fun, graph, mesh, donate=donate)
    run = Accumulated(fun, plan.microbatches, -1, mesh=mesh, data_axes=plan.data_axes, anchors=plan.anchors)
    in_shardings = jax.tree_util.tree_unflatten(graph.input_tree, E.leaf_shardings(plan.inputs, mesh))
    out_shardings = jax.tree_util.tree_unflatten(graph.output_tree, E.leaf_shardings(plan.outputs, mesh))
    donate_argnums = E._donated_arguments(graph) if donate else ()
    jitted = jax.jit(run, in_shardings=tuple(in_shardings), out_shardings=out_shardings,
                     donate_argnums=donate_argnums)
    return E.Program(plan=plan, mesh=mesh, graph=graph, jitted=jitted, in_shardings=tuple(in_shardings),
                     out_shardings=out_shardings, donate_argnums=donate_argnums)


def bounds_from_stages(layers: Sequence[Layer], stage_layers: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """Layer ranges of a `Pipeline` from a plan's stages (``plan.stages[i].layers``: Flax layer names,
    "+"-joined for merged ones): each runtime layer goes to the stage that owns its parameters.

    >>> layers = [Layer(name=n, keys=k, apply=None) for n, k in
    ...           [("embed", ("wte", "wpe")), ("block0", ("block0",)), ("block1", ("block1",)),
    ...            ("head", ("ln_f", "head"))]]
    >>> bounds_from_stages(layers, [["wte+wpe+block0"], ["block1", "ln_f+head"]])
    [(0, 2), (2, 4)]
    """
    owner = {name: k for k, names in enumerate(stage_layers) for unit in names for name in unit.split("+")}
    stage_of = []
    for layer in layers:
        found = {owner[key] for key in layer.keys if key in owner}
        if len(found) != 1:
            raise ValueError(f"runtime layer {layer.name!r} (parameters {layer.keys}) maps to stages {sorted(found)} "
                             "of the plan; each layer's parameters must belong to exactly one stage")
        stage_of.append(found.pop())
    if stage_of != sorted(stage_of) or sorted(set(stage_of)) != list(range(len(stage_layers))):
        raise ValueError(f"the plan's stages {list(stage_layers)} do not cut the layer sequence into contiguous ranges")
    bounds = []
    for k in range(len(stage_layers)):
        members = [i for i, s in enumerate(stage_of) if s == k]
        bounds.append((members[0], members[-1] + 1))
    return bounds
