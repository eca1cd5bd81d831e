"""Trace a step function into a `Graph`.

``jax.make_jaxpr`` over arrays or ``jax.ShapeDtypeStruct``s gives a jaxpr,
visited with the walker the emitter shares (`autoplan._src.walk`): nested
``jit`` and custom derivative calls are inlined so every operator is visible
to the planner, and every operator keeps the walker's key.  Remat regions are
walked like inlined ones (the emitter re-emits them as checkpoints).  Loops
are structure: a ``scan`` or ``while`` body is walked once, its operators
carrying the trip count as ``repeat`` (a ``while`` whose count is not visible
gets `DEFAULT_WHILE_TRIP_COUNT` and one warning), with ``loop_in`` /
``loop_out`` pseudo-operators at the body boundary and a tie between each
carry's entering and leaving layout; a ``cond`` contributes its dearest
branch (by FLOPs and bytes written), which prices the step as if that branch
always ran.

Each operator is attributed to a layer from the Flax name stack
(``jvp(GPT)/block3/mlp_in`` and ``transpose(jvp(GPT))/block3/mlp_in`` are both
layer ``block3``, forward and backward); a loop body is one layer; a step
without module names gets layers from the list indices in its parameter paths
(`path_layer`).  Graph inputs/outputs keep their pytree paths.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from autoplan._src import compat
from autoplan._src import graph as G
from autoplan._src import walk


class TraceError(ValueError):
    """The step or its arguments cannot be traced into a plannable graph."""


def _argument_names(fn, num_args: int) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(num_args):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"arg{i}")
    return names


def _path_string(prefix: str, keypath) -> str:
    rest = jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")
    return f"{prefix}/{rest}" if rest else prefix


def abstractify(args: Sequence[Any], names: Sequence[str]) -> tuple[list[jax.ShapeDtypeStruct], list[str], Any]:
    """Flatten ``args`` to ShapeDtypeStructs, checking every leaf is a non-empty array.

    Raises `TraceError` naming the pytree path of the first bad leaf.
    """
    leaves_with_paths, tree = jax.tree_util.tree_flatten_with_path(tuple(args))
    if not leaves_with_paths:
        raise TraceError("the step has no array inputs: pass the parameters, optimizer state and batch "
                         "as arrays or jax.ShapeDtypeStruct leaves")
    structs, paths = [], []
    for keypath, leaf in leaves_with_paths:
        path = _path_string(names[keypath[0].idx], keypath[1:])
        if isinstance(leaf, jax.ShapeDtypeStruct) or hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            shape, dtype = tuple(leaf.shape), leaf.dtype
        else:
            raise TraceError(
                f"input {path!r} is a {type(leaf).__name__}, not an array: every leaf of the step's arguments "
                "must be a jax.Array, numpy array or jax.ShapeDtypeStruct (wrap numbers in jnp.asarray, or "
                "mark the argument static with static_argnums)")
        if any(int(d) == 0 for d in shape):
            raise TraceError(f"input {path!r} is empty (shape {shape}); autoplan cannot shard a zero-size array")
        structs.append(jax.ShapeDtypeStruct(shape, dtype))
        paths.append(path)
    return structs, paths, tree


_TRANSFORM = re.compile(r"^[\w.]+\((.*)\)$")
_INDEXED = re.compile(r".*\d+$")


def _strip_transforms(component: str) -> str:
    while True:
        match = _TRANSFORM.match(component)
        if not match:
            return component
        component = match.group(1)


# Name scope that `autoplan._src.stacked` puts around chunk k of a stacked layer scan: its ops
# belong to layer "<name>[k]" (the chunks of one scan are different pipeline layers).
CHUNK_SCOPE = "autoplan_chunk"
_CHUNK = re.compile(rf"^{CHUNK_SCOPE}(\d+)$")
_CHUNK_LAYER = re.compile(r"\[\d+\]$")


def is_chunk_layer(layer: str) -> bool:
    """Whether ``layer`` is a chunk of a stacked-layer scan (``blocks[2]``, ``stack[0]``).

    >>> is_chunk_layer("blocks[2]"), is_chunk_layer("blocks/block"), is_chunk_layer("block2")
    (True, False, False)
    """
    return bool(_CHUNK_LAYER.search(layer))


# Scopes JAX itself opens (not modules): jax.checkpoint's differentiated body.
_JAX_SCOPES = frozenset({"rematted_computation"})


def _components(name_stack: str) -> tuple[list[str], str]:
    """The module names of a name stack (transforms and JAX's own scopes stripped) and the chunk
    suffix ("[k]" or "").

    >>> _components("autoplan_chunk3/transpose(jvp(GPT))/rematted_computation/blocks/block/attn")
    (['GPT', 'blocks', 'block', 'attn'], '[3]')
    """
    components = [c for c in (_strip_transforms(p) for p in name_stack.split("/")) if c and c not in _JAX_SCOPES]
    suffix = ""
    while components and (match := _CHUNK.match(components[0])):
        suffix = f"[{match.group(1)}]"
        components.pop(0)
    return components, suffix


def module_below_root(name_stack: str) -> str:
    """The first module below the root: inside a loop body, the loop's layer.

    >>> module_below_root("transpose(jvp(GPT))/blocks/block/ln1")
    'blocks'
    >>> module_below_root("autoplan_chunk1/jvp(GPT)/blocks/block/ln1")
    'blocks[1]'
    """
    components, suffix = _components(name_stack)
    return components[1] + suffix if len(components) > 1 else ""


def layer_of(name_stack: str) -> str:
    """The layer a name stack belongs to.

    The modules below the root down to the first whose name ends in a number
    (``block3``, ``layers_3``, ``encoder/block/0``: an encoder's block 0 and a
    decoder's are different layers), else the first two modules below the root
    (``decoder/final_layer_norm`` runs after the decoder's blocks, not before).
    Operators of the root module itself (an activation between two blocks) get
    no layer here and later join the layer of their largest operand.

    >>> layer_of("transpose(jvp(GPT))/block3/mlp_in")
    'block3'
    >>> layer_of("jvp(T5)/decoder/block/0/layer/1/EncDecAttention")
    'decoder/block/0'
    >>> layer_of("jvp(GPT)/ln_f")
    'ln_f'
    >>> layer_of("jvp(T5)/decoder/final_layer_norm")
    'decoder/final_layer_norm'
    >>> layer_of("jvp(MLP)")
    ''
    >>> layer_of("autoplan_chunk2/transpose(jvp(GPT))")
    'stack[2]'
    """
    components, suffix = _components(name_stack)
    below_root = components[1:]
    for depth, component in enumerate(below_root):
        if _INDEXED.match(component):
            return "/".join(below_root[:depth + 1]) + suffix
    if below_root:
        return "/".join(below_root[:2]) + suffix
    return f"stack{suffix}" if suffix else ""  # a chunk of a stacked-layer scan the root module runs


# Trip count assumed for a ``while`` loop whose count JAX cannot see (a data-dependent
# condition, or bounds that are traced values): its body is priced as running this many
# times, with one warning naming the loop's source line.
DEFAULT_WHILE_TRIP_COUNT = 8


class DynamicTripCountWarning(UserWarning):
    """A ``while`` loop's trip count is not visible in the jaxpr; a documented default is assumed."""


class _Builder:
    """Builds the Graph as a `walk.Visitor`: one Graph operator per equation, loops walked once."""

    def __init__(self, opaque_structure: bool = False):
        self.opaque_structure = opaque_structure
        self.ops: list[G.Op] = []
        self.tensors: list[G.Tensor] = []
        self.ties: list[tuple[int, int]] = []
        self.seen_backward = False
        self.repeat = 1
        self.loop_depth = 0

    def new_tensor(self, shape, dtype, producer: int, index: int) -> int:
        tid = len(self.tensors)
        self.tensors.append(G.Tensor(id=tid, shape=tuple(shape), dtype=str(dtype), producer=producer,
                                     output_index=index))
        return tid

    def add_op(self, *, primitive: str, inputs: Sequence[int], output_avals: Sequence[tuple], params=None,
               role: str, layer: str = "", name_stack: str = "", path: str | None = None,
               source_info=None, key: str = "") -> G.Op:
        op_id = len(self.ops)
        outputs = tuple(self.new_tensor(shape, dtype, op_id, k) for k, (shape, dtype) in enumerate(output_avals))
        in_shapes = tuple(self.tensors[t].shape if t != G.LITERAL else () for t in inputs)
        in_dtypes = tuple(self.tensors[t].dtype if t != G.LITERAL else "float32" for t in inputs)
        out_shapes = tuple(tuple(s) for s, _ in output_avals)
        out_dtypes = tuple(str(d) for _, d in output_avals)
        params = dict(params or {})
        signature = (primitive, compat.hashable_params(params), in_shapes, in_dtypes, out_shapes, out_dtypes)
        op = G.Op(id=op_id, primitive=primitive, inputs=tuple(inputs), outputs=outputs, input_shapes=in_shapes,
                  input_dtypes=in_dtypes, output_shapes=out_shapes, output_dtypes=out_dtypes, params=params,
                  layer=layer, role=role, name_stack=name_stack, path=path, source_info=source_info,
                  signature=signature, key=key, repeat=self.repeat)
        self.ops.append(op)
        return op

    def role_and_layer(self, stack: str) -> tuple[str, str]:
        backward = "transpose(" in stack
        self.seen_backward |= backward
        # A loop body is one layer (an nn.scan over blocks: 'blocks'), whatever its modules are called.
        layer = module_below_root(stack) if self.loop_depth else layer_of(stack)
        if backward:
            return G.BACKWARD, layer
        if layer or not self.seen_backward:
            return G.FORWARD, layer
        return G.OPTIMIZER, layer

    # -- walk.Visitor ------------------------------------------------------------------
    def constant(self, value, stack: str) -> int:
        arr = np.asarray(value) if not hasattr(value, "aval") else value
        shape, dtype = tuple(np.shape(arr)), getattr(arr, "dtype", np.asarray(arr).dtype)
        op = self.add_op(primitive="constant", inputs=(), output_avals=[(shape, dtype)], role=G.CONSTANT,
                         name_stack=stack)
        return op.outputs[0]

    def literal(self, atom, stack: str) -> int:
        return G.LITERAL

    def equation(self, eqn, key: str, stack: str, invals: list) -> list[int]:
        role, layer = self.role_and_layer(stack)
        avals = [compat.aval_shape_dtype(v) for v in eqn.outvars]
        op = self.add_op(primitive=eqn.primitive.name, inputs=invals, output_avals=avals, params=eqn.params,
                         role=role, layer=layer, name_stack=stack, source_info=eqn.source_info, key=key)
        return list(op.outputs)

    def structured(self, kind: str, eqn, key: str, stack: str, invals: list) -> list[int]:
        if self.opaque_structure:
            return self.equation(eqn, key, stack, invals)
        if kind == "remat":
            jaxpr, consts = compat.open_jaxpr(eqn.params["jaxpr"])
            return self.body(jaxpr, consts, invals, walk.scope_key(key, "remat"), stack)
        if kind == "scan":
            return self.scan(eqn, key, stack, invals)
        if kind == "while":
            return self.while_loop(eqn, key, stack, invals)
        return self.cond(eqn, key, stack, invals)

    # -- structure -----------------------------------------------------------------------
    def body(self, jaxpr, consts, args, prefix: str, stack: str) -> list[int]:
        const_ids = [self.constant(value, stack) for value in consts]
        return walk.walk(jaxpr, const_ids, args, self, prefix=prefix, stack=stack)

    def boundary(self, primitive: str, kinds: Sequence[str], tensors: Sequence[int], avals, eqn, key: str,
                 stack: str) -> list[int]:
        """One ``loop_in`` / ``loop_out`` pseudo-operator per value crossing a loop or branch boundary."""
        role, layer = self.role_and_layer(stack)
        out = []
        for j, (kind, tid, aval) in enumerate(zip(kinds, tensors, avals)):
            op = self.add_op(primitive=primitive, inputs=(tid,), output_avals=[aval], params={"kind": kind},
                             role=role, layer=layer, name_stack=stack, source_info=eqn.source_info,
                             key=f"{key}/{'in' if primitive == 'loop_in' else 'out'}{j}")
            out.append(op.outputs[0])
        return out

    def loop(self, eqn, key: str, stack: str, jaxpr, consts, invals, kinds, trip_count: int) -> list[int]:
        """Walk a loop body once: its operators run ``trip_count`` times; carries keep one layout."""
        in_avals = [compat.aval_shape_dtype(v) for v in jaxpr.invars]
        first = len(self.ops)
        args = self.boundary("loop_in", kinds, invals, in_avals, eqn, key, stack)
        outer = self.repeat
        self.repeat = outer * max(int(trip_count), 1)
        self.loop_depth += 1
        try:
            outs = self.body(jaxpr, consts, args, walk.scope_key(key, "body"), stack)
            carries = [k for k in kinds if k == "carry"]
            out_kinds = ["carry"] * len(carries) + ["ys"] * (len(outs) - len(carries))
            out_avals = [compat.aval_shape_dtype(v) for v in eqn.outvars]
            results = self.boundary("loop_out", out_kinds, outs, out_avals, eqn, key, stack)
        finally:
            self.repeat = outer
            self.loop_depth -= 1
        self.join_boundaries(first)
        entering = [self.tensors[a].producer for a, k in zip(args, kinds) if k == "carry"]
        leaving = [self.tensors[r].producer for r in results[:len(entering)]]
        self.ties.extend(zip(entering, leaving))
        return results

    def join_boundaries(self, first: int) -> None:
        """Boundary operators of a body created from ``first`` on join its most common layer."""
        layers = Counter(op.layer for op in self.ops[first:] if op.layer and op.primitive not in _BOUNDARIES)
        if not layers:
            return
        layer = layers.most_common(1)[0][0]
        for op in self.ops[first:]:
            if op.primitive in _BOUNDARIES and op.layer != layer:
                self.ops[op.id] = dataclasses.replace(op, layer=layer)

    def scan(self, eqn, key: str, stack: str, invals: list) -> list[int]:
        params = eqn.params
        jaxpr, consts = compat.open_jaxpr(params["jaxpr"])
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        kinds = ["const"] * n_consts + ["carry"] * n_carry + ["xs"] * (len(invals) - n_consts - n_carry)
        return self.loop(eqn, key, stack, jaxpr, consts, invals, kinds, params["length"])

    def while_loop(self, eqn, key: str, stack: str, invals: list) -> list[int]:
        params = eqn.params
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        jaxpr, consts = compat.open_jaxpr(params["body_jaxpr"])
        trip_count = _while_trip_count(eqn)
        if trip_count is None:
            trip_count = _TRIP_COUNT_HINT.get()
        if trip_count is None:
            trip_count = DEFAULT_WHILE_TRIP_COUNT
            warnings.warn(
                f"autoplan cannot see the trip count of the while loop at {compat.source_summary(eqn.source_info)}"
                f"; its body is priced as running {DEFAULT_WHILE_TRIP_COUNT} times "
                "(autoplan.trace.DEFAULT_WHILE_TRIP_COUNT). Pass trip_count= to autoplan.plan or autoparallel "
                "with the count you expect, or use lax.fori_loop or lax.scan with static bounds.",
                DynamicTripCountWarning, stacklevel=2)
        body_in = invals[n_cond:]
        kinds = ["const"] * n_body + ["carry"] * (len(body_in) - n_body)
        return self.loop(eqn, key, stack, jaxpr, consts, body_in, kinds, trip_count)

    def cond(self, eqn, key: str, stack: str, invals: list) -> list[int]:
        """Plan the dearest branch (by FLOPs and bytes): the one layout at the boundary serves every
        branch, and the step is priced as if that branch always ran."""
        branches = eqn.params["branches"]
        chosen = max(range(len(branches)), key=lambda b: (walk.jaxpr_flops(branches[b].jaxpr), -b))
        jaxpr, consts = compat.open_jaxpr(branches[chosen])
        in_avals = [compat.aval_shape_dtype(v) for v in jaxpr.invars]
        args = self.boundary("loop_in", ["value"] * len(in_avals), invals[1:], in_avals, eqn, key, stack)
        first = len(self.ops) - len(args)
        outs = self.body(jaxpr, consts, args, walk.scope_key(key, f"branch{chosen}"), stack)
        out_avals = [compat.aval_shape_dtype(v) for v in eqn.outvars]
        results = self.boundary("loop_out", ["value"] * len(outs), outs, out_avals, eqn, key, stack)
        self.join_boundaries(first)
        return results


_BOUNDARIES = ("loop_in", "loop_out")




def check_trip_count(count) -> None:
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"trip_count must be a positive int (the runs of a while loop's body), got {count!r}")


_TRIP_COUNT_HINT: contextvars.ContextVar[int | None] = contextvars.ContextVar("trip_count", default=None)


@contextlib.contextmanager
def trip_count_hint(count: int | None):
    """Within this block, a while loop whose trip count JAX cannot see is priced as running ``count`` times.

    The ``trip_count=`` of `autoplan.plan` and `autoparallel`; None keeps the default and its warning.

    >>> import jax, jax.numpy as jnp
    >>> def halve(x):
    ...     return jax.lax.while_loop(lambda c: c.sum() > 1.0, lambda c: c / 2, x)
    >>> with trip_count_hint(12):
    ...     graph = trace(halve, jnp.ones(4))
    >>> {op.repeat for op in graph.ops if op.primitive == "div"}
    {12}
    """
    check_trip_count(count)
    token = _TRIP_COUNT_HINT.set(count)
    try:
        yield
    finally:
        _TRIP_COUNT_HINT.reset(token)


def _while_trip_count(eqn) -> int | None:
    """The trip count of ``while i < n: i += 1`` with literal start and bound, else None."""
    params = eqn.params
    cond_jaxpr, _ = compat.open_jaxpr(params["cond_jaxpr"])
    body_jaxpr, _ = compat.open_jaxpr(params["body_jaxpr"])
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    if len(cond_jaxpr.eqns) != 1 or cond_jaxpr.eqns[0].primitive.name != "lt":
        return None
    init = eqn.invars[n_cond + n_body:]
    carry_vars = cond_jaxpr.invars[n_cond:]

    def known(atom):
        if compat.is_literal(atom):
            return int(compat.literal_value(atom)), None
        if atom in carry_vars:
            k = carry_vars.index(atom)
            if compat.is_literal(init[k]):
                return int(compat.literal_value(init[k])), k
        return None, None

    (start, counter), (stop, _) = (known(a) for a in cond_jaxpr.eqns[0].invars)
    if start is None or stop is None or counter is None:
        return None
    # The body must add 1 to the counter.
    out = body_jaxpr.outvars[counter]
    step = next((e for e in body_jaxpr.eqns if out in e.outvars), None)
    counter_in = body_jaxpr.invars[n_body + counter]
    if step is None or step.primitive.name != "add" or counter_in not in step.invars or not any(
            compat.is_literal(a) and compat.literal_value(a) == 1 for a in step.invars):
        return None
    return max(stop - start, 0)


def _layer_from_path(path: str, layers: set[str]) -> str:
    """The layer a leaf path lies under: one whose (possibly nested) name is a run of its components.

    A chunk of a stacked leaf (`stacked.Chunks`: its path ends in the chunk's index ``k``) belongs to
    the layer of chunk ``k`` of a stack its path names (``blocks[k]``, or ``stack[k]`` at the root).

    >>> _layer_from_path("opt_state/0/mu/blocks/block/mlp/kernel/1", {"blocks/block", "blocks[0]", "blocks[1]"})
    'blocks[1]'
    """
    components = path.split("/")
    if components[-1].isdigit():
        chunk = f"[{components[-1]}]"
        for name in [*components[:-1], "stack"]:
            if name + chunk in layers:
                return name + chunk
    for start in range(len(components)):
        for end in range(len(components), start, -1):
            if "/".join(components[start:end]) in layers:
                return "/".join(components[start:end])
    return ""


def trace(fn, *args, static_argnums: Sequence[int] = (), opaque_structure: bool = False) -> G.Graph:
    """Trace ``fn(*args)`` into a `Graph`.

    ``args`` may hold arrays or ``jax.ShapeDtypeStruct``s; nothing is computed.
    With ``opaque_structure`` a loop, branch or remat region is one operator
    (what the microbatch and pipeline runtimes evaluate equation by equation,
    `pipeline.flat_items`), not its walked body.

    >>> import jax, jax.numpy as jnp
    >>> from autoplan._src.trace import trace
    >>> g = trace(lambda w, x: jnp.tanh(x @ w), jnp.ones((4, 4)), jnp.ones((2, 4)))
    >>> [op.primitive for op in g.ops]
    ['input', 'input', 'dot_general', 'tanh', 'output']
    """
    static_argnums = tuple(static_argnums)
    names = _argument_names(fn, len(args))
    dynamic = [i for i in range(len(args)) if i not in static_argnums]
    structs, input_paths, input_tree = abstractify([args[i] for i in dynamic], [names[i] for i in dynamic])

    def flat_fn(*leaves):
        dyn_args = jax.tree_util.tree_unflatten(input_tree, leaves)
        full = list(args)
        for i, value in zip(dynamic, dyn_args):
            full[i] = value
        return fn(*full)

    try:
        closed, out_shape = compat.make_jaxpr(flat_fn, *structs)
    except TraceError:
        raise
    except Exception as err:
        raise TraceError(f"tracing the step failed: {type(err).__name__}: {err}") from err
    out_leaves_with_paths, output_tree = jax.tree_util.tree_flatten_with_path(out_shape)
    output_paths = [_path_string("out", kp) for kp, _ in out_leaves_with_paths]

    builder = _Builder(opaque_structure)
    jaxpr = closed.jaxpr
    consts = [builder.constant(value, "") for value in closed.consts]
    input_ops, args = [], []
    for path, struct in zip(input_paths, structs):
        op = builder.add_op(primitive="input", inputs=(), output_avals=[(struct.shape, struct.dtype)],
                            role=G.INPUT, path=path)
        args.append(op.outputs[0])
        input_ops.append(op.id)
    results = walk.walk(jaxpr, consts, args, builder)

    output_ops = []
    for tid, path in zip(results, output_paths):
        op = builder.add_op(primitive="output", inputs=(tid,), output_avals=[], role=G.OUTPUT, path=path)
        output_ops.append(op.id)

    # Layers in order of first appearance; pseudo-ops take the layer named in their path.
    layers: list[str] = []
    for op in builder.ops:
        if op.layer and op.role in (G.FORWARD, G.BACKWARD) and op.layer not in layers:
            layers.append(op.layer)
    layer_set = set(layers)
    ops = builder.ops
    for i, op in enumerate(ops):
        if op.role in (G.INPUT, G.OUTPUT) and op.path:
            layer = _layer_from_path(op.path, layer_set)
            if not layer and op.role == G.OUTPUT:
                layer = ops[builder.tensors[op.inputs[0]].producer].layer
            ops[i] = _replace_layer(op, layer)

    if not layers:  # no module names (plain JAX, NNX): layers from parameter paths and data flow
        layers = _layers_by_structure(ops, builder.tensors)
    _propagate_layers(ops, builder.tensors)
    aliases = _find_aliases(out_leaves_with_paths, input_paths, structs, names, dynamic)
    return G.Graph(ops=ops, tensors=builder.tensors, input_ops=input_ops, output_ops=output_ops,
                   input_tree=input_tree, output_tree=output_tree, input_paths=input_paths,
                   output_paths=output_paths, aliases=aliases, layers=layers, closed_jaxpr=closed,
                   ties=builder.ties)


def path_layer(path: str) -> tuple[str, int] | None:
    """The layer a leaf belongs to by its pytree path: the last list index and the name before it.

    >>> path_layer("opt_state/0/mu/layers/3/mlp/kernel")
    ('layers/3', 3)
    >>> path_layer("params/embed") is None
    True
    """
    matches = list(re.finditer(r"([^/]+)/(\d+)(?=/|$)", path))
    if not matches or matches[-1].start() == 0:
        return None
    name, index = matches[-1].group(1), matches[-1].group(2)
    return f"{name}/{index}", int(index)


def _layers_by_structure(ops: list[G.Op], tensors: list[G.Tensor]) -> list[str]:
    """Layers of a step without module names, from the list indices of its parameter paths.

    Each input leaf under ``.../layers/3/...`` seeds layer ``layers/3``; an
    operator joins the newest layer among its operands: the highest index in
    the forward pass and the optimizer update, the lowest in the backward pass
    (which runs the layers in reverse).  Layers of equal structure then tie in
    the intra-op pass as named ones do.
    """
    rank: dict[str, int] = {}
    for i, op in enumerate(ops):
        found = path_layer(op.path) if op.role == G.INPUT and op.path else None
        if found is not None:
            rank[found[0]] = found[1]
            ops[i] = _replace_layer(op, found[0])
    if len(rank) < 2:
        return []
    for i, op in enumerate(ops):
        if op.role in (G.INPUT, G.OUTPUT, G.CONSTANT) or op.layer:
            continue
        candidates = {ops[tensors[t].producer].layer for t in op.inputs if t != G.LITERAL} - {""}
        if candidates:
            pick = min if op.role == G.BACKWARD else max
            ops[i] = _replace_layer(op, pick(candidates, key=lambda name: (rank[name], name)))
    for i, op in enumerate(ops):
        if op.role == G.OUTPUT and not op.layer:
            ops[i] = _replace_layer(op, ops[tensors[op.inputs[0]].producer].layer)
    return sorted(rank, key=lambda name: (rank[name], name))


def _propagate_layers(ops: list[G.Op], tensors: list[G.Tensor]) -> None:
    """Operators outside any module (the loss, the optimizer update) join the layer of their
    largest operand, so a parameter's update belongs to the parameter's layer."""
    for i, op in enumerate(ops):
        if op.layer or op.role in (G.INPUT, G.OUTPUT, G.CONSTANT):
            continue
        best, best_size = "", -1
        for t in op.inputs:
            if t == G.LITERAL:
                continue
            layer = ops[tensors[t].producer].layer
            if layer and tensors[t].size > best_size:
                best, best_size = layer, tensors[t].size
        if best:
            ops[i] = _replace_layer(op, best)


def _replace_layer(op: G.Op, layer: str) -> G.Op:
    import dataclasses

    return dataclasses.replace(op, layer=layer)


def _find_aliases(out_leaves_with_paths, input_paths, structs, names, dynamic) -> dict[int, int]:
    """Output leaves that are updated versions of input leaves (same path in the same argument).

    A step ``(params, opt_state, batch) -> (params, opt_state, loss)`` aliases
    output 0 to argument 0 and output 1 to argument 1, leaf by leaf, when the
    shapes and dtypes agree: those buffers can be donated.
    """
    by_path = {p: i for i, p in enumerate(input_paths)}
    aliases = {}
    for out_index, (keypath, leaf) in enumerate(out_leaves_with_paths):
        if not keypath or not isinstance(keypath[0], jax.tree_util.SequenceKey):
            continue
        position = keypath[0].idx
        if position >= len(dynamic):
            continue
        in_path = _path_string(names[dynamic[position]], keypath[1:])
        j = by_path.get(in_path)
        if j is None or j in aliases.values():
            continue
        if tuple(structs[j].shape) == tuple(leaf.shape) and structs[j].dtype == leaf.dtype:
            aliases[out_index] = j
    return aliases
