"""Rules for structure: loop and branch boundaries, user sharding constraints, shard_map regions.

`trace` walks a ``scan`` / ``while`` body once and a ``cond``'s dearest
branch, with a ``loop_in`` pseudo-operator for every value entering the body
and a ``loop_out`` for every value leaving it.  Their rules say how layouts
cross the boundary: carries, closed-over values and branch operands keep
their layout; a stacked input ``xs`` enters as one slice and a stacked output
``ys`` leaves stacked, and the stacked (leading) axis is never split (the
pipeline pass, not the intra-op plan, cuts it).  Boundaries cost nothing
themselves: what crosses them is priced as the resharding on their edges,
inside the loop (times its trip count) or outside it (once).

A user's ``with_sharding_constraint`` / ``reshard`` has exactly one strategy,
the user's layout: a hard constraint of the ILP.  A ``shard_map`` region
takes its ``in_specs`` / ``out_specs`` and pays the collectives of its body.
"""

from __future__ import annotations

import math

from autoplan._src import compat
from autoplan._src import graph as G
from autoplan._src import walk
from autoplan._src.strategies.base import (
    Context, Strategy, enumerate_specs, from_partition_spec, register_strategy, spec_name)


class UserShardingError(ValueError):
    """A sharding the user wrote in the step cannot hold on the plan's mesh."""


BOUNDARY_PRIMITIVES = frozenset({"loop_in", "loop_out"})
USER_PINNED = "user-pinned"


@register_strategy(*BOUNDARY_PRIMITIVES)
def boundary(op: G.Op, ctx: Context) -> list[Strategy]:
    """Identity for carries, constants and branch values; slice in / stack out for ``xs`` / ``ys``."""
    kind = op.params.get("kind", "value")
    stacked_in, stacked_out = (kind == "xs"), (kind == "ys")
    inner = op.output_shapes[0] if not stacked_out else op.input_shapes[0]
    out = []
    for spec in enumerate_specs(inner, ctx):
        stacked = ((),) + spec
        out.append(Strategy(name=spec_name(spec), output_specs=(stacked if stacked_out else spec,),
                            input_specs=(stacked if stacked_in else spec,)))
    return out


def _user_sharding(op: G.Op):
    for key in ("sharding", "dst_sharding"):
        if key in op.params:
            return op.params[key]
    return None


@register_strategy("sharding_constraint", "reshard")
def user_constraint(op: G.Op, ctx: Context) -> list[Strategy]:
    """The user's layout, and nothing else: a hard constraint of the ILP."""
    shape = op.output_shapes[0]
    entries = compat.sharding_spec(_user_sharding(op))
    specs = enumerate_specs(shape, ctx)
    if entries is not None:
        spec = from_partition_spec(entries, shape, ctx.mesh, f"the sharding constraint at {op.source}",
                                   UserShardingError)
        if spec is not None:
            specs = [spec]
    name = lambda s: f"{USER_PINNED} {spec_name(s)}"  # noqa: E731
    return [Strategy(name=name(s), output_specs=(s,), input_specs=(s,)) for s in specs]


_BODY_COLLECTIVES = {"psum": "all-reduce", "psum_invariant": "all-reduce", "all_gather": "all-gather",
                     "all_gather_invariant": "all-gather", "reduce_scatter": "reduce-scatter",
                     "psum_scatter": "reduce-scatter", "all_to_all": "all-to-all", "ppermute": "p2p"}


def _body_costs(jaxpr, ctx: Context) -> tuple[float, list]:
    """FLOPs and collectives of a shard_map body (per device)."""
    return walk.jaxpr_flops(jaxpr), _body_collectives(jaxpr, ctx)


def _body_collectives(jaxpr, ctx: Context) -> list:
    collectives = []
    for eqn in jaxpr.eqns:
        kind = _BODY_COLLECTIVES.get(eqn.primitive.name)
        if kind is not None:
            axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
            axes = (axes,) if isinstance(axes, str) else tuple(a for a in axes if isinstance(a, str))
            sized = [v for v in (eqn.outvars if kind == "all-gather" else eqn.invars) if not compat.is_literal(v)]
            nbytes = sum(math.prod(s) * G.itemsize(d) for s, d in map(compat.aval_shape_dtype, sized))
            known = tuple(a for a in axes if a in ctx.mesh.axis_names)
            col = ctx.collective(kind, nbytes, known)
            if col is not None:
                collectives.append(col)
        for value in eqn.params.values():
            if isinstance(value, (compat.ClosedJaxpr, compat.Jaxpr)):
                collectives += _body_collectives(compat.open_jaxpr(value)[0], ctx)
    return collectives


@register_strategy("shard_map")
def shard_map_region(op: G.Op, ctx: Context) -> list[Strategy]:
    """Opaque: operands and results take the region's in_specs / out_specs; its collectives are paid."""
    where = f"the shard_map at {op.source}"
    in_specs = tuple(from_partition_spec(p, s, ctx.mesh, where, UserShardingError)
                     for p, s in zip(op.params["in_specs"], op.input_shapes))
    out_specs = tuple(from_partition_spec(p, s, ctx.mesh, where, UserShardingError)
                      for p, s in zip(op.params["out_specs"], op.output_shapes))
    flops, collectives = _body_costs(compat.open_jaxpr(op.params["jaxpr"])[0], ctx)
    return [Strategy(name="shard_map", output_specs=out_specs, input_specs=in_specs,
                     compute_seconds=ctx.compute(flops, 1), collectives=tuple(collectives))]
