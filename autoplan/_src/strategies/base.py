"""Sharding strategies: the registry, the rule protocol and the shared arithmetic.

A *spec* says how one tensor is split over the mesh: one tuple of mesh axis
names per tensor dimension, like a `jax.sharding.PartitionSpec`
(``(("data",), (), ("model",))`` is ``P("data", None, "model")``).  A
*strategy* is one way to run an operator: the spec of each result, the spec
each operand must arrive in, and what it costs (compute, collectives inside the
operator).  Rules are registered per primitive::

    @register_strategy("dot_general")
    def dot_general(op, ctx): ...

An unknown primitive warns once (naming the primitive and its source line) and
runs replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from autoplan._src import cluster as C
from autoplan._src import compat
from autoplan._src import graph as G
from autoplan._src import walk

Spec = tuple[tuple[str, ...], ...]


def replicated(rank: int) -> Spec:
    return ((),) * rank


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Collective:
    """One collective an operator (or a resharding) performs."""

    kind: str  # all-reduce | all-gather | reduce-scatter | all-to-all | p2p
    axes: tuple[str, ...]
    nbytes: float  # full buffer bytes per device (before reduce-scatter / after all-gather)
    seconds: float
    wire_bytes: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Strategy:
    name: str
    output_specs: tuple[Spec, ...]
    input_specs: tuple[Spec | None, ...]  # None: literal or scalar operand, any layout
    compute_seconds: float = 0.0
    collectives: tuple[Collective, ...] = ()

    @property
    def communication_seconds(self) -> float:
        return sum(c.seconds for c in self.collectives)

    @property
    def communication_bytes(self) -> float:
        return sum(c.wire_bytes for c in self.collectives)

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.communication_seconds


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Context:
    """What a rule may use besides the operator: the mesh and the cluster."""

    mesh: C.MeshShape
    cluster: C.Cluster

    @property
    def split_axes(self) -> tuple[str, ...]:
        """Mesh axes that can split something (size > 1), in mesh order."""
        return tuple(a for a, s in zip(self.mesh.axis_names, self.mesh.axis_sizes) if s > 1)

    def axis_size(self, axes: Sequence[str]) -> int:
        return self.mesh.axis_size(tuple(axes)) if axes else 1

    def shards(self, spec: Spec | None) -> int:
        if not spec:
            return 1
        return math.prod(self.axis_size(axes) for axes in spec)

    def device_bytes(self, shape: Sequence[int], dtype: str, spec: Spec | None) -> float:
        return math.prod(shape) * G.itemsize(dtype) / self.shards(spec)

    def compute(self, flops: float, shards: int, rate: float | None = None) -> float:
        """Seconds for ``flops`` split ``shards`` ways at ``rate`` FLOP/s (default: the headline peak)."""
        return flops / max(shards, 1) / (rate or self.cluster.device_flops)

    def dot_rate(self, op: G.Op) -> float:
        """FLOP/s of a dot_general or convolution: its operand dtypes and precision (`Cluster.flops_for`)."""
        return self.cluster.flops_for(op.input_dtypes[:2], op.params.get("precision"))

    def collective(self, kind: str, nbytes: float, axes: Sequence[str]) -> Collective | None:
        axes = tuple(axes)
        if not axes or nbytes <= 0:
            return None
        n = self.axis_size(axes) if kind != "p2p" else 2
        return Collective(kind=kind, axes=axes, nbytes=float(nbytes),
                          seconds=C.collective_seconds(kind, nbytes, axes, self.mesh, self.cluster),
                          wire_bytes=C.collective_bytes(kind, nbytes, n))


class StrategyRule(Protocol):
    """Signature of a sharding rule: all useful strategies of one operator."""

    def __call__(self, op: G.Op, ctx: Context) -> list[Strategy]: ...


_RULES: dict[str, StrategyRule] = {}


def _primitive_name(primitive) -> str:
    return primitive if isinstance(primitive, str) else primitive.name


def register_strategy(*primitives) -> Callable[[StrategyRule], StrategyRule]:
    """Register a rule for one or more primitives (objects like ``lax.dot_general_p`` or names).

    >>> from autoplan._src.strategies.base import register_strategy, registered
    >>> @register_strategy("my_custom_op")
    ... def my_rule(op, ctx):
    ...     return []
    >>> "my_custom_op" in registered()
    True
    """

    def wrap(rule: StrategyRule) -> StrategyRule:
        for p in primitives:
            _RULES[_primitive_name(p)] = rule
        return rule

    return wrap


def registered() -> frozenset[str]:
    return frozenset(_RULES)


def rule_for(primitive: str) -> StrategyRule | None:
    return _RULES.get(primitive)


class UnsupportedPrimitiveWarning(UserWarning):
    """A primitive has no sharding rule; it runs replicated."""


def replicated_strategy(op: G.Op, ctx: Context, name: str = "replicated") -> Strategy:
    return Strategy(name=name, output_specs=tuple(replicated(len(s)) for s in op.output_shapes),
                    input_specs=tuple(replicated(len(s)) if t != G.LITERAL else None
                                      for t, s in zip(op.inputs, op.input_shapes)),
                    compute_seconds=opaque_seconds(op, ctx))


def opaque_seconds(op: G.Op, ctx: Context) -> float:
    """Replicated run time of an operator autoplan has no rule for, priced conservatively.

    A ``pallas_call``'s ``cost_estimate`` is taken as given; otherwise the FLOPs of the jaxpr the
    operator carries (a Pallas kernel's body times its grid, a ``custom_partitioning``'s
    implementation), else one per result element.  Never less than the time to read its operands
    and write its results once.
    """
    estimate = _cost_estimate(op)
    nbytes = sum(math.prod(s) * G.itemsize(d) for s, d in zip(op.input_shapes + op.output_shapes,
                                                              op.input_dtypes + op.output_dtypes))
    if estimate is not None:
        flops = float(estimate.flops) + float(getattr(estimate, "transcendentals", 0) or 0)
        nbytes = max(nbytes, float(getattr(estimate, "bytes_accessed", 0) or 0))
    else:
        grid = getattr(op.params.get("grid_mapping"), "grid", ()) or ()
        repeats = math.prod(g for g in grid if isinstance(g, int))
        flops = repeats * sum(walk.jaxpr_flops(body) for body in _carried_jaxprs(op))
        flops = max(flops, float(sum(math.prod(s) for s in op.output_shapes)))
    return max(ctx.compute(flops, 1), nbytes / ctx.cluster.memory_bandwidth)


def _cost_estimate(op: G.Op):
    """A ``pallas_call``'s ``cost_estimate`` when it gives FLOPs, else None."""
    estimate = op.params.get("cost_estimate")
    return estimate if getattr(estimate, "flops", None) is not None else None


def _carried_jaxprs(op: G.Op) -> list:
    """The jaxprs an operator carries as parameters (a kernel's body, an implementation)."""
    return [compat.open_jaxpr(v)[0] for v in op.params.values() if isinstance(v, (compat.ClosedJaxpr, compat.Jaxpr))]


def strategies_for(op: G.Op, ctx: Context, warned: set[str] | None = None,
                   traffic: OpTraffic | None = None) -> list[Strategy]:
    """All strategies of ``op``; unknown primitives fall back to replication with a warning.

    ``traffic`` says which operands and results go through device memory
    (`fused_traffic`); by default all of them do.
    """
    rule = _RULES.get(op.primitive)
    if rule is None:
        if warned is None or op.primitive not in warned:
            if warned is not None:
                warned.add(op.primitive)
            warnings.warn(
                f"autoplan has no sharding rule for primitive '{op.primitive}' (at {op.source}, layer "
                f"{op.layer or '<top>'}); it will run replicated, priced {_opaque_pricing(op)}. Register a rule "
                "with autoplan.register_strategy to let the planner split it.",
                UnsupportedPrimitiveWarning, stacklevel=3)
        return [replicated_strategy(op, ctx)]
    result = rule(op, ctx)
    if not result:
        result = [replicated_strategy(op, ctx)]
    if op.role not in (G.INPUT, G.OUTPUT, G.CONSTANT):
        result = [with_memory_traffic(s, op, ctx, traffic) for s in result]
    return _dedupe(result)


def _opaque_pricing(op: G.Op) -> str:
    """How `opaque_seconds` prices ``op``, for the warning."""
    if _cost_estimate(op) is not None:
        return "from its cost_estimate"
    if _carried_jaxprs(op):
        return "from the FLOPs of the jaxpr it carries"
    return "as one FLOP per result element"


# Primitives whose operands and result share one layout (the elementwise rule).
ELEMENTWISE = (
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "neg", "sign", "floor", "ceil", "round",
    "is_finite", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos",
    "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "integer_pow",
    "square", "reciprocal", "erf", "erfc", "erf_inv", "lgamma", "digamma", "not", "and", "or", "xor", "eq", "ne",
    "lt", "le", "gt", "ge", "select_n", "clamp", "nextafter", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "population_count", "convert_element_type", "stop_gradient", "copy", "copy_p",
    "imag", "real", "conj", "complex", "reduce_precision", "optimization_barrier", "pjit_identity",
)

# Operators XLA fuses into loop fusions: their results need not be written to device
# memory when every consumer fuses them in too.
FUSIBLE_PRODUCERS = (frozenset(ELEMENTWISE) - {"optimization_barrier"}) | {
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota", "transpose", "slice", "concatenate", "pad"}
# Operators that read fused producers in place (reductions are input fusions).
FUSIBLE_CONSUMERS = FUSIBLE_PRODUCERS | {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax",
                                         "argmin"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OpTraffic:
    """Which operands and results of an operator move through device memory."""

    inputs: tuple[bool, ...]
    outputs: tuple[bool, ...]
    kernels: int = 1  # kernels that read the operands: a fused producer is recomputed in each it feeds
    rereads: int = 0  # kernels that read a written result back (a value too widely used to recompute)


def fusible_producer(op: G.Op) -> bool:
    """Whether XLA may fuse ``op`` into its consumers' kernels instead of writing its results."""
    return op.primitive in FUSIBLE_PRODUCERS and op.role not in (G.INPUT, G.CONSTANT)


@functools.lru_cache(maxsize=8)  # graphs hash by identity; the planner asks several times per solve
def fused_traffic(graph: G.Graph) -> tuple[OpTraffic, ...]:
    """Per operator, which operands it reads and results it writes in device memory, as XLA fuses.

    XLA fuses chains of elementwise and layout operators (and the reductions
    they feed) into one kernel: a value passed inside such a chain never
    touches device memory.  Counting every operator's operands and results
    would charge an Adam update ten times what the one fused kernel moves.
    A result is written when some consumer cannot fuse it (a matmul, a
    graph output) or runs in another phase (a forward value the backward
    pass reads is saved); an operand is read when its producer is not fused
    in, and by every kernel a fused producer runs in (``kernels``,
    `with_fusion_kernels`): XLA recomputes a cheap value in each kernel that uses
    it.  Checked against compiled one-device steps (GPT, Wide-ResNet, MoE)
    in ``tests/test_strategies_rules.py``.

    >>> from autoplan._src import graph as G
    >>> t = lambda i, p: G.Tensor(id=i, shape=(4,), dtype="float32", producer=p)
    >>> op = lambda i, prim, ins, outs, role=G.FORWARD: G.Op(id=i, primitive=prim, inputs=ins, outputs=outs,
    ...     input_shapes=((4,),) * len(ins), input_dtypes=("float32",) * len(ins), output_shapes=((4,),),
    ...     output_dtypes=("float32",), role=role)
    >>> g = G.Graph(ops=[op(0, "input", (), (0,), G.INPUT), op(1, "exp", (0,), (1,)), op(2, "neg", (1,), (2,)),
    ...     op(3, "output", (2,), (), G.OUTPUT)], tensors=[t(0, 0), t(1, 1), t(2, 2)], input_ops=[0],
    ...     output_ops=[3], input_tree=None, output_tree=None, input_paths=["x"], output_paths=["y"],
    ...     aliases={}, layers=[""])
    >>> [(tr.inputs, tr.outputs) for tr in fused_traffic(g)[1:3]]
    [((True,), (False,)), ((False,), (True,))]
    """
    ops = graph.ops
    return with_fusion_kernels(graph, phase_traffic(graph), lambda t: (ops[c] for c, _ in graph.consumers[t]))


@functools.lru_cache(maxsize=8)
def phase_traffic(graph: G.Graph) -> tuple[OpTraffic, ...]:
    """`fused_traffic` before `with_fusion_kernels`: what each operator reads and writes, each
    fused producer counted once."""
    ops = graph.ops
    out = []
    for op in ops:
        inputs = tuple(t != G.LITERAL and not (op.primitive in FUSIBLE_CONSUMERS
                                               and fusible_producer(ops[graph.tensors[t].producer]))
                       for t in op.inputs)
        outputs = tuple(
            op.primitive not in FUSIBLE_PRODUCERS
            or any(ops[c].primitive not in FUSIBLE_CONSUMERS or ops[c].role != op.role
                   for c, _ in graph.consumers[t])
            for t in op.outputs)
        out.append(OpTraffic(inputs=inputs, outputs=outputs))
    return tuple(out)


MAX_DUPLICATES = 2  # a fused value used by more kernels is written once and read back by each


def with_fusion_kernels(graph: G.Graph, traffic: Sequence[OpTraffic],
                        consumers: Callable[[int], Iterator[G.Op]]) -> tuple[OpTraffic, ...]:
    """``traffic`` with each fusible producer's ``kernels``: its own where it writes a result, and
    every kernel of a consumer (``consumers(tensor)``) it is fused into.

    XLA fuses a cheap producer into each consumer kernel (duplicating it) rather than write its
    result, so a value two kernels use has its operands read twice: the backward pass of a
    layer norm or a residual reads a forward activation in several reductions.  Counting them once
    priced a GPT step's memory traffic at two thirds of what XLA compiles.  A value more than
    `MAX_DUPLICATES` kernels use is written once and read back by each (``rereads``): else a
    residual stream fused through every layer would be recomputed in dozens of kernels.  Kernels
    stay within a phase: a value a later phase uses is saved (written), and read there once.
    """
    ops = graph.ops
    fusible = [fusible_producer(op) for op in ops]
    kernels: list[frozenset[int]] = [frozenset()] * len(ops)
    rereads = [0] * len(ops)
    for _ in range(4):  # one sweep unless a loop carry feeds an earlier operator of its body
        changed = False
        for op in reversed(ops):
            own = {op.id} if any(traffic[op.id].outputs) or not fusible[op.id] else set()
            if fusible[op.id]:
                for t in op.outputs:
                    for consumer in consumers(t):
                        if consumer.primitive in FUSIBLE_CONSUMERS and consumer.role == op.role:
                            own |= kernels[consumer.id]
            own = frozenset(own or {op.id})
            rereads[op.id] = len(own - {op.id}) if len(own) > MAX_DUPLICATES else 0
            if rereads[op.id]:  # written once, read by each kernel
                own = frozenset({op.id})
            changed |= own != kernels[op.id]
            kernels[op.id] = own
        if not changed:
            break
    return tuple(traffic[op.id] if not fusible[op.id] else
                 dataclasses.replace(traffic[op.id], outputs=(True,) * len(op.outputs), rereads=rereads[op.id])
                 if rereads[op.id] else dataclasses.replace(traffic[op.id], kernels=len(kernels[op.id]))
                 for op in ops)


def with_memory_traffic(strategy: Strategy, op: G.Op, ctx: Context, traffic: OpTraffic | None = None
                        ) -> Strategy:
    """Roofline: an operator takes at least the time to read its operands and write its results.

    Only the operands and results that ``traffic`` marks (default: all) count.
    """
    reads = tuple(r * traffic.kernels for r in traffic.inputs) if traffic is not None else (1,) * len(op.inputs)
    writes = traffic.outputs if traffic is not None else (True,) * len(op.outputs)
    bytes_moved = sum(read * ctx.device_bytes(shape, dtype, spec) for shape, dtype, spec, t, read in
                      zip(op.input_shapes, op.input_dtypes, strategy.input_specs, op.inputs, reads)
                      if t != G.LITERAL)
    result_passes = 1 + (traffic.rereads if traffic is not None else 0)  # the write and the reads back
    bytes_moved += result_passes * sum(ctx.device_bytes(shape, dtype, spec) for shape, dtype, spec, write in
                                       zip(op.output_shapes, op.output_dtypes, strategy.output_specs, writes) if write)
    seconds = bytes_moved / ctx.cluster.memory_bandwidth
    if seconds <= strategy.compute_seconds:
        return strategy
    return dataclasses.replace(strategy, compute_seconds=seconds)


def _dedupe(strategies: list[Strategy]) -> list[Strategy]:
    best: dict[tuple, Strategy] = {}
    for s in strategies:
        key = (s.output_specs, s.input_specs)
        if key not in best or s.seconds < best[key].seconds:
            best[key] = s
    return list(best.values())


# ---------------------------------------------------------------------------
# Enumerating assignments of mesh axes to tensor dimensions.


def assign_axes(slot_sizes: Sequence[int], ctx: Context, *, allowed: Sequence[bool] | None = None,
                any_order: bool = False) -> Iterator[tuple[tuple[str, ...], ...]]:
    """Every way to give each splitting mesh axis to at most one slot (a dimension).

    A slot of size n may take axes whose sizes multiply to a divisor of n.
    Several axes on one slot keep mesh order, or with ``any_order`` come in
    every order (``P(("model", "data"))`` lays devices out differently from
    ``P(("data", "model"))``; users' specs use both).  Operators keep mesh
    order: every order everywhere triples planning time for layouts that
    XLA's own propagation does not produce from mesh-ordered inputs; a leaf
    pinned in another order gets that layout too (`intra.build_problem`),
    and a reshard (a collective-permute) brings it to mesh order.  Yields
    one tuple of axes per slot.

    >>> from autoplan._src.cluster import MeshShape, clusters
    >>> ctx = Context(mesh=MeshShape(axis_names=("x", "y"), axis_sizes=(2, 2)), cluster=clusters["cpu"])
    >>> sorted(a for a in assign_axes([4, 3], ctx) if a[0])
    [(('x',), ()), (('x', 'y'), ()), (('y',), ())]
    >>> [a for a in assign_axes([4, 3], ctx, any_order=True) if a[0]][-1]
    (('y', 'x'), ())
    """
    axes = ctx.split_axes
    n = len(slot_sizes)
    allowed = allowed if allowed is not None else [True] * n
    seen = set()
    for choice in itertools.product(range(-1, n), repeat=len(axes)):
        per_slot: list[list[str]] = [[] for _ in range(n)]
        ok = True
        for axis, slot in zip(axes, choice):
            if slot < 0:
                continue
            if not allowed[slot]:
                ok = False
                break
            per_slot[slot].append(axis)
        if not ok:
            continue
        if any(slot_sizes[i] % ctx.axis_size(per_slot[i]) for i in range(n)):
            continue
        orders = (itertools.permutations(p) if any_order else (tuple(p),) for p in per_slot)
        for result in itertools.product(*orders):
            if result not in seen:
                seen.add(result)
                yield result


def enumerate_specs(shape: Sequence[int], ctx: Context, *, any_order: bool = False) -> list[Spec]:
    """Every spec of a tensor of ``shape`` on the mesh (replicated first); see `assign_axes`."""
    return list(assign_axes(list(shape), ctx, any_order=any_order))


def spec_name(spec: Spec | None) -> str:
    """'S(data)xRxS(model)' style name of a spec; 'R' for replicated."""
    if spec is None:
        return "-"
    if not spec:
        return "scalar"
    return "x".join(f"S({','.join(axes)})" if axes else "R" for axes in spec)


def to_partition_spec(spec: Spec):
    """The `jax.sharding.PartitionSpec` of a spec, trailing unsplit dims dropped."""
    import jax

    entries = [None if not axes else (axes[0] if len(axes) == 1 else axes) for axes in spec]
    while entries and entries[-1] is None:
        entries.pop()
    return jax.sharding.PartitionSpec(*entries)


def from_partition_spec(pspec, shape: Sequence[int], mesh: C.MeshShape, where: str,
                        error: type[Exception] = ValueError) -> Spec | None:
    """A `PartitionSpec` (or ``NamedSharding``, or its entries) as a spec of ``shape`` on ``mesh``, checked.

    The one converter for layouts a user writes (``in_shardings=``, a
    ``with_sharding_constraint`` in the step).  Raises ``error`` naming
    ``where`` (a pytree path, or an op and its source line) for an axis the
    mesh lacks, more entries than dims, or a dim its axes do not divide.
    None where a dim is left ``P.UNCONSTRAINED``.  Axes of size 1 are dropped.

    >>> import jax
    >>> mesh = C.MeshShape(axis_names=("data", "model"), axis_sizes=(2, 4))
    >>> from_partition_spec(jax.sharding.PartitionSpec(("data", "model"), None), (16, 4), mesh, "x")
    (('data', 'model'), ())
    """
    entries = tuple(getattr(pspec, "spec", pspec))
    if len(entries) > len(shape):
        raise error(f"{where}: sharding {pspec} has {len(entries)} entries but the array has rank {len(shape)} "
                    f"(shape {tuple(shape)}); give at most one entry per dimension")
    spec = []
    for dim, entry in enumerate(entries + (None,) * (len(shape) - len(entries))):
        if entry is not None and not isinstance(entry, (str, tuple, list)):
            return None  # P.UNCONSTRAINED: the planner decides
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for axis in axes:
            if axis not in mesh.axis_names:
                raise error(f"{where}: sharding {pspec} names mesh axis {axis!r}, which the mesh "
                            f"{mesh.as_dict()} lacks; use one of {mesh.axis_names} or plan on a mesh with that axis")
        if axes and shape[dim] % mesh.axis_size(axes):
            raise error(f"{where}: dim {dim} (size {shape[dim]}) of shape {tuple(shape)} cannot be split over "
                        f"mesh axes {axes} ({mesh.axis_size(axes)} devices); pick axes whose sizes divide {shape[dim]} "
                        "or pad the array")
        spec.append(tuple(a for a in axes if mesh.axis_size((a,)) > 1))
    return tuple(spec)


# ---------------------------------------------------------------------------
# Resharding: what it costs to turn one spec of a tensor into another.


def axis_positions(spec: Spec) -> dict[str, int]:
    return {a: d for d, axes in enumerate(spec) for a in axes}


def reshard_collectives(src: Spec, dst: Spec, shape: Sequence[int], dtype: str, ctx: Context
                        ) -> tuple[Collective, ...]:
    """Collectives that turn a tensor laid out as ``src`` into ``dst``, as XLA's SPMD partitioner does it.

    Per mesh axis: same place, nothing; dropped, all-gather; added, a free
    local slice (before an all-to-all, so that moves less; after an
    all-gather); moved to another dimension, an all-to-all per pair of
    dimensions.
    Axes whose order within one dimension changes send their (small,
    ungathered) shards to new owners: a collective-permute.  Moves XLA
    cannot express as all-to-alls fall back to what it does then
    ("involuntary full rematerialization"): gather the whole tensor over
    every source axis and slice (`_needs_full_remat`).  Checked pair by pair
    against compiled HLO on 4x2 and 2x4 meshes.

    >>> from autoplan._src.cluster import MeshShape, clusters
    >>> ctx = Context(mesh=MeshShape(axis_names=("data", "model"), axis_sizes=(4, 2)), cluster=clusters["a100-8x"])
    >>> [c.kind for c in reshard_collectives((("data",), (), ("model",)), ((), ("data",), ("model",)),
    ...                                      (16, 8, 4), "float32", ctx)]
    ['all-to-all']
    >>> [(c.kind, c.axes) for c in reshard_collectives(((), ("data", "model")), (("data",), ()), (16, 8),
    ...                                                "float32", ctx)]
    [('all-gather', ('data', 'model'))]
    """
    if src == dst or src is None or dst is None or not shape:
        return ()
    src_pos, dst_pos = axis_positions(src), axis_positions(dst)
    nbytes = math.prod(shape) * G.itemsize(dtype)
    moved = [a for a in src_pos if a in dst_pos and dst_pos[a] != src_pos[a]]
    if _needs_full_remat(src, dst, src_pos, moved):
        c = ctx.collective("all-gather", nbytes, list(src_pos))
        return (c,) if c is not None else ()
    # Axes past the common prefix of a dimension that stay on it in another order
    # (or behind an inserted axis): the shards change owners, a collective-permute.
    reordered = [a for d, axes in enumerate(src) for a in axes[len(_common_prefix(axes, dst[d])):]
                 if a in dst[d]]
    gathered = [a for a in src_pos if a not in dst_pos]
    added = [a for a in dst_pos if a not in src_pos]
    out = []
    shard = nbytes / ctx.axis_size(list(src_pos) + added)
    if reordered:  # permuted while small, before any gather
        out.append(ctx.collective("p2p", shard, reordered))
    groups: dict[tuple[int, int], list[str]] = {}
    for axis in moved:  # one all-to-all per (from, to) pair of dimensions, as XLA emits them
        groups.setdefault((src_pos[axis], dst_pos[axis]), []).append(axis)
    for axes in groups.values():
        out.append(ctx.collective("all-to-all", shard, axes))
    if gathered:
        remaining = [a for a in src_pos if a not in gathered]
        out.append(ctx.collective("all-gather", nbytes / ctx.axis_size(remaining), gathered))
    return tuple(c for c in out if c is not None)


def _needs_full_remat(src: Spec, dst: Spec, src_pos: dict[str, int], moved: Sequence[str]) -> bool:
    """Whether XLA can only reshard ``src`` to ``dst`` by replicating the tensor first.

    Two patterns defeat its all-to-all rewrite: a dimension split over
    several axes that loses all of them while some move elsewhere (unless
    they move together, in order, to one dimension), and one dimension
    that receives moved axes from two different dimensions.
    """
    if not moved:
        return False
    for d, axes in enumerate(src):
        if len(axes) > 1 and any(a in moved for a in axes) and not set(axes) & set(dst[d]) \
                and axes not in dst:
            return True
    return any(len({src_pos[a] for a in axes if a in moved}) > 1 for axes in dst)


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return a[:n]


@functools.lru_cache(maxsize=1 << 16)
def _reshard_seconds_cached(src: Spec, dst: Spec, shape: tuple[int, ...], dtype: str, mesh, cluster) -> float:
    ctx = Context(mesh=mesh, cluster=cluster)
    collectives = reshard_collectives(src, dst, shape, dtype, ctx)
    if not collectives:  # a local slice: a kernel reading and writing each device's window
        sliced = ctx.shards(dst) > ctx.shards(src)  # not where only size-1 axes differ
        return 2 * ctx.device_bytes(shape, dtype, dst) / cluster.memory_bandwidth if sliced else 0.0
    return sum(c.seconds for c in collectives)


def reshard_seconds(src: Spec, dst: Spec, shape: Sequence[int], dtype: str, ctx: Context) -> float:
    """Seconds to turn ``src`` into ``dst``: its collectives (`reshard_collectives`), or, for a local
    slice that sends nothing, the kernel that reads and writes each device's window."""
    if src == dst or src is None or dst is None:
        return 0.0
    return _reshard_seconds_cached(src, dst, tuple(shape), dtype, ctx.mesh, ctx.cluster)


def reshard_matrix(src_specs: Sequence[Spec], dst_specs: Sequence[Spec], shape: Sequence[int], dtype: str,
                   ctx: Context) -> np.ndarray:
    """Seconds to go from each of ``src_specs`` to each of ``dst_specs``."""
    out = np.zeros((len(src_specs), len(dst_specs)))
    for i, s in enumerate(src_specs):
        for j, d in enumerate(dst_specs):
            if s != d:
                out[i, j] = reshard_seconds(s, d, shape, dtype, ctx)
    return out
