"""Stacked layers cut into chunks along their stacked axis, so that a pipeline can cut a scanned stack.

A model whose blocks are stacked with ``nn.scan`` (or ``lax.scan`` over a
parameter pytree with a leading layer axis) traces to one forward scan and one
transposed scan over all layers, and its parameters and optimizer state are
arrays of ``L`` layers each.  A pipeline needs each stage to own some layers.
`Unstacked` rewrites the step so that each such leaf is ``chunks`` leaves (the
layer ranges of `pipeline.even_bounds`), and re-evaluates the traced step with:

* every scan that reads a chunked value as ``xs`` run chunk by chunk (carries
  chained, in reverse for a reversed scan), its stacked results chunked alike;
* elementwise ops (the optimizer update) run chunk by chunk;
* any other op reading a chunked value reads it whole (concatenated): correct,
  only not cut.

The scans of chunk ``k`` run under the name scope ``trace.CHUNK_SCOPE + k``,
so trace puts them in layer ``"<stack>[k]"``: the stack is ``chunks`` pipeline
layers (elementwise ops keep their own scope: an optimizer update stays one).  Each chunk leaf is its own leaf, so `staging.homes` keeps it on the
one stage row that runs its chunk.  ``split`` / ``join`` convert the user's
arguments and results.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from autoplan._src import compat
from autoplan._src import pipeline as PL
from autoplan._src import trace as T

# Ops applied element by element (scalars broadcast): a chunked operand gives a chunked result.
ELEMENTWISE = frozenset({
    "abs", "add", "add_any", "and", "atan2", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos",
    "div", "eq", "erf", "exp", "exp2", "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log",
    "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "not", "or", "pow", "rem", "round", "rsqrt",
    "select_n", "sign", "sin", "sqrt", "square", "sub", "tan", "tanh",
})
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})


class Chunks(tuple):
    """A stacked leaf's chunks in the user's pytree (a pytree node: each chunk is a leaf)."""


jax.tree_util.register_pytree_with_keys(
    Chunks, lambda c: ([(jax.tree_util.SequenceKey(i), x) for i, x in enumerate(c)], None),
    lambda _, children: Chunks(children))


@dataclasses.dataclass(frozen=True, slots=True)
class Chunked:
    """A stacked value as its chunks along axis 0 (``bounds``: their layer ranges)."""

    parts: tuple
    bounds: tuple[tuple[int, int], ...]

    def whole(self):
        return jnp.concatenate(self.parts, axis=0)


class Unstacked:
    """``step`` with the stacked leaves of its arguments cut into ``chunks`` leaves each.

    A leaf is stacked when it is a non-batch argument leaf whose leading dim is
    the length of a scan that reads one of the step's leaves as ``xs`` (the
    layer axis); the optimizer's moments of those leaves have the same leading
    dim and are cut too.  Results aliased to a stacked argument leaf come back
    cut the same way.

    >>> import jax, jax.numpy as jnp
    >>> def step(w, x):  # a scan over 4 stacked layers, then an SGD update
    ...     def loss(w):
    ...         h, _ = jax.lax.scan(lambda h, layer: (jnp.tanh(h @ layer), None), x, w)
    ...         return (h ** 2).mean()
    ...     value, grad = jax.value_and_grad(loss)(w)
    ...     return w - 0.1 * grad, value
    >>> w, x = jnp.ones((4, 3, 3)) / 3, jnp.ones((2, 3))
    >>> unstacked = Unstacked(step, chunks=2)
    >>> parts = unstacked.split(w, x)
    >>> [p.shape for p in parts[0]]
    [(2, 3, 3), (2, 3, 3)]
    >>> new_w, loss = unstacked.join(jax.jit(unstacked.chunked_step)(*parts))
    >>> bool(jnp.allclose(new_w, step(w, x)[0])), bool(jnp.allclose(loss, step(w, x)[1]))
    (True, True)
    """

    def __init__(self, step: Callable, chunks: int, batch_argnum: int = -1):
        self.step, self.chunks, self.batch_argnum = step, chunks, batch_argnum
        self._layouts: dict = {}
        # The step's name and argument names (what plans call its leaves: params/..., opt_state/...).
        self.chunked_step = functools.wraps(step)(lambda *split_args: self._chunked_step(*split_args))

    # -- which leaves are stacked ------------------------------------------------------------------
    def layout(self, *args) -> dict:
        """``{"inputs": {leaf: L}, "outputs": {leaf: L}, "bounds": ..., "jaxpr": ...}`` for these args."""
        key = jax.tree_util.tree_structure(args), tuple(
            (tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(args))
        if key not in self._layouts:
            self._layouts[key] = self._find(args)
        return self._layouts[key]

    def _find(self, args) -> dict:
        structs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
        graph = T.trace(self.step, *structs, opaque_structure=True)  # its jaxpr, output tree and aliases
        closed = graph.closed_jaxpr
        leaves = jax.tree_util.tree_leaves(structs)
        batch_argnum = self.batch_argnum % len(args)
        first_batch = sum(len(jax.tree_util.tree_leaves(a)) for a in args[:batch_argnum])
        batch = set(range(first_batch, first_batch + len(jax.tree_util.tree_leaves(args[batch_argnum]))))
        position = {v: i for i, v in enumerate(closed.jaxpr.invars)}
        lengths = set()
        for eqn in _flat_equations(closed.jaxpr):
            if eqn.primitive.name == "scan":
                xs = eqn.invars[eqn.params["num_consts"] + eqn.params["num_carry"]:]
                if any(position.get(v) is not None and position[v] not in batch for v in xs
                       if not compat.is_literal(v)):
                    lengths.add(eqn.params["length"])
        if len(lengths) != 1:
            raise ValueError("no stacked layers to cut: the step has " + (
                "no scan over its argument leaves" if not lengths else f"scans of lengths {sorted(lengths)}") +
                "; Unstacked cuts one stack of layers (an nn.scan over blocks)")
        length = lengths.pop()
        if length < self.chunks:
            raise ValueError(f"the stack has {length} layers, fewer than the {self.chunks} chunks asked for")
        inputs = {i: length for i, x in enumerate(leaves) if i not in batch and x.shape and x.shape[0] == length}
        outputs = {o: length for o, i in graph.aliases.items() if i in inputs}
        return {"inputs": inputs, "outputs": outputs, "jaxpr": closed, "output_tree": graph.output_tree,
                "bounds": tuple(PL.even_bounds(length, self.chunks, what="the stack has only {n} layers"))}

    # -- the user's arguments and results ----------------------------------------------------------
    def split(self, *args):
        """``args`` with each stacked leaf replaced by its `Chunks`."""
        layout = self.layout(*args)
        leaves, tree = jax.tree_util.tree_flatten(args)
        def chunks(x):
            if isinstance(x, jax.ShapeDtypeStruct):  # planning over abstract arguments
                return Chunks(jax.ShapeDtypeStruct((b - a, *x.shape[1:]), x.dtype) for a, b in layout["bounds"])
            return Chunks(x[a:b] for a, b in layout["bounds"])
        cut = [chunks(x) if i in layout["inputs"] else x for i, x in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(tree, cut)

    def join(self, outputs):
        """The chunked step's results with each `Chunks` leaf concatenated back (on one device set)."""
        def whole(x):
            if not isinstance(x, Chunks):
                return x
            if all(getattr(p, "sharding", None) == getattr(x[0], "sharding", None) for p in x):
                return jnp.concatenate(x, axis=0)
            # Chunks kept on different stage rows: gathered on the first device (a copy).
            return jnp.concatenate([jax.device_put(p, jax.devices()[0]) for p in x], axis=0)
        return jax.tree_util.tree_map(whole, outputs, is_leaf=lambda x: isinstance(x, Chunks))

    def _chunked_step(self, *split_args):
        """The step on split arguments (`split`), returning split results (as ``chunked_step``)."""
        def struct(x):
            if isinstance(x, Chunks):
                return jax.ShapeDtypeStruct((sum(p.shape[0] for p in x), *x[0].shape[1:]), x[0].dtype)
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        joined = jax.tree_util.tree_map(struct, split_args, is_leaf=lambda x: isinstance(x, Chunks))
        layout = self.layout(*joined)
        closed, bounds = layout["jaxpr"], layout["bounds"]
        flat = jax.tree_util.tree_leaves(split_args, is_leaf=lambda x: isinstance(x, Chunks))
        values = [Chunked(tuple(x), bounds) if isinstance(x, Chunks) else x for x in flat]
        outs = _Interpreter().run(closed.jaxpr, closed.consts, values)
        outs = [Chunks(out.parts) if isinstance(out, Chunked) and o in layout["outputs"]
                else out.whole() if isinstance(out, Chunked) else out for o, out in enumerate(outs)]
        return jax.tree_util.tree_unflatten(layout["output_tree"], outs)


def _flat_equations(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CALLS:
            yield from _flat_equations(compat.open_jaxpr(eqn.params["jaxpr"])[0])
        else:
            yield eqn


class _Interpreter:
    """Evaluates a jaxpr on values some of which are `Chunked` (see the module docstring)."""

    def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
        env: dict = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value

        def read(atom):
            return compat.literal_value(atom) if compat.is_literal(atom) else env[atom]

        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, invals)
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, invals: list) -> list:
        if not any(isinstance(x, Chunked) for x in invals):
            return compat.bind_equation(eqn, invals)
        name = eqn.primitive.name
        if name in _CALLS:
            inner, consts = compat.open_jaxpr(eqn.params["jaxpr"])
            return self.run(inner, consts, invals)
        if name == "scan":
            return self.scan(eqn, invals)
        if name in ELEMENTWISE:
            return self.elementwise(eqn, invals)
        return compat.bind_equation(eqn, [x.whole() if isinstance(x, Chunked) else x for x in invals])

    def elementwise(self, eqn, invals: list) -> list:
        bounds = next(x.bounds for x in invals if isinstance(x, Chunked))
        full = eqn.outvars[0].aval.shape
        parts = []
        for k, (a, b) in enumerate(bounds):
            def part(x):
                if isinstance(x, Chunked):
                    return x.parts[k] if x.bounds == bounds else x.whole()[a:b]
                return x[a:b] if getattr(x, "shape", ()) == full and full else x
            parts.append(compat.bind_equation(eqn, [part(x) for x in invals]))
        return [Chunked(tuple(p[i] for p in parts), bounds) for i in range(len(eqn.outvars))]

    def scan(self, eqn, invals: list) -> list:
        params = eqn.params
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        consts = [x.whole() if isinstance(x, Chunked) else x for x in invals[:n_consts]]
        carry = [x.whole() if isinstance(x, Chunked) else x for x in invals[n_consts:n_consts + n_carry]]
        xs = invals[n_consts + n_carry:]
        bounds = next((x.bounds for x in xs if isinstance(x, Chunked)), None)
        if bounds is None:  # chunked consts or carry only: run whole
            return compat.bind_equation(eqn, [*consts, *carry, *[x for x in xs]])
        ys: list[list] = [[None] * len(bounds) for _ in range(len(eqn.outvars) - n_carry)]
        order = range(len(bounds) - 1, -1, -1) if params["reverse"] else range(len(bounds))
        for k in order:
            a, b = bounds[k]
            xs_k = [x.parts[k] if isinstance(x, Chunked) and x.bounds == bounds
                    else (x.whole() if isinstance(x, Chunked) else x)[a:b] for x in xs]
            chunk_eqn = eqn.replace(params={**params, "length": b - a})
            with jax.named_scope(f"{T.CHUNK_SCOPE}{k}"):
                outs = compat.bind_equation(chunk_eqn, [*consts, *carry, *xs_k])
            carry = outs[:n_carry]
            for i, y in enumerate(outs[n_carry:]):
                ys[i][k] = y
        return [*carry, *[Chunked(tuple(parts), bounds) for parts in ys]]
