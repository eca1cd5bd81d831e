"""Rules for graph leaves, elementwise ops, layout ops, reductions and dot_general."""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoplan._src import graph as G
from autoplan._src.strategies.base import (
    ELEMENTWISE, Context, Spec, Strategy, assign_axes, enumerate_specs, register_strategy, replicated,
    replicated_strategy, spec_name)

# ---------------------------------------------------------------------------
# Graph leaves: any layout, no work.  (Slicing a replicated constant is free.)


@register_strategy("input", "constant")
def leaf(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.output_shapes[0]
    return [Strategy(name=spec_name(s), output_specs=(s,), input_specs=()) for s in enumerate_specs(shape, ctx)]


@register_strategy("output")
def output(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    return [Strategy(name=spec_name(s), output_specs=(), input_specs=(s,)) for s in enumerate_specs(shape, ctx)]


# Host callbacks (jax.debug.print / callback) see whole values: their operands are gathered.
@register_strategy("debug_callback", "debug_print")
def host_callback(op: G.Op, ctx: Context) -> list[Strategy]:
    return [replicated_strategy(op, ctx, name="host")]


# ---------------------------------------------------------------------------
# Elementwise (`base.ELEMENTWISE`): every operand and result share one layout.


def _operand_spec(spec: Spec, operand_shape: Sequence[int], out_shape: Sequence[int]) -> Spec | None:
    if len(operand_shape) == 0:
        return None
    if tuple(operand_shape) == tuple(out_shape):
        return spec
    # Size-1 dims broadcast implicitly: keep them whole.
    return tuple(axes if n == m else () for axes, n, m in zip(spec, operand_shape, out_shape))


@register_strategy(*ELEMENTWISE)
def elementwise(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.output_shapes[0]
    size = math.prod(shape)
    out = []
    for spec in enumerate_specs(shape, ctx):
        in_specs = tuple(_operand_spec(spec, s, shape) if t != G.LITERAL else None
                         for t, s in zip(op.inputs, op.input_shapes))
        out.append(Strategy(name=spec_name(spec), output_specs=(spec,) * len(op.outputs), input_specs=in_specs,
                            compute_seconds=ctx.compute(size * len(op.inputs), ctx.shards(spec))))
    return out


# ---------------------------------------------------------------------------
# Layout ops.


@register_strategy("transpose")
def transpose(op: G.Op, ctx: Context) -> list[Strategy]:
    perm = op.params["permutation"]
    out = []
    for spec in enumerate_specs(op.input_shapes[0], ctx):
        out_spec = tuple(spec[p] for p in perm)
        out.append(Strategy(name=spec_name(out_spec), output_specs=(out_spec,), input_specs=(spec,)))
    return out


@register_strategy("broadcast_in_dim")
def broadcast_in_dim(op: G.Op, ctx: Context) -> list[Strategy]:
    out_shape = op.output_shapes[0]
    in_shape = op.input_shapes[0]
    dims = op.params["broadcast_dimensions"]
    out = []
    for spec in enumerate_specs(out_shape, ctx):
        in_spec = tuple(spec[d] if in_shape[i] == out_shape[d] else () for i, d in enumerate(dims))
        in_specs = (in_spec,) + tuple(None for _ in op.inputs[1:])  # dynamic shapes, if any
        out.append(Strategy(name=spec_name(spec), output_specs=(spec,), input_specs=in_specs))
    return out


def reshape_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of input and output dims with equal products.

    >>> reshape_groups((4, 6), (4, 2, 3))
    [([0], [0]), ([1], [1, 2])]
    """
    groups, i, j = [], 0, 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        gi, gj, pi, pj = [], [], 1, 1
        if i < n:
            gi.append(i); pi *= in_shape[i]; i += 1  # noqa: E702
        if j < m:
            gj.append(j); pj *= out_shape[j]; j += 1  # noqa: E702
        while pi != pj:
            if pi < pj and i < n:
                gi.append(i); pi *= in_shape[i]; i += 1  # noqa: E702
            elif pj < pi and j < m:
                gj.append(j); pj *= out_shape[j]; j += 1  # noqa: E702
            else:
                return None
        groups.append((gi, gj))
    return groups


def _map_through_reshape(spec: Spec, src_shape, dst_shape, groups) -> Spec | None:
    """Carry a layout through a reshape: a split dim must lead its group, and the
    group's leading non-trivial destination dim must divide by the split."""
    out: list[tuple[str, ...]] = [()] * len(dst_shape)
    for src_dims, dst_dims in groups:
        split = [d for d in src_dims if spec[d]]
        if not split:
            continue
        lead_src = next((d for d in src_dims if src_shape[d] != 1), None)
        lead_dst = next((d for d in dst_dims if dst_shape[d] != 1), None)
        if len(split) > 1 or split[0] != lead_src or lead_dst is None:
            return None
        out[lead_dst] = spec[split[0]]
    return tuple(out)


@register_strategy("reshape")
def reshape(op: G.Op, ctx: Context) -> list[Strategy]:
    in_shape, out_shape = op.input_shapes[0], op.output_shapes[0]
    groups = reshape_groups(in_shape, out_shape)
    extra = tuple(None for _ in op.inputs[1:])
    if groups is None:
        return [Strategy(name="R", output_specs=(replicated(len(out_shape)),),
                         input_specs=(replicated(len(in_shape)),) + extra)]
    flipped = [(b, a) for a, b in groups]
    pairs = set()
    for spec in enumerate_specs(in_shape, ctx):
        mapped = _map_through_reshape(spec, in_shape, out_shape, groups)
        if mapped is not None and _divisible(mapped, out_shape, ctx):
            pairs.add((spec, mapped))
    for spec in enumerate_specs(out_shape, ctx):
        mapped = _map_through_reshape(spec, out_shape, in_shape, flipped)
        if mapped is not None and _divisible(mapped, in_shape, ctx):
            pairs.add((mapped, spec))
    return [Strategy(name=spec_name(o), output_specs=(o,), input_specs=(i,) + extra) for i, o in sorted(pairs)]


def _divisible(spec: Spec, shape, ctx: Context) -> bool:
    return all(n % ctx.axis_size(axes) == 0 for axes, n in zip(spec, shape))


@register_strategy("squeeze")
def squeeze(op: G.Op, ctx: Context) -> list[Strategy]:
    dims = set(d % len(op.input_shapes[0]) for d in op.params["dimensions"])
    out = []
    for spec in enumerate_specs(op.input_shapes[0], ctx):
        out_spec = tuple(axes for d, axes in enumerate(spec) if d not in dims)
        out.append(Strategy(name=spec_name(out_spec), output_specs=(out_spec,), input_specs=(spec,)))
    return out


@register_strategy("expand_dims")
def expand_dims(op: G.Op, ctx: Context) -> list[Strategy]:
    return reshape(op, ctx)


# ---------------------------------------------------------------------------
# Reductions: a split reduced dim leaves partial results, combined by an all-reduce.

REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor")


@register_strategy(*REDUCTIONS)
def reduce(op: G.Op, ctx: Context) -> list[Strategy]:
    in_shape = op.input_shapes[0]
    axes_reduced = set(op.params["axes"])
    out = []
    for spec in enumerate_specs(in_shape, ctx):
        out_spec = tuple(a for d, a in enumerate(spec) if d not in axes_reduced)
        partial = tuple(a for d in sorted(axes_reduced) for a in spec[d])
        out_bytes = ctx.device_bytes(op.output_shapes[0], op.output_dtypes[0], out_spec)
        collective = ctx.collective("all-reduce", out_bytes, partial)
        name = spec_name(out_spec) + (f" (all-reduce over {','.join(partial)})" if partial else "")
        out.append(Strategy(name=name, output_specs=(out_spec,), input_specs=(spec,),
                            compute_seconds=ctx.compute(math.prod(in_shape), ctx.shards(spec)),
                            collectives=(collective,) if collective else ()))
    return out


# ---------------------------------------------------------------------------
# dot_general: split batch, lhs-free, rhs-free or contracting dims over each axis.


def dot_dims(op: G.Op):
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    lhs_shape, rhs_shape = op.input_shapes[0], op.input_shapes[1]
    lf = [d for d in range(len(lhs_shape)) if d not in lc and d not in lb]
    rf = [d for d in range(len(rhs_shape)) if d not in rc and d not in rb]
    return list(lc), list(rc), list(lb), list(rb), lf, rf


@register_strategy("dot_general")
def dot_general(op: G.Op, ctx: Context) -> list[Strategy]:
    """Each mesh axis splits a batch, lhs-free, rhs-free or contracting dim (or nothing).

    A contracting split leaves partial sums: the result is all-reduced, or
    reduce-scattered along a result dim that the axis can split.
    """
    lc, rc, lb, rb, lf, rf = dot_dims(op)
    lhs_shape, rhs_shape = op.input_shapes[0], op.input_shapes[1]
    out_shape, out_dtype = op.output_shapes[0], op.output_dtypes[0]
    # Slots: batch dims, lhs free, rhs free, contracting pairs.
    slots = ([("b", i) for i in range(len(lb))] + [("l", i) for i in range(len(lf))]
             + [("r", i) for i in range(len(rf))] + [("c", i) for i in range(len(lc))])
    sizes = ([lhs_shape[d] for d in lb] + [lhs_shape[d] for d in lf] + [rhs_shape[d] for d in rf]
             + [lhs_shape[d] for d in lc])
    flops = 2.0 * math.prod(lhs_shape) * math.prod(rhs_shape[d] for d in rf)
    rate = ctx.dot_rate(op)
    out = []
    for assignment in assign_axes(sizes, ctx):
        lhs_spec: list[tuple[str, ...]] = [()] * len(lhs_shape)
        rhs_spec: list[tuple[str, ...]] = [()] * len(rhs_shape)
        out_spec: list[tuple[str, ...]] = [()] * len(out_shape)
        contracted: list[str] = []
        contracted_groups: list[tuple[str, ...]] = []  # axes per split contracting dim
        for (kind, i), axes in zip(slots, assignment):
            if not axes:
                continue
            if kind == "b":
                lhs_spec[lb[i]] = rhs_spec[rb[i]] = out_spec[i] = axes
            elif kind == "l":
                lhs_spec[lf[i]] = out_spec[len(lb) + i] = axes
            elif kind == "r":
                rhs_spec[rf[i]] = out_spec[len(lb) + len(lf) + i] = axes
            else:
                lhs_spec[lc[i]] = rhs_spec[rc[i]] = axes
                contracted.extend(axes)
                contracted_groups.append(axes)
        used = math.prod(ctx.axis_size(a) for a in assignment)
        compute = ctx.compute(flops, used, rate)
        ins = (tuple(lhs_spec), tuple(rhs_spec))
        base = tuple(out_spec)
        label = "·".join(f"{kind}{i}={'+'.join(a)}" for (kind, i), a in zip(slots, assignment) if a) or "R"
        if not contracted:
            out.append(Strategy(name=label, output_specs=(base,), input_specs=ins, compute_seconds=compute))
            continue
        nbytes = ctx.device_bytes(out_shape, out_dtype, base)
        # XLA reduces each split contracting dim's partial sums on its own.
        ars = tuple(c for c in (ctx.collective("all-reduce", nbytes, axes) for axes in contracted_groups) if c)
        out.append(Strategy(name=f"{label} all-reduce", output_specs=(base,), input_specs=ins,
                            compute_seconds=compute, collectives=ars))
        if len(contracted_groups) == 1:
            idle = tuple(a for a in ctx.split_axes if not any(a in axes for axes in assignment))
            out.extend(_reduce_scatter_variants(label, ins, base, contracted, out_shape, out_dtype, compute,
                                                idle=idle, ctx=ctx))
    return out


def _reduce_scatter_variants(label: str, ins, base: Spec, contracted: Sequence[str], out_shape, out_dtype: str,
                             compute: float, *, idle: tuple[str, ...], ctx: Context) -> list[Strategy]:
    """The partial sums of a contracting split land split along one result dim, as XLA runs it.

    XLA's SPMD partitioner scatters only onto a result dim that is not split
    already (onto a split one it all-reduces and gathers instead, so that
    layout is reached by the all-reduce strategy and a reshard).  When some
    mesh axis is ``idle`` (splits nothing in the dot), XLA instead
    all-reduces pieces of 1/min(idle, contracted) of the result over the
    contracted axes, and moves them with a collective-permute when the idle
    axes are the larger.  Both checked against compiled HLO on 2x4 and 4x2
    meshes (tests/test_strategies_hlo.py).
    """
    nbytes = ctx.device_bytes(out_shape, out_dtype, base)
    if idle:
        piece = nbytes / min(ctx.axis_size(idle), ctx.axis_size(contracted))
        collectives = [ctx.collective("all-reduce", piece, contracted)]
        if ctx.axis_size(idle) > ctx.axis_size(contracted):
            collectives.append(ctx.collective("p2p", piece, contracted))
    else:
        collectives = [ctx.collective("reduce-scatter", nbytes, contracted)]
    collectives = tuple(c for c in collectives if c is not None)
    out = []
    for d, n in enumerate(out_shape):
        if base[d] or n % ctx.axis_size(contracted):
            continue
        rs_spec = base[:d] + (tuple(contracted),) + base[d + 1:]
        out.append(Strategy(name=f"{label} reduce-scatter->d{d}", output_specs=(rs_spec,), input_specs=ins,
                            compute_seconds=compute, collectives=collectives))
    return out
