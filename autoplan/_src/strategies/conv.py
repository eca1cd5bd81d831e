"""Rule for `conv_general_dilated`: split batch, output channels, input channels or groups.

Spatial dims stay whole (splitting them needs halo exchanges).  With
``feature_group_count == batch_group_count == 1`` each mesh axis may split

* the batch: lhs N and result N;
* the output channels: rhs O and result C;
* the input channels: lhs C and rhs I, leaving partial sums that are
  all-reduced, or reduce-scattered along the result's N or C dim;

and two axes may combine any of these.  Grouped convolutions split whole
groups: with ``feature_group_count > 1`` the batch, or the groups (lhs C, rhs
O, result C together); with ``batch_group_count > 1`` (the weight gradient of
a grouped convolution) the groups (lhs N, rhs O, result C together) or the
input channels.
"""

from __future__ import annotations

import math

import numpy as np

from autoplan._src import graph as G
from autoplan._src.strategies.base import Context, Strategy, assign_axes, register_strategy


def conv_dims(op: G.Op):
    """(lhs_spec, rhs_spec, out_spec) of a conv: (N, C, *spatial), (O, I, *spatial), (N, C, *spatial)."""
    dn = op.params["dimension_numbers"]
    rank = len(op.input_shapes[0])
    if dn is None:  # default NC..., OI..., NC...
        default = tuple(range(rank))
        return default, default, default
    if hasattr(dn, "lhs_spec"):
        return tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)
    return tuple(dn[0]), tuple(dn[1]), tuple(dn[2])


def conv_flops(op: G.Op) -> float:
    """2 * N * out_spatial * O * I * kernel_spatial (I per group, N of the result)."""
    lhs_spec, rhs_spec, out_spec = conv_dims(op)
    rhs_shape, out_shape = op.input_shapes[1], op.output_shapes[0]
    n = out_shape[out_spec[0]]
    out_spatial = math.prod(out_shape[d] for d in out_spec[2:])
    kernel_spatial = math.prod(rhs_shape[d] for d in rhs_spec[2:])
    return 2.0 * n * out_spatial * rhs_shape[rhs_spec[0]] * rhs_shape[rhs_spec[1]] * kernel_spatial


@register_strategy("conv_general_dilated")
def conv_general_dilated(op: G.Op, ctx: Context) -> list[Strategy]:
    lhs_spec, rhs_spec, out_spec = conv_dims(op)
    lhs_shape, rhs_shape = op.input_shapes[0], op.input_shapes[1]
    out_shape, out_dtype = op.output_shapes[0], op.output_dtypes[0]
    groups = op.params.get("feature_group_count", 1) or 1
    batch_groups = op.params.get("batch_group_count", 1) or 1
    ln, lc = lhs_spec[0], lhs_spec[1]
    ro, ri = rhs_spec[0], rhs_spec[1]
    on, oc = out_spec[0], out_spec[1]
    # Each slot: (name, [(operand index, dim)], result dim or None, partial?, size).
    if groups == 1 and batch_groups == 1:
        slots = [("batch", [(0, ln)], on, False, lhs_shape[ln]),
                 ("out_ch", [(1, ro)], oc, False, rhs_shape[ro]),
                 ("in_ch", [(0, lc), (1, ri)], None, True, lhs_shape[lc])]
    elif batch_groups == 1:
        slots = [("batch", [(0, ln)], on, False, lhs_shape[ln]),
                 ("group", [(0, lc), (1, ro)], oc, False, groups)]
    elif groups == 1:
        slots = [("group", [(0, ln), (1, ro)], oc, False, batch_groups),
                 ("in_ch", [(0, lc), (1, ri)], None, True, lhs_shape[lc])]
    else:
        slots = []
    flops = conv_flops(op)
    rate = ctx.dot_rate(op)
    ranks = (len(lhs_shape), len(rhs_shape))
    out = []
    for assignment in assign_axes([s[-1] for s in slots], ctx):
        specs = [[()] * ranks[0], [()] * ranks[1]]
        result = [()] * len(out_shape)
        partial: list[str] = []
        for (_, dims, rdim, is_partial, _), axes in zip(slots, assignment):
            if not axes:
                continue
            for k, d in dims:
                specs[k][d] = axes
            if rdim is not None:
                result[rdim] = axes
            if is_partial:
                partial.extend(axes)
        ins = (tuple(specs[0]), tuple(specs[1]))
        base = tuple(result)
        if any(n % ctx.axis_size(a) for spec, shape in zip(ins + (base,), (lhs_shape, rhs_shape, out_shape))
               for a, n in zip(spec, shape)):
            continue
        used = math.prod(ctx.axis_size(a) for a in assignment)
        compute = ctx.compute(flops, used, rate)
        label = "·".join(f"{s[0]}={'+'.join(a)}" for s, a in zip(slots, assignment) if a) or "R"
        if not partial:
            out.append(Strategy(name=label, output_specs=(base,), input_specs=ins, compute_seconds=compute))
            continue
        nbytes = math.prod(out_shape) * np.dtype(out_dtype).itemsize / ctx.shards(base)
        ar = ctx.collective("all-reduce", nbytes, partial)
        out.append(Strategy(name=f"{label} all-reduce", output_specs=(base,), input_specs=ins,
                            compute_seconds=compute, collectives=(ar,)))
        rs = ctx.collective("reduce-scatter", nbytes, partial)
        for d, what in ((oc, "C"), (on, "N")):
            scattered = base[d] + tuple(partial)
            if out_shape[d] % ctx.axis_size(scattered):
                continue
            spec = base[:d] + (scattered,) + base[d + 1:]
            out.append(Strategy(name=f"{label} reduce-scatter->{what}", output_specs=(spec,), input_specs=ins,
                                compute_seconds=compute, collectives=(rs,)))
    return out
