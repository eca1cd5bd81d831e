"""Hand-written sharding strategies, as a user writes them: plain ``jax.jit(step, in_shardings=..., out_shardings=...)``.

These are the plan-quality benchmark's references outside autoplan: no autoplan code is in the path
(this module does not import autoplan).  A strategy gives every argument of a train step
``step(params, opt_state, batch) -> (params, opt_state, loss)`` a ``PartitionSpec`` over a mesh
whose axes are ``Auto``, and XLA's sharding propagation does the rest.

Strategies (`STRATEGIES`):

* ``data_parallel``   batch split over all mesh axes; parameters and optimizer state replicated.
* ``fsdp``            ZeRO-3: every parameter (and its optimizer state) split over all axes along its
                      largest divisible dim; batch over all axes.
* ``megatron``        tensor parallel over the ``"model"`` axis (Megatron-LM, Shoeybi et al. 2019):
                      column-parallel kernels split on their output (free) dim, row-parallel kernels on
                      their input (contracting) dim, attention heads split, vocab-parallel embedding;
                      batch replicated.
* ``dp_tp``           megatron over ``"model"`` + batch over the other axes.
* ``fsdp_tp``         dp_tp + every parameter also split over the other axes on another dim.
* ``expert_parallel`` the expert dim of expert weights over all axes (or ``"data"``), the rest data parallel.

Rules go by a parameter's *role*, read from the step's dataflow, not from its name: `roles` traces
the step with ``jax.make_jaxpr`` and follows each parameter leaf (through casts, transposes,
reshapes and nested calls) into the first ``dot_general`` / ``conv_general_dilated`` / ``gather``
that consumes it.  A kernel whose activation operand carries a dim produced by an earlier
column-parallel kernel's split output dim (e.g. attention's heads, an MLP's hidden units) and
contracts it is row-parallel; otherwise it is column-parallel and splits its first free dim (the
heads dim of a ``[d, heads, head_dim]`` kernel).  A parameter that is a batch dim of the dot
(``egcd,edf->egcf``) is an expert weight.  A table gathered by indices that come from the batch is
a (vocab-parallel) embedding; one gathered by computed indices (positions) is left whole.  A
vector added to a column-parallel output is that layer's bias and follows its split.  Optimizer
state leaves take the spec of the parameter they mirror (same tree-path suffix and shape).  A dim
that the chosen axes do not divide stays unsplit.

>>> import jax, jax.numpy as jnp
>>> def step(params, opt_state, batch):
...     loss = lambda p: jnp.mean(jax.nn.relu(batch["x"] @ p["a"]) @ p["b"])
...     loss, grads = jax.value_and_grad(loss)(params)
...     return jax.tree.map(lambda p, g: p - g, params, grads), opt_state, loss
>>> params = {"a": jnp.zeros((8, 32)), "b": jnp.zeros((32, 8))}
>>> r = roles(step, (params, (), {"x": jnp.zeros((4, 8))}))
>>> r["['a']"].kind, r["['a']"].dim, r["['b']"].kind, r["['b']"].dim
('column', 1, 'row', 0)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import Literal
from jax.sharding import NamedSharding, PartitionSpec

P = PartitionSpec
STRATEGIES = ("data_parallel", "fsdp", "megatron", "dp_tp", "fsdp_tp", "expert_parallel")
MODEL_AXIS = "model"


class NotApplicable(ValueError):
    """The strategy does not apply to this model or mesh (e.g. megatron on a mesh without a "model" axis)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Role:
    """What a parameter leaf does in the step, read from the jaxpr.

    kind: "column" | "row" | "embedding" | "table" | "bias" | "other".
    dim: the parameter dim Megatron splits over "model" (None: keep whole).
    expert_dims: parameter dims consumed as batch dims of a dot (experts).
    primitive: the consuming primitive ("dot_general", "conv_general_dilated", "gather", an elementwise op).
    """

    kind: str
    dim: int | None = None
    expert_dims: tuple[int, ...] = ()
    primitive: str = ""


_OTHER = Role(kind="other")


# ----------------------------------------------------------------------------- dataflow labels
# Every traced value carries, per dim, a frozenset of labels:
#   ("p", leaf, dim)   this dim is parameter leaf `leaf`'s dim `dim`, element for element
#   ("pb", leaf, dim)  the same, after a broadcast (a bias or scale on its way to an elementwise op)
#   ("col", uid)       the split output dim of column-parallel kernel `uid`
#   ("in",)            derived from the batch
#   ("h",)             derived from a parameterized dot / conv / embedding lookup
_EMPTY: frozenset = frozenset()
_IN = frozenset({("in",)})
_HIDDEN = ("h",)  # output of a parameterized dot, conv or embedding lookup (the residual stream and its kin)


def _param_labels(labels: frozenset, kinds=("p",)) -> list[tuple]:
    return [label for label in labels if label[0] in kinds]


def _strip_params(labels: frozenset) -> frozenset:
    return frozenset(label for label in labels if label[0] not in ("p", "pb"))


def _has(labels: frozenset, kind: str) -> bool:
    return any(label[0] == kind for label in labels)


def _to_broadcast(labels: frozenset) -> frozenset:
    return frozenset(("pb", *label[1:]) if label[0] == "p" else label for label in labels)


class _Walker:
    """Abstract interpretation of a jaxpr over the labels above; records each parameter's role."""

    def __init__(self, demoted: frozenset = frozenset()):
        self.roles: dict[int, Role] = {}
        self.demoted = demoted  # leaves whose output turned out to be the residual stream: kept whole
        self.col_leaf: dict[int, int] = {}  # column label uid -> its leaf
        self.residual: set[int] = set()  # leaves whose column label met a residual add
        self.uid = itertools.count()

    def _column_label(self, leaf: int) -> frozenset:
        uid = next(self.uid)
        self.col_leaf[uid] = leaf
        return frozenset({("col", uid), _HIDDEN})

    # -- helpers
    def _set_role(self, leaf: int, role: Role) -> None:
        self.roles.setdefault(leaf, role)

    def _leaf_dims(self, val, kinds=("p",)) -> dict[int, dict[int, int]]:
        """leaf -> {operand dim: parameter dim} for the parameter labels a value carries."""
        out: dict[int, dict[int, int]] = {}
        for k, labels in enumerate(val):
            for _, leaf, dim in sorted(_param_labels(labels, kinds)):
                out.setdefault(leaf, {}).setdefault(k, dim)
        return out

    def run(self, jaxpr, in_vals: Sequence) -> list:
        env: dict = {}
        for var, val in zip(jaxpr.invars, in_vals):
            if val is not None:
                env[var] = val
        for eqn in jaxpr.eqns:
            vals = [None if isinstance(v, Literal) else env.get(v) for v in eqn.invars]
            if all(v is None for v in vals):
                continue
            outs = self.eqn(eqn, vals)
            for var, val in zip(eqn.outvars, outs):
                if val is not None and any(val):
                    env[var] = val
        return [None if isinstance(v, Literal) else env.get(v) for v in jaxpr.outvars]

    def eqn(self, eqn, vals) -> list:
        name = eqn.primitive.name
        shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
        vals = [v if v is not None else (_EMPTY,) * len(s) for v, s in zip(vals, shapes)]
        out_shapes = [getattr(v.aval, "shape", ()) for v in eqn.outvars]
        if name == "dot_general":
            return [self.dot_general(eqn, vals)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, vals)]
        if name == "gather":
            return [self.gather(eqn, vals, out_shapes[0])]
        sub = _subjaxpr(eqn)
        if sub is not None:
            return self.call(eqn, sub, vals, out_shapes)
        rule = _STRUCTURAL.get(name)
        if rule is not None:
            return [rule(eqn, vals[0], shapes[0], out_shapes[0])]
        return self.elementwise(eqn, vals, shapes, out_shapes)

    # -- consumers
    def dot_general(self, eqn, vals):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        (lhs, rhs), (lshape, rshape) = vals, [v.aval.shape for v in eqn.invars]
        lfree = [d for d in range(len(lshape)) if d not in lc and d not in lb]
        rfree = [d for d in range(len(rshape)) if d not in rc and d not in rb]
        out = [_strip_params(lhs[a] | rhs[b]) for a, b in zip(lb, rb)]
        out += [_strip_params(lhs[d]) for d in lfree] + [_strip_params(rhs[d]) for d in rfree]
        offsets = (len(lb), len(lb) + len(lfree))
        for side, (val, other, contract, other_contract, batch, free, offset) in enumerate((
                (lhs, rhs, lc, rc, lb, lfree, offsets[0]), (rhs, lhs, rc, lc, rb, rfree, offsets[1]))):
            for leaf, dims in self._leaf_dims(val).items():
                if leaf in self.roles:
                    continue
                experts = tuple(dims[d] for d in batch if d in dims)
                row = [(c, oc) for c, oc in zip(contract, other_contract) if _has(other[oc], "col") and c in dims]
                if row:
                    self._set_role(leaf, Role(kind="row", dim=dims[row[0][0]], expert_dims=experts,
                                              primitive="dot_general"))
                    continue
                split = next((d for d in free if d in dims), None)
                if leaf in self.demoted or split is None:
                    self._set_role(leaf, Role(kind="other", expert_dims=experts, primitive="dot_general"))
                else:
                    self._set_role(leaf, Role(kind="column", dim=dims[split], expert_dims=experts,
                                              primitive="dot_general"))
                    k = offset + free.index(split)
                    out[k] = out[k] | self._column_label(leaf)
        if self._leaf_dims(lhs) or self._leaf_dims(rhs):
            out = [labels | {_HIDDEN} for labels in out]
        return tuple(out)

    def conv(self, eqn, vals):
        numbers = eqn.params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
        lhs, rhs = vals
        out = [_EMPTY] * len(out_spec)
        out[out_spec[0]] = _strip_params(lhs[lhs_spec[0]])
        for o, i in zip(out_spec[2:], lhs_spec[2:]):
            out[o] = _strip_params(lhs[i])
        grouped = eqn.params.get("feature_group_count", 1) != 1
        for leaf, dims in self._leaf_dims(rhs).items():
            if leaf in self.roles:
                continue
            if _has(lhs[lhs_spec[1]], "col") and rhs_spec[1] in dims and not grouped:
                self._set_role(leaf, Role(kind="row", dim=dims[rhs_spec[1]], primitive="conv_general_dilated"))
            elif rhs_spec[0] in dims and leaf not in self.demoted:
                self._set_role(leaf, Role(kind="column", dim=dims[rhs_spec[0]], primitive="conv_general_dilated"))
                out[out_spec[1]] = out[out_spec[1]] | self._column_label(leaf)
            else:
                self._set_role(leaf, Role(kind="other", primitive="conv_general_dilated"))
        if self._leaf_dims(rhs):
            out = [labels | {_HIDDEN} for labels in out]
        return tuple(out)

    def gather(self, eqn, vals, out_shape):
        operand, indices = vals
        numbers = eqn.params["dimension_numbers"]
        indexed = list(numbers.start_index_map)
        from_batch = any(_has(labels, "in") for labels in indices)
        hidden = False
        for leaf, dims in self._leaf_dims(operand).items():
            if leaf in self.roles:
                continue
            dim = next((dims[d] for d in indexed if d in dims), None)
            self._set_role(leaf, Role(kind="embedding" if from_batch else "table",
                                      dim=dim if from_batch else None, primitive="gather"))
            hidden = from_batch
        kept = [d for d in range(len(operand)) if d not in numbers.collapsed_slice_dims
                and d not in getattr(numbers, "operand_batching_dims", ())]
        batch_dims = [d for d in range(len(indices) - 1)]
        out, kept_iter, batch_iter = [], iter(kept), iter(batch_dims)
        for k in range(len(out_shape)):
            if k in numbers.offset_dims:
                d = next(kept_iter, None)
                out.append(_strip_params(operand[d]) if d is not None else _EMPTY)
            else:
                d = next(batch_iter, None)
                out.append(indices[d] if d is not None else _EMPTY)
        return tuple(labels | {_HIDDEN} for labels in out) if hidden else tuple(out)

    def call(self, eqn, sub, vals, out_shapes):
        jaxpr, mode = sub
        if mode == "scan":
            consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
            inner = list(vals[: consts + carry]) + [v[1:] for v in vals[consts + carry:]]
            outs = self.run(jaxpr, inner)
            return [o if k < carry or o is None else (_EMPTY, *o) for k, o in enumerate(outs)]
        if len(jaxpr.invars) != len(vals):
            return [None] * len(out_shapes)
        return self.run(jaxpr, vals)

    def elementwise(self, eqn, vals, shapes, out_shapes):
        """Same-rank operands map dim to dim; a parameter combined with a non-parameter ends its trail there."""
        outs = []
        for out_shape in out_shapes:
            ranked = [(v, s) for v, s in zip(vals, shapes) if len(s) == len(out_shape) and len(s) > 0]
            if not ranked:
                outs.append(None)
                continue
            with_params = [bool(self._leaf_dims(v, ("p", "pb"))) for v, _ in ranked]
            mixed = any(with_params) and not all(with_params)
            if mixed:
                self._bias_roles(eqn, ranked, with_params)
            elif eqn.primitive.name in ("add", "sub") and len(ranked) == 2:
                self._residual_add(ranked)
            out = []
            for k, size in enumerate(out_shape):
                labels = _EMPTY
                for v, s in ranked:
                    keep = v[k] if (s == out_shape and not mixed) else _strip_params(v[k])
                    labels = labels | keep
                out.append(labels)
            outs.append(tuple(out))
        return outs

    def _residual_add(self, ranked):
        """A column label added to a hidden value that lacks it: that kernel's output is the residual stream."""
        (a, _), (b, _) = ranked
        for x, y in ((a, b), (b, a)):
            for k in range(len(x)):
                if _HIDDEN in y[k]:
                    for label in x[k] - y[k]:
                        if label[0] == "col":
                            self.residual.add(self.col_leaf[label[1]])

    def _bias_roles(self, eqn, ranked, with_params):
        activations = [v for (v, _), p in zip(ranked, with_params) if not p]
        for (v, _), is_param in zip(ranked, with_params):
            if not is_param:
                continue
            for leaf, dims in self._leaf_dims(v, ("p", "pb")).items():
                if leaf in self.roles:
                    continue
                split = next((dims[k] for k in dims if any(_has(a[k], "col") for a in activations)), None)
                if split is not None:
                    self._set_role(leaf, Role(kind="bias", dim=split, primitive=eqn.primitive.name))


def _subjaxpr(eqn):
    """(open jaxpr, mode) of a call-like primitive, or None."""
    if eqn.primitive.name == "scan":
        return eqn.params["jaxpr"].jaxpr, "scan"
    if eqn.primitive.name in ("while", "cond"):
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        return (sub.jaxpr if hasattr(sub, "consts") else sub), "call"
    return None


def _broadcast(eqn, val, shape, out_shape):
    dims = eqn.params["broadcast_dimensions"]
    grows = math.prod(out_shape) != math.prod(shape)
    out = [_EMPTY] * len(out_shape)
    for i, d in enumerate(dims):
        if shape[i] == out_shape[d]:
            out[d] = _to_broadcast(val[i]) if grows else val[i]
    return tuple(out)


def _transpose(eqn, val, shape, out_shape):
    return tuple(val[p] for p in eqn.params["permutation"])


def _reshape(eqn, val, shape, out_shape):
    """Groups of dims with equal products map onto each other; a merged dim keeps all its sources' labels."""
    out = [_EMPTY] * len(out_shape)
    i = j = 0
    while i < len(shape) or j < len(out_shape):
        gi, gj = [i] if i < len(shape) else [], [j] if j < len(out_shape) else []
        pi = shape[i] if gi else 1
        pj = out_shape[j] if gj else 1
        i, j = i + bool(gi), j + bool(gj)
        while pi != pj:
            if pi < pj and i < len(shape):
                gi.append(i), (pi := pi * shape[i])
                i += 1
            elif j < len(out_shape):
                gj.append(j), (pj := pj * out_shape[j])
                j += 1
            else:
                break
        labels = frozenset().union(*(val[k] for k in gi)) if gi else _EMPTY
        target = next((k for k in gj if out_shape[k] > 1), None)
        if target is not None:
            out[target] = labels
    return tuple(out)


def _reduce(eqn, val, shape, out_shape):
    axes = eqn.params["axes"]
    return tuple(_strip_params(val[k]) for k in range(len(shape)) if k not in axes)


def _squeeze(eqn, val, shape, out_shape):
    return tuple(val[k] for k in range(len(shape)) if k not in eqn.params["dimensions"])


_STRUCTURAL = {
    "broadcast_in_dim": _broadcast, "transpose": _transpose, "reshape": _reshape, "squeeze": _squeeze,
    **{name: _reduce for name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
                                  "reduce_and", "reduce_or")},
}


# ----------------------------------------------------------------------------- roles

_ROLE_CACHE: dict = {}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _path(keypath) -> str:
    return jax.tree_util.keystr(keypath)


def roles(step, args: Sequence[Any]) -> dict[str, Role]:
    """Role of every leaf of ``args[0]`` (the parameters), keyed by ``jax.tree_util.keystr`` of its path."""
    args = tuple(_abstract(a) for a in args)
    leaves = jax.tree_util.tree_leaves_with_path(args[0])
    key = (step, jax.tree.structure(args), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args)))
    if key not in _ROLE_CACHE:
        closed = jax.make_jaxpr(step)(*args)
        n_params = len(leaves)
        in_vals = []
        for k, var in enumerate(closed.jaxpr.invars):
            shape = var.aval.shape
            if k < n_params:
                in_vals.append(tuple(frozenset({("p", k, d)}) for d in range(len(shape))))
            else:
                in_vals.append(tuple(_IN for _ in shape))
        n_batch = len(jax.tree.leaves(args[-1]))
        n_mid = len(closed.jaxpr.invars) - n_params - n_batch
        in_vals[n_params:n_params + n_mid] = [None] * n_mid  # optimizer state: not batch-derived
        demoted: frozenset = frozenset()
        for _ in range(8):  # each pass demotes the column kernels whose output proved to be the residual stream
            walker = _Walker(demoted)
            walker.run(closed.jaxpr, in_vals)
            if walker.residual <= demoted:
                break
            demoted = demoted | walker.residual
        _ROLE_CACHE[key] = {_path(p): walker.roles.get(k, _OTHER) for k, (p, _) in enumerate(leaves)}
    return _ROLE_CACHE[key]


# ----------------------------------------------------------------------------- specs


def _axes_entry(axes: Sequence[str]):
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec(ndim: int, splits: dict[int, tuple[str, ...]]) -> PartitionSpec:
    entries = [_axes_entry(splits.get(d, ())) for d in range(ndim)]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _largest_divisible(shape, size: int, skip=()) -> int | None:
    dims = [d for d in range(len(shape)) if d not in skip and shape[d] % size == 0 and shape[d] >= size]
    return max(dims, key=lambda d: (shape[d], -d)) if dims else None


def _param_splits(strategy: str, shape, role: Role, mesh) -> dict[int, tuple[str, ...]]:
    names = tuple(mesh.axis_names)
    data = tuple(a for a in names if a != MODEL_AXIS)
    if strategy == "data_parallel":
        return {}
    if strategy == "fsdp":
        d = _largest_divisible(shape, _size(mesh, names))
        return {} if d is None else {d: names}
    if strategy == "expert_parallel":
        for axes in (names, data):
            if axes and role.expert_dims and shape[role.expert_dims[0]] % _size(mesh, axes) == 0:
                return {role.expert_dims[0]: axes}
        return {}
    splits = {}
    tp = mesh.shape[MODEL_AXIS]
    if role.kind in ("column", "row", "embedding", "bias") and role.dim is not None and shape[role.dim] % tp == 0:
        splits[role.dim] = (MODEL_AXIS,)
    if strategy == "fsdp_tp" and data:
        d = _largest_divisible(shape, _size(mesh, data), skip=tuple(splits))
        if d is not None:
            splits[d] = data
    return splits


def applicable(strategy: str, step, args, mesh) -> str | None:
    """None if ``strategy`` applies to this step and mesh, else the reason it does not."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    names = tuple(mesh.axis_names)
    if strategy in ("megatron", "dp_tp", "fsdp_tp") and MODEL_AXIS not in names:
        return f"{strategy} needs a {MODEL_AXIS!r} mesh axis; mesh axes are {names}"
    if strategy in ("dp_tp", "fsdp_tp") and len(names) < 2:
        return f"{strategy} needs a data axis besides {MODEL_AXIS!r}; mesh axes are {names}"
    if strategy == "expert_parallel" and not any(r.expert_dims for r in roles(step, args).values()):
        return "no expert weights (no parameter is a batch dim of a dot_general)"
    return None


def _batch_axes(strategy: str, mesh) -> tuple[str, ...]:
    names = tuple(mesh.axis_names)
    if strategy == "megatron":
        return ()
    if strategy in ("dp_tp", "fsdp_tp"):
        return tuple(a for a in names if a != MODEL_AXIS)
    return names


def _mirror(tree, param_paths: dict[tuple, tuple[tuple, PartitionSpec]], replicated=P()):
    """Specs for an optimizer-state-like tree: a leaf whose path ends with a parameter's path and has its shape."""

    def spec(path, leaf):
        keys = tuple(map(str, path))
        shape = tuple(np.shape(leaf))
        for start in range(len(keys)):
            hit = param_paths.get(keys[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(spec, tree)


def shardings(strategy: str, step, args: Sequence[Any], mesh) -> tuple[tuple, tuple]:
    """``(in_specs, out_specs)``: PartitionSpec pytrees for ``step(*args)`` under ``strategy`` on ``mesh``.

    ``args`` is ``(params, opt_state..., batch)`` (arrays or ShapeDtypeStructs).  Raises `NotApplicable`
    with the reason where the strategy does not apply.
    """
    reason = applicable(strategy, step, args, mesh)
    if reason:
        raise NotApplicable(reason)
    args = tuple(_abstract(a) for a in args)
    role_of = roles(step, args) if strategy != "data_parallel" else {}
    param_specs = jax.tree_util.tree_map_with_path(
        lambda p, x: _spec(len(x.shape), _param_splits(strategy, x.shape, role_of.get(_path(p), _OTHER), mesh)),
        args[0])
    by_path = {tuple(map(str, p)): (tuple(x.shape), s) for (p, x), s in zip(
        jax.tree_util.tree_leaves_with_path(args[0]), jax.tree.leaves(param_specs, is_leaf=_is_spec))}
    batch_axes = _batch_axes(strategy, mesh)

    def batch_spec(x):
        if not x.shape or not batch_axes or x.shape[0] % _size(mesh, batch_axes):
            return P()
        return P(_axes_entry(batch_axes))

    in_specs = (param_specs, *(_mirror(a, by_path) for a in args[1:-1]), jax.tree.map(batch_spec, args[-1]))
    outs = jax.eval_shape(step, *args)
    out_specs = tuple(
        in_specs[k] if k < len(args) and jax.tree.structure(o) == jax.tree.structure(args[k])
        else jax.tree.map(lambda _: P(), o) for k, o in enumerate(outs if isinstance(outs, tuple) else (outs,)))
    return in_specs, out_specs if isinstance(outs, tuple) else out_specs[0]


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def named_shardings(strategy: str, step, args, mesh):
    """`shardings` as NamedSharding pytrees."""
    in_specs, out_specs = shardings(strategy, step, args, mesh)
    to_named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=_is_spec)  # noqa: E731
    return to_named(in_specs), to_named(out_specs)


def jit(strategy: str, step, args, mesh, *, donate: bool = True):
    """``jax.jit(step, in_shardings=..., out_shardings=...)`` for ``strategy``; donates params and optimizer
    state when ``donate`` (as a training loop does)."""
    in_shardings, out_shardings = named_shardings(strategy, step, args, mesh)
    donate_argnums = tuple(range(len(args) - 1)) if donate else ()
    return jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)


def compile(strategy: str, step, args, mesh, *, donate: bool = True):  # noqa: A001 - mirrors jax's AOT name
    """The compiled program (``jax.stages.Compiled``) of `jit` for abstract or concrete ``args``."""
    return jit(strategy, step, args, mesh, donate=donate).lower(*(_abstract(a) for a in args)).compile()
