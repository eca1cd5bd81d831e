"""Rules for indexing, slicing, sorting, windowed reductions and random-number primitives.

Most of these ops run locally on any split of the dimensions they do not
index, slice, pad, scan, sort or window: those "free" dimensions follow from
operand to result, while the touched dimensions stay unsplit.  The exceptions
are gather and scatter, which can also run split along the indexed dimension
(Megatron's vocab-parallel embedding and its gradient):

* gather with the table split along a looked-up dimension: each device looks
  up the indices in its own range and zeroes the rest, so the result is a
  partial sum, all-reduced (or reduce-scattered along a result dimension);
* scatter with the updates split along their batch (scatter) dimensions: each
  device scatters its updates, so the result is partial and all-reduced (or
  reduce-scattered); with the operand split along the scattered dimension
  each device keeps the updates that land in its range, with no collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from autoplan._src import graph as G
from autoplan._src.strategies.base import (
    Context, Spec, Strategy, assign_axes, enumerate_specs, register_strategy, replicated_strategy, spec_name)

# ---------------------------------------------------------------------------
# Helpers.


def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes such as PRNG keys ('key<fry>')
        return 8


def _nbytes(shape: Sequence[int], dtype: str, spec: Spec | None, ctx: Context) -> float:
    return math.prod(shape) * _itemsize(dtype) / ctx.shards(spec)


def _is_array(op: G.Op, k: int) -> bool:
    """Operand ``k`` is a tensor of rank >= 1 (literals and scalars take no spec)."""
    return op.inputs[k] != G.LITERAL and len(op.input_shapes[k]) > 0


def _divisible(spec: Spec | None, shape: Sequence[int], ctx: Context) -> bool:
    return spec is None or all(n % ctx.axis_size(axes) == 0 for axes, n in zip(spec, shape))


def _mesh_order(axes: Sequence[str], ctx: Context) -> tuple[str, ...]:
    order = {a: i for i, a in enumerate(ctx.mesh.axis_names)}
    return tuple(sorted(axes, key=order.__getitem__))


def _label(parts: Sequence[tuple[str, tuple[str, ...]]]) -> str:
    return "·".join(f"{name}={'+'.join(axes)}" for name, axes in parts if axes) or "R"


def _follow_rule(op: G.Op, ctx: Context, shape: Sequence[int], allowed: Sequence[bool], *,
                 in_map: Callable[[int, Spec], Spec | None] | None = None,
                 out_map: Callable[[int, Spec], Spec] | None = None,
                 work: float | None = None) -> list[Strategy]:
    """Every spec of ``shape`` splitting only ``allowed`` dims, shared by operands and results.

    By default each array operand and each result takes the spec itself
    (scalars and literals take None); ``in_map``/``out_map`` adapt it per
    operand/result.  Specs that some tensor cannot divide are skipped.
    """
    work = float(sum(math.prod(s) for s in op.output_shapes)) if work is None else work
    out = []
    for spec in assign_axes(list(shape), ctx, allowed=list(allowed)):
        ins = tuple((in_map(k, spec) if in_map else spec) if _is_array(op, k) else None
                    for k in range(len(op.inputs)))
        outs = tuple(out_map(k, spec) if out_map else spec for k in range(len(op.output_shapes)))
        if not all(_divisible(s, sh, ctx) for s, sh in zip(ins, op.input_shapes)):
            continue
        if not all(_divisible(s, sh, ctx) for s, sh in zip(outs, op.output_shapes)):
            continue
        if any(s is not None and len(s) != len(sh) for s, sh in zip(ins, op.input_shapes)):
            continue
        out.append(Strategy(name=spec_name(spec), output_specs=outs, input_specs=ins,
                            compute_seconds=ctx.compute(work, ctx.shards(spec))))
    return out


def _all_dims_but(rank: int, fixed) -> list[bool]:
    fixed = {d % rank for d in fixed} if rank else set()
    return [d not in fixed for d in range(rank)]


def _partial_variants(label: str, base_out: Spec, out_shape: Sequence[int], out_dtype: str, partial: Sequence[str],
                      ins: tuple, compute: float, ctx: Context, *, rs_dims: Sequence[int] | None = None,
                      ins_for: Callable[[Spec], tuple] | None = None) -> list[Strategy]:
    """A result left as partial sums over ``partial`` axes: all-reduce it, or reduce-scatter it
    along one unsplit result dim (``rs_dims``, default all) that can take those axes."""
    nbytes = _nbytes(out_shape, out_dtype, base_out, ctx)
    ar = ctx.collective("all-reduce", nbytes, partial)
    out = [Strategy(name=f"{label} all-reduce", output_specs=(base_out,),
                    input_specs=ins_for(base_out) if ins_for else ins, compute_seconds=compute,
                    collectives=(ar,) if ar else ())]
    rs = ctx.collective("reduce-scatter", nbytes, partial)
    for d in (range(len(out_shape)) if rs_dims is None else rs_dims):
        # Only onto a dim still whole: reduce-scattering onto a split dim is rarely worth the extra
        # strategies (the all-reduce variant plus a free local slice reaches the same layout).
        if base_out[d] or out_shape[d] % ctx.axis_size(partial):
            continue
        scattered = tuple(partial)
        spec = base_out[:d] + (scattered,) + base_out[d + 1:]
        out.append(Strategy(name=f"{label} reduce-scatter->d{d}", output_specs=(spec,),
                            input_specs=ins_for(spec) if ins_for else ins, compute_seconds=compute,
                            collectives=(rs,) if rs else ()))
    return out


# ---------------------------------------------------------------------------
# gather


@register_strategy("gather")
def gather(op: G.Op, ctx: Context) -> list[Strategy]:
    """Split index batch dims (result batch dims follow; batching dims of the table too), whole-slice
    table dims (result offset dims follow), or looked-up table dims with slice size 1 (each device
    looks up its own range; the partial result is all-reduced or reduce-scattered)."""
    dn = op.params["dimension_numbers"]
    slice_sizes = tuple(op.params["slice_sizes"])
    o_shape, i_shape = op.input_shapes[0], op.input_shapes[1]
    out_shape, out_dtype = op.output_shapes[0], op.output_dtypes[0]
    offset_dims = tuple(dn.offset_dims)
    collapsed = set(dn.collapsed_slice_dims)
    start_index_map = tuple(dn.start_index_map)
    o_batching = tuple(getattr(dn, "operand_batching_dims", ()) or ())
    i_batching = tuple(getattr(dn, "start_indices_batching_dims", ()) or ())
    out_batch = [d for d in range(len(out_shape)) if d not in offset_dims]
    window = [d for d in range(len(o_shape)) if d not in collapsed and d not in o_batching]
    if len(out_batch) != len(i_shape) - 1 or len(window) != len(offset_dims):
        return [replicated_strategy(op, ctx)]
    slots: list[tuple[str, tuple, int]] = []
    for i, od in enumerate(out_batch):
        odim = o_batching[i_batching.index(i)] if i in i_batching else None
        slots.append(("b", (i, od, odim), i_shape[i]))
    for k, d in enumerate(window):
        if d not in start_index_map and slice_sizes[d] == o_shape[d]:
            slots.append(("w", (d, offset_dims[k]), o_shape[d]))
    for d in start_index_map:
        if slice_sizes[d] == 1 and o_shape[d] > 1:
            slots.append(("v", (d,), o_shape[d]))
    work = float(math.prod(out_shape))
    out = []
    for assignment in assign_axes([s for _, _, s in slots], ctx):
        o_spec: list[tuple[str, ...]] = [()] * len(o_shape)
        i_spec: list[tuple[str, ...]] = [()] * len(i_shape)
        r_spec: list[tuple[str, ...]] = [()] * len(out_shape)
        partial: list[str] = []
        names = []
        for (kind, data, _), axes in zip(slots, assignment):
            if not axes:
                continue
            if kind == "b":
                i, od, odim = data
                i_spec[i] = r_spec[od] = axes
                if odim is not None:
                    o_spec[odim] = axes
                names.append((f"batch{i}", axes))
            elif kind == "w":
                d, od = data
                o_spec[d] = r_spec[od] = axes
                names.append((f"slice{d}", axes))
            else:
                o_spec[data[0]] = axes
                partial.extend(axes)
                names.append((f"index{data[0]}", axes))
        ins = (tuple(o_spec), tuple(i_spec))
        base = tuple(r_spec)
        compute = ctx.compute(work, ctx.shards(base))
        label = _label(names)
        if not partial:
            out.append(Strategy(name=label, output_specs=(base,), input_specs=ins, compute_seconds=compute))
        else:
            out.extend(_partial_variants(label, base, out_shape, out_dtype, _mesh_order(partial, ctx), ins,
                                         compute, ctx))
    return out


# ---------------------------------------------------------------------------
# scatter and its combining variants

_COMBINING_SCATTERS = ("scatter-add", "scatter_add", "scatter-sub", "scatter_sub", "scatter-mul", "scatter_mul",
                       "scatter-min", "scatter_min", "scatter-max", "scatter_max")


@register_strategy("scatter", *_COMBINING_SCATTERS)
def scatter(op: G.Op, ctx: Context) -> list[Strategy]:
    """Split update batch dims (combining scatters: the partial result is all-reduced or
    reduce-scattered; batching dims of the operand follow instead), whole window dims (operand,
    updates and result follow), or scattered operand dims with window size 1 (each device keeps
    the updates landing in its range; no collective).  The operand always shares the result's spec."""
    dn = op.params["dimension_numbers"]
    o_shape, i_shape, u_shape = op.input_shapes[0], op.input_shapes[1], op.input_shapes[2]
    out_shape, out_dtype = op.output_shapes[0], op.output_dtypes[0]
    update_window = tuple(dn.update_window_dims)
    inserted = set(dn.inserted_window_dims)
    scattered = tuple(dn.scatter_dims_to_operand_dims)
    o_batching = tuple(getattr(dn, "operand_batching_dims", ()) or ())
    i_batching = tuple(getattr(dn, "scatter_indices_batching_dims", ()) or ())
    combining = op.primitive != "scatter"
    u_batch = [d for d in range(len(u_shape)) if d not in update_window]
    window = [d for d in range(len(o_shape)) if d not in inserted and d not in o_batching]
    if len(u_batch) != len(i_shape) - 1 or len(window) != len(update_window) or len(op.inputs) != 3:
        return [replicated_strategy(op, ctx)]
    window_size = {d: u_shape[update_window[k]] for k, d in enumerate(window)}
    slots: list[tuple[str, tuple, int]] = []
    for i, ud in enumerate(u_batch):
        odim = o_batching[i_batching.index(i)] if i in i_batching else None
        if odim is None and not combining:
            continue
        slots.append(("b", (i, ud, odim), i_shape[i]))
    for k, d in enumerate(window):
        if d not in scattered and window_size[d] == o_shape[d]:
            slots.append(("w", (d, update_window[k]), o_shape[d]))
    for d in scattered:
        if window_size.get(d, 1) == 1 and o_shape[d] > 1:
            slots.append(("s", (d,), o_shape[d]))
    work = float(math.prod(u_shape))
    out = []
    for assignment in assign_axes([s for _, _, s in slots], ctx):
        o_spec: list[tuple[str, ...]] = [()] * len(o_shape)
        i_spec: list[tuple[str, ...]] = [()] * len(i_shape)
        u_spec: list[tuple[str, ...]] = [()] * len(u_shape)
        partial: list[str] = []
        names = []
        for (kind, data, _), axes in zip(slots, assignment):
            if not axes:
                continue
            if kind == "b":
                i, ud, odim = data
                i_spec[i] = u_spec[ud] = axes
                if odim is not None:
                    o_spec[odim] = axes
                else:
                    partial.extend(axes)
                names.append((f"batch{i}", axes))
            elif kind == "w":
                d, ud = data
                o_spec[d] = u_spec[ud] = axes
                names.append((f"window{d}", axes))
            else:
                o_spec[data[0]] = axes
                names.append((f"range{data[0]}", axes))
        base = tuple(o_spec)
        iu = (tuple(i_spec), tuple(u_spec))
        compute = ctx.compute(work, ctx.shards(tuple(u_spec)))
        label = _label(names)
        if not partial:
            out.append(Strategy(name=label, output_specs=(base,), input_specs=(base,) + iu, compute_seconds=compute))
        else:
            out.extend(_partial_variants(label, base, out_shape, out_dtype, _mesh_order(partial, ctx), (), compute,
                                         ctx, ins_for=lambda spec: (spec,) + iu))
    return out


# ---------------------------------------------------------------------------
# Slicing, padding, concatenation: untouched dims follow, touched dims stay whole.


@register_strategy("dynamic_slice")
def dynamic_slice(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    sizes = tuple(op.params["slice_sizes"])
    return _follow_rule(op, ctx, shape, [sizes[d] == n for d, n in enumerate(shape)],
                        in_map=lambda k, s: s if k == 0 else None)


@register_strategy("dynamic_update_slice")
def dynamic_update_slice(op: G.Op, ctx: Context) -> list[Strategy]:
    shape, u_shape = op.input_shapes[0], op.input_shapes[1]
    return _follow_rule(op, ctx, shape, [u_shape[d] == n for d, n in enumerate(shape)],
                        in_map=lambda k, s: s if k in (0, 1) else None, work=float(math.prod(u_shape)))


@register_strategy("slice")
def slice_(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    start, limit = op.params["start_indices"], op.params["limit_indices"]
    strides = op.params.get("strides") or (1,) * len(shape)
    return _follow_rule(op, ctx, shape, [start[d] == 0 and limit[d] == n and strides[d] == 1
                                         for d, n in enumerate(shape)])


@register_strategy("pad")
def pad(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    config = op.params["padding_config"]
    return _follow_rule(op, ctx, shape, [tuple(int(v) for v in c) == (0, 0, 0) for c in config],
                        in_map=lambda k, s: s if k == 0 else None)


@register_strategy("concatenate")
def concatenate(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.output_shapes[0]
    return _follow_rule(op, ctx, shape, _all_dims_but(len(shape), [op.params["dimension"]]))


@register_strategy("split")
def split(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    return _follow_rule(op, ctx, shape, _all_dims_but(len(shape), [op.params["axis"]]))


@register_strategy("rev")
def rev(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    return _follow_rule(op, ctx, shape, _all_dims_but(len(shape), op.params["dimensions"]))


@register_strategy("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def cumulative(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    return _follow_rule(op, ctx, shape, _all_dims_but(len(shape), [op.params["axis"]]))


@register_strategy("iota")
def iota(op: G.Op, ctx: Context) -> list[Strategy]:
    """Any layout: each device generates its own block."""
    shape = op.output_shapes[0]
    extra = tuple(None for _ in op.inputs)  # dynamic shapes, if any
    return [Strategy(name=spec_name(s), output_specs=(s,), input_specs=extra,
                     compute_seconds=ctx.compute(math.prod(shape), ctx.shards(s)))
            for s in enumerate_specs(shape, ctx)]


# ---------------------------------------------------------------------------
# Sorting and selection along one dim: that dim stays whole.


@register_strategy("sort")
def sort(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    dim = op.params["dimension"]
    n = shape[dim % len(shape)] if shape else 1
    work = float(math.prod(shape)) * max(1.0, math.log2(max(n, 2))) * len(op.inputs)
    return _follow_rule(op, ctx, shape, _all_dims_but(len(shape), [dim]), work=work)


@register_strategy("top_k", "approx_top_k")
def top_k(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    axis = op.params.get("axis", op.params.get("reduction_dimension", -1))
    axis = len(shape) - 1 if axis is None else axis
    n = shape[axis % len(shape)]
    return _follow_rule(op, ctx, shape, _all_dims_but(len(shape), [axis]),
                        work=float(math.prod(shape)) * max(1.0, math.log2(max(n, 2))))


@register_strategy("argmax", "argmin")
def argminmax(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.input_shapes[0]
    axes = {a % len(shape) for a in op.params["axes"]}
    return _follow_rule(op, ctx, shape, [d not in axes for d in range(len(shape))],
                        out_map=lambda k, s: tuple(a for d, a in enumerate(s) if d not in axes),
                        work=float(math.prod(shape)))


# ---------------------------------------------------------------------------
# Windowed reductions: dims with a trivial window (size 1, stride 1, no padding or dilation) follow.


def _trivial_window_dims(params, rank: int) -> list[bool]:
    ones = (1,) * rank
    window = params["window_dimensions"]
    strides = params.get("window_strides") or ones
    padding = params.get("padding") or ((0, 0),) * rank
    base_dil = params.get("base_dilation") or ones
    win_dil = params.get("window_dilation") or ones
    return [window[d] == 1 and strides[d] == 1 and tuple(padding[d]) == (0, 0) and base_dil[d] == 1
            and win_dil[d] == 1 for d in range(rank)]


@register_strategy("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
                   "select_and_scatter_add", "select_and_scatter", "select_and_gather_add")
def windowed(op: G.Op, ctx: Context) -> list[Strategy]:
    """Window dims stay whole; every window-rank operand (not init values) and result follows."""
    rank = len(op.params["window_dimensions"])
    allowed = _trivial_window_dims(op.params, rank)
    shape = max((s for s in op.input_shapes + op.output_shapes if len(s) == rank), key=math.prod)
    work = float(sum(math.prod(s) for s in op.output_shapes)) * math.prod(op.params["window_dimensions"])
    return _follow_rule(op, ctx, shape, allowed,
                        in_map=lambda k, s: s if len(op.input_shapes[k]) == rank else None, work=work)


# ---------------------------------------------------------------------------
# Random numbers.  With partitionable threefry (the default) every device can
# generate its own block of bits, so bit tensors take any layout.


def _elementwise_like(op: G.Op, ctx: Context) -> list[Strategy]:
    shape = op.output_shapes[0]
    if not shape:
        return [replicated_strategy(op, ctx)]

    def in_map(k: int, spec: Spec) -> Spec | None:
        s = op.input_shapes[k]
        if len(s) != len(shape):
            return None if not s else tuple(() for _ in s)
        return tuple(a if n == m else () for a, n, m in zip(spec, s, shape))

    return _follow_rule(op, ctx, shape, [True] * len(shape), in_map=in_map,
                        work=float(math.prod(shape)) * max(1, len(op.output_shapes)) * 20)


@register_strategy("threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "random_seed", "random_fold_in",
                   "random_clone")
def random_elementwise(op: G.Op, ctx: Context) -> list[Strategy]:
    return _elementwise_like(op, ctx)


@register_strategy("random_wrap")
def random_wrap(op: G.Op, ctx: Context) -> list[Strategy]:
    """uint32[..., *key_shape] -> key[...]: the leading dims follow, the key data dims stay whole."""
    shape, in_shape = op.output_shapes[0], op.input_shapes[0]
    if not shape:
        return [replicated_strategy(op, ctx)]
    tail = ((),) * (len(in_shape) - len(shape))
    return _follow_rule(op, ctx, shape, [True] * len(shape), in_map=lambda k, s: s + tail)


@register_strategy("random_unwrap")
def random_unwrap(op: G.Op, ctx: Context) -> list[Strategy]:
    """key[...] -> uint32[..., *key_shape]."""
    shape, out_shape = op.input_shapes[0], op.output_shapes[0]
    if not shape:
        return [replicated_strategy(op, ctx)]
    tail = ((),) * (len(out_shape) - len(shape))
    return _follow_rule(op, ctx, shape, [True] * len(shape), out_map=lambda k, s: s + tail)


@register_strategy("random_bits", "random_split")
def random_bits(op: G.Op, ctx: Context) -> list[Strategy]:
    """key[...] -> bits[..., *shape]: any layout of the result; the key's dims follow its leading dims."""
    out_shape, key_rank = op.output_shapes[0], len(op.input_shapes[0])
    out = []
    for spec in enumerate_specs(out_shape, ctx):
        key_spec = tuple(spec[:key_rank]) if key_rank and op.inputs[0] != G.LITERAL else None
        ins = (key_spec,) + tuple(None for _ in op.inputs[1:])
        out.append(Strategy(name=spec_name(spec), output_specs=(spec,), input_specs=ins,
                            compute_seconds=ctx.compute(20.0 * math.prod(out_shape), ctx.shards(spec))))
    return out


@register_strategy("rng_bit_generator", "rng_uniform")
def rng_replicated(op: G.Op, ctx: Context) -> list[Strategy]:
    """Stateful generators whose bits depend on the layout: replicated."""
    return [replicated_strategy(op, ctx)]
