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
layers.  A chunk leaf (its path ends in ``/k``) belongs to that layer too, and
is its own leaf, so `staging.homes` keeps it on the one stage row that runs its
chunk.  ``split`` / ``join`` convert the user's
arguments and results.

The inter-operator pass does this by itself for a step that scans over one
stack (`find_stack`, `chunk_count`; ``Plan.stack_chunks``), and
`UnstackedProgram` runs such a plan on the user's stacked arguments: a stacked
leaf lives between steps as one ``P("stage", ...)`` array, each stage row's
shards holding that row's layers, so cutting it into chunks and joining them
back moves nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
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
        key = _signature(args)
        if key not in self._layouts:
            self._layouts[key] = self._with_bounds(find_stack(self.step, args, self.batch_argnum))
        return self._layouts[key]

    def knowing(self, args, found: dict) -> Unstacked:
        """This, with the layout of ``args`` taken from ``found`` (`find_stack` of the same step and
        arguments) instead of tracing the step again."""
        self._layouts[_signature(args)] = self._with_bounds(found)
        return self

    def _with_bounds(self, found: dict | None) -> dict:
        if found is None:
            raise ValueError("no stacked layers to cut: the step has no scan over its argument leaves; "
                             "Unstacked cuts one stack of layers (an nn.scan over blocks)")
        if found["length"] < self.chunks:
            raise ValueError(f"the stack has {found['length']} layers, fewer than the {self.chunks} chunks asked for")
        return found | {"bounds": tuple(PL.even_bounds(found["length"], self.chunks,
                                                        what="the stack has only {n} layers"))}

    # -- the user's arguments and results ----------------------------------------------------------
    def split(self, *args):
        """``args`` with each stacked leaf replaced by its `Chunks`."""
        layout = self.layout(*args)
        leaves, tree = jax.tree_util.tree_flatten(args)
        def chunks(x):
            if isinstance(x, jax.ShapeDtypeStruct):  # planning over abstract arguments
                return _chunk_structs(x, layout["bounds"])
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


def _signature(args) -> tuple:
    return jax.tree_util.tree_structure(args), tuple(
        (tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(args))


def _chunk_structs(x, bounds) -> Chunks:
    """The chunks of an abstract stacked leaf (planning over ShapeDtypeStructs)."""
    return Chunks(jax.ShapeDtypeStruct((b - a, *x.shape[1:]), x.dtype) for a, b in bounds)


def find_stack(step: Callable, args: Sequence[Any], batch_argnum: int = -1) -> dict | None:
    """The stack of layers ``step`` scans over: ``{"length": L, "inputs": {leaf: L}, "outputs": {leaf: L},
    "jaxpr", "output_tree"}``, or None when no scan reads a non-batch argument leaf as ``xs``.

    A stacked leaf is a non-batch argument leaf whose leading dim is the length of such a scan (the
    layers' weights and their optimizer moments); results aliased to one are stacked alike.  Scans of
    several lengths over argument leaves (an encoder and a decoder stack) are refused: `Unstacked`
    cuts one stack.
    """
    structs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tuple(args))
    graph = T.trace(step, *structs, opaque_structure=True)  # its jaxpr, output tree and aliases
    closed = graph.closed_jaxpr
    leaves = jax.tree_util.tree_leaves(structs)
    batch_argnum = batch_argnum % len(args)
    first_batch = sum(len(jax.tree_util.tree_leaves(a)) for a in structs[:batch_argnum])
    batch = set(range(first_batch, first_batch + len(jax.tree_util.tree_leaves(structs[batch_argnum]))))
    position = {v: i for i, v in enumerate(closed.jaxpr.invars)}
    lengths = set()
    for eqn in _flat_equations(closed.jaxpr):
        if eqn.primitive.name == "scan":
            xs = eqn.invars[eqn.params["num_consts"] + eqn.params["num_carry"]:]
            if any(position.get(v) is not None and position[v] not in batch for v in xs
                   if not compat.is_literal(v)):
                lengths.add(eqn.params["length"])
    if not lengths:
        return None
    if len(lengths) > 1:
        raise ValueError(f"the step scans over its argument leaves with stacks of lengths {sorted(lengths)}; "
                         "Unstacked cuts one stack of layers (an nn.scan over blocks)")
    length = lengths.pop()
    inputs = {i: length for i, x in enumerate(leaves) if i not in batch and x.shape and x.shape[0] == length}
    outputs = {o: length for o, i in graph.aliases.items() if i in inputs}
    return {"length": length, "inputs": inputs, "outputs": outputs, "jaxpr": closed,
            "output_tree": graph.output_tree}


def has_chunks(args) -> bool:
    """Whether ``args`` already hold `Chunks` (the arguments of an `Unstacked` step)."""
    return any(isinstance(x, Chunks) for x in jax.tree_util.tree_leaves(args, is_leaf=lambda x: isinstance(x, Chunks)))


def chunk_count(length: int, stages: int | None, virtual: int = 1, *, most: int = 16) -> int:
    """How many chunks to cut a stack of ``length`` layers into for a pipeline of ``stages`` rows with
    ``virtual`` chunks each (None: the stage DP chooses the rows): the most, up to ``most`` and
    ``length``, that the rows share equally, preferring counts that divide the layers evenly.

    >>> chunk_count(4, 2), chunk_count(96, 4), chunk_count(96, None), chunk_count(6, 4), chunk_count(4, 3)
    (4, 16, 16, 4, 3)
    """
    need = (stages or 1) * virtual
    fits = [c for c in range(need, min(length, most) + 1) if c % need == 0]
    even = [c for c in fits if length % c == 0]
    return max(even or fits or [need])


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


# -- a pipelined plan of a stacked step, run on the user's stacked arguments -------------------------
def _chunk_leaves(structure: jax.tree_util.PyTreeDef, leaves: Sequence) -> list[tuple[bool, list]]:
    """The chunked step's leaves (``leaves``, in its flat order) grouped per leaf of the user's tree:
    (stacked, entries), one entry for a plain leaf and the chunks' entries for a stacked one."""
    dummy = jax.tree_util.tree_unflatten(structure, range(structure.num_leaves))
    groups = jax.tree_util.tree_leaves(dummy, is_leaf=lambda x: isinstance(x, Chunks))
    return [(True, [leaves[j] for j in group]) if isinstance(group, Chunks) else (False, [leaves[group]])
            for group in groups]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Joined:
    """How one stacked user leaf of a pipelined stacked step lives between steps.

    ``spec`` (the chunks' common PartitionSpec, stacked axis whole) is set when every stage row holds
    one contiguous run of the same number of layers with the same spec (`inter._stack_share` makes the
    stage DP cut so): the leaf is then one ``P("stage", ...)`` array over the whole mesh, and splitting
    it into chunks or joining them moves no data.  Otherwise (interleaved rows hold chunks that are
    not contiguous) the leaf's layers are split evenly over ``"stage"`` (replicated if they do not
    divide), and each step copies every chunk to its row and back.
    """

    bounds: tuple[tuple[int, int], ...]
    rows: tuple[int, ...]  # per chunk: its stage row
    stages: int
    spec: jax.sharding.PartitionSpec | None

    @classmethod
    def of(cls, chunks: Sequence, bounds, num_rows: int) -> _Joined:
        rows = tuple(leaf.stage for leaf in chunks)
        specs = {leaf.spec for leaf in chunks}
        layers = [sum(b - a for (a, b), r in zip(bounds, rows) if r == row) for row in range(num_rows)]
        first = chunks[0].spec
        aligned = (None not in rows and list(rows) == sorted(rows) and len(set(layers)) == 1
                   and len(specs) == 1 and not (first and first[0]))
        spec = jax.sharding.PartitionSpec(*chunks[0].partition_spec[1:]) if aligned else None
        return cls(bounds=tuple(bounds), rows=rows, stages=num_rows, spec=spec)

    @property
    def over_stages(self) -> bool:
        """Whether the stacked axis is split over ``"stage"`` between steps (else the leaf is replicated)."""
        return self.spec is not None or self.bounds[-1][1] % self.stages == 0

    def sharding(self, mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
        if self.spec is not None:
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("stage", *self.spec))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("stage" if self.over_stages else None))

    def leaf_spec(self, chunk) -> tuple:
        """The whole leaf's spec (as `plan.LeafSharding` holds it) given one chunk's `LeafSharding`:
        what `sharding` lays out."""
        rest = chunk.spec[1:] if self.spec is not None else ((),) * (len(chunk.shape) - 1)
        return (("stage",) if self.over_stages else (), *rest)

    def _row_sharding(self, mesh: jax.sharding.Mesh, row: int) -> jax.sharding.NamedSharding:
        from autoplan._src import emit as E

        return jax.sharding.NamedSharding(E.stage_row(mesh, row), jax.sharding.PartitionSpec(None, *self.spec))

    def split(self, x: jax.Array, mesh: jax.sharding.Mesh) -> Chunks:
        x = x if x.sharding == self.sharding(mesh) else jax.device_put(x, self.sharding(mesh))
        if self.spec is None:
            return Chunks(x[a:b] for a, b in self.bounds)  # copies, moved to their rows by the pipeline
        parts = []
        for row in range(self.stages):
            local = self._row_sharding(mesh, row)
            devices = set(local.device_set)
            mine = [k for k, r in enumerate(self.rows) if r == row]
            first, last = self.bounds[mine[0]][0], self.bounds[mine[-1]][1]
            whole = jax.make_array_from_single_device_arrays(  # this row's layers, no copy
                (last - first, *x.shape[1:]), local, [s.data for s in x.addressable_shards if s.device in devices])
            parts += [whole] if len(mine) == 1 else [whole[self.bounds[k][0] - first:self.bounds[k][1] - first]
                                                     for k in mine]
        return Chunks(parts)

    def join(self, chunks: Chunks, mesh: jax.sharding.Mesh) -> jax.Array:
        if self.spec is None:
            everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            whole = jnp.concatenate([jax.device_put(p, everywhere) for p in chunks], axis=0)
            return jax.device_put(whole, self.sharding(mesh))
        shards = []
        for row in range(self.stages):
            mine = [p for p, r in zip(chunks, self.rows) if r == row]
            whole = mine[0] if len(mine) == 1 else jnp.concatenate(mine, axis=0)
            whole = jax.device_put(whole, self._row_sharding(mesh, row))
            shards += [s.data for s in whole.addressable_shards]
        length = self.bounds[-1][1]
        return jax.make_array_from_single_device_arrays((length, *chunks[0].shape[1:]), self.sharding(mesh), shards)


def _joined(plan, leaves: Sequence, structure) -> list[_Joined | None]:
    """Per user leaf of a plan of a cut stack (``leaves``: the plan's chunked inputs or outputs, in
    ``structure``), its `_Joined`, or None for a leaf that is not stacked."""
    out = []
    for stacked, group in _chunk_leaves(structure, leaves):
        if not stacked:
            out.append(None)
            continue
        ends = list(itertools.accumulate(leaf.shape[0] for leaf in group))
        out.append(_Joined.of(group, tuple(zip([0, *ends[:-1]], ends)), len(plan.stages)))
    return out


def user_inputs(plan, mesh: jax.sharding.Mesh) -> tuple[Any, list[tuple[Any, jax.sharding.NamedSharding]]]:
    """A plan of a cut stack (``plan.stack_chunks``) seen from the user's step: the tree of its
    arguments and, per leaf, (`plan.LeafSharding` of the whole leaf, where it lives between steps)."""
    from autoplan._src import emit as E

    chunked = E.leaf_shardings(plan.inputs, mesh)
    dummy = jax.tree_util.tree_unflatten(plan.input_tree, range(len(plan.inputs)))
    tree = jax.tree_util.tree_structure(dummy, is_leaf=lambda x: isinstance(x, Chunks))
    leaves = []
    for joined, (stacked, group) in zip(_joined(plan, plan.inputs, plan.input_tree),
                                       _chunk_leaves(plan.input_tree, list(zip(plan.inputs, chunked)))):
        if not stacked:
            leaves.append(group[0])
            continue
        first = group[0][0]
        whole = dataclasses.replace(first, path=first.path.rsplit("/", 1)[0], stage=None,
                                    shape=(joined.bounds[-1][1], *first.shape[1:]), spec=joined.leaf_spec(first))
        leaves.append((whole, joined.sharding(mesh)))
    return tree, leaves


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class UnstackedProgram:
    """A pipelined plan of a stacked step (``plan.stack_chunks``) run on the user's stacked arguments:
    each call splits the stacked leaves into their chunks (`_Joined`), runs the pipeline of the chunked
    step, and joins the stacked results back.  Like `emit.Program`: ``plan``, ``mesh``, ``in_shardings``
    (the user's tree), ``lower``."""

    plan: Any
    mesh: jax.sharding.Mesh
    graph: Any  # the user's step, traced
    unstacked: Unstacked
    inner: Any  # the chunked step's program (a `staging.StagedProgram`)
    inputs: tuple  # per user input leaf: its `_Joined`, or None for a leaf that is not stacked
    outputs: tuple
    in_shardings: Any

    def _split(self, args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        cut = [x if j is None else _chunk_structs(x, j.bounds) if isinstance(x, jax.ShapeDtypeStruct)
               else j.split(x, self.mesh) for x, j in zip(leaves, self.inputs)]
        return jax.tree_util.tree_unflatten(tree, cut)

    def __call__(self, *dynamic_args):
        results = self.inner(*self._split(dynamic_args))
        flat = jax.tree_util.tree_leaves(results, is_leaf=lambda x: isinstance(x, Chunks))
        joined = [x if j is None else j.join(x, self.mesh) for x, j in zip(flat, self.outputs)]
        return jax.tree_util.tree_unflatten(self.graph.output_tree, joined)

    def lower(self, *dynamic_args):
        return self.inner.lower(*self._split(dynamic_args))

    def trace(self, *dynamic_args):
        return self.inner.trace(*self._split(dynamic_args))


def emit_unstacked(plan, fun: Callable, graph, mesh: jax.sharding.Mesh, *, donate: bool = True) -> UnstackedProgram:
    """``plan`` (made for ``Unstacked(fun, plan.stack_chunks).chunked_step``) as a program of ``fun``'s
    own arguments; ``graph`` is ``fun`` traced."""
    from autoplan._src import emit as E
    from autoplan._src import staging

    unstacked = Unstacked(fun, plan.stack_chunks)
    split = unstacked.split(*staging.abstract_arguments(graph))
    chunked_graph = T.trace(unstacked.chunked_step, *split)
    inner = staging.emit_staged(plan, unstacked.chunked_step, chunked_graph, mesh, donate=donate)
    inputs = _joined(plan, plan.inputs, chunked_graph.input_tree)
    outputs = _joined(plan, plan.outputs, chunked_graph.output_tree)
    grouped = _chunk_leaves(chunked_graph.input_tree, E.leaf_shardings(plan.inputs, mesh))
    in_shardings = [group[0] if joined is None else joined.sharding(mesh)
                    for (_, group), joined in zip(grouped, inputs)]
    return UnstackedProgram(plan=plan, mesh=mesh, graph=graph, unstacked=unstacked, inner=inner,
                            inputs=tuple(inputs), outputs=tuple(outputs),
                            in_shardings=jax.tree_util.tree_unflatten(graph.input_tree, in_shardings))
