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
from autoplan._src import graph as G

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

    def compute(self, flops: float, shards: int) -> float:
        return flops / max(shards, 1) / self.cluster.device_flops

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
    flops = sum(math.prod(s) for s in op.output_shapes)
    return Strategy(name=name, output_specs=tuple(replicated(len(s)) for s in op.output_shapes),
                    input_specs=tuple(replicated(len(s)) if t != G.LITERAL else None
                                      for t, s in zip(op.inputs, op.input_shapes)),
                    compute_seconds=ctx.compute(flops, 1))


def strategies_for(op: G.Op, ctx: Context, warned: set[str] | None = None) -> list[Strategy]:
    """All strategies of ``op``; unknown primitives fall back to replication with a warning."""
    rule = _RULES.get(op.primitive)
    if rule is None:
        if warned is None or op.primitive not in warned:
            if warned is not None:
                warned.add(op.primitive)
            warnings.warn(
                f"autoplan has no sharding rule for primitive '{op.primitive}' (at {op.source}, layer "
                f"{op.layer or '<top>'}); it will run replicated. Register one with "
                "autoplan.register_strategy to let the planner split it.",
                UnsupportedPrimitiveWarning, stacklevel=3)
        return [replicated_strategy(op, ctx)]
    result = rule(op, ctx)
    if not result:
        result = [replicated_strategy(op, ctx)]
    if op.role not in (G.INPUT, G.OUTPUT, G.CONSTANT):
        result = [with_memory_traffic(s, op, ctx) for s in result]
    return _dedupe(result)


def with_memory_traffic(strategy: Strategy, op: G.Op, ctx: Context) -> Strategy:
    """Roofline: an operator takes at least the time to read its operands and write its results."""
    traffic = sum(ctx.device_bytes(shape, dtype, spec) for shape, dtype, spec, t in
                  zip(op.input_shapes, op.input_dtypes, strategy.input_specs, op.inputs) if t != G.LITERAL)
    traffic += sum(ctx.device_bytes(shape, dtype, spec) for shape, dtype, spec in
                   zip(op.output_shapes, op.output_dtypes, strategy.output_specs))
    seconds = traffic / ctx.cluster.memory_bandwidth
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


def assign_axes(slot_sizes: Sequence[int], ctx: Context, *, allowed: Sequence[bool] | None = None
                ) -> Iterator[tuple[tuple[str, ...], ...]]:
    """Every way to give each splitting mesh axis to at most one slot (a dimension).

    A slot of size n may take axes whose sizes multiply to a divisor of n.
    Several axes on one slot keep mesh order.  Yields one tuple of axes per slot.

    >>> from autoplan._src.cluster import MeshShape, clusters
    >>> ctx = Context(mesh=MeshShape(axis_names=("x",), axis_sizes=(2,)), cluster=clusters["cpu"])
    >>> list(assign_axes([4, 3], ctx))
    [((), ()), (('x',), ())]
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
        result = tuple(tuple(p) for p in per_slot)
        if any(slot_sizes[i] % ctx.axis_size(result[i]) for i in range(n)):
            continue
        if result not in seen:
            seen.add(result)
            yield result


def enumerate_specs(shape: Sequence[int], ctx: Context) -> list[Spec]:
    """Every spec of a tensor of ``shape`` on the mesh (replicated first)."""
    return list(assign_axes(list(shape), ctx))


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


# ---------------------------------------------------------------------------
# Resharding: what it costs to turn one spec of a tensor into another.


def axis_positions(spec: Spec) -> dict[str, int]:
    return {a: d for d, axes in enumerate(spec) for a in axes}


def reshard_collectives(src: Spec, dst: Spec, shape: Sequence[int], dtype: str, ctx: Context
                        ) -> tuple[Collective, ...]:
    """Collectives that turn a tensor laid out as ``src`` into ``dst``.

    Per mesh axis: same place, nothing; dropped, all-gather; added, a free
    local slice; moved to another dimension, all-to-all.  Axes whose order
    within one dimension changes are gathered and sliced again.
    """
    if src == dst or src is None or dst is None or not shape:
        return ()
    src_pos, dst_pos = axis_positions(src), axis_positions(dst)
    # Axes past the common prefix of a dimension that stay on it in another order:
    # gather them and slice again.
    regather = [a for d, axes in enumerate(src) for a in axes[len(_common_prefix(axes, dst[d])):]
                if a in dst[d]]
    moved = [a for a in src_pos if a in dst_pos and dst_pos[a] != src_pos[a]]
    gathered = [a for a in src_pos if a not in dst_pos] + regather
    current = dict(src_pos)
    out = []
    nbytes = math.prod(shape) * G.itemsize(dtype)
    if moved:
        per_device = nbytes / ctx.axis_size(list(current))
        c = ctx.collective("all-to-all", per_device, moved)
        out.append(c)
        for a in moved:
            current[a] = dst_pos[a]
    if gathered:
        remaining = [a for a in current if a not in gathered]
        per_device_after = nbytes / ctx.axis_size(remaining)
        out.append(ctx.collective("all-gather", per_device_after, gathered))
    return tuple(c for c in out if c is not None)


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return a[:n]


@functools.lru_cache(maxsize=1 << 16)
def _reshard_seconds_cached(src: Spec, dst: Spec, shape: tuple[int, ...], dtype: str, mesh, cluster) -> float:
    ctx = Context(mesh=mesh, cluster=cluster)
    return sum(c.seconds for c in reshard_collectives(src, dst, shape, dtype, ctx))


def reshard_seconds(src: Spec, dst: Spec, shape: Sequence[int], dtype: str, ctx: Context) -> float:
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
