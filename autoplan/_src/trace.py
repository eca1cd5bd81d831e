"""Trace a step function into a `Graph`.

``jax.make_jaxpr`` over arrays or ``jax.ShapeDtypeStruct``s gives a jaxpr;
nested ``jit``, custom derivative calls and remat are inlined so every
operator is visible to the planner.  Each operator is attributed to a layer
from the Flax name stack (``jvp(GPT)/block3/mlp_in`` and
``transpose(jvp(GPT))/block3/mlp_in`` are both layer ``block3``, forward and
backward), and graph inputs/outputs keep their pytree paths.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from autoplan._src import compat
from autoplan._src import graph as G


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


def layer_of(name_stack: str) -> str:
    """The layer a name stack belongs to.

    The first module below the root whose name ends in a number (``block3``,
    ``layers_3``), else the first module below the root.  Operators of the root
    module itself (an activation between two blocks) get no layer here and
    later join the layer of their largest operand.

    >>> layer_of("transpose(jvp(GPT))/block3/mlp_in")
    'block3'
    >>> layer_of("jvp(GPT)/ln_f")
    'ln_f'
    >>> layer_of("jvp(MLP)")
    ''
    """
    components = [c for c in (_strip_transforms(p) for p in name_stack.split("/")) if c]
    if not components:
        return ""
    below_root = components[1:]
    for component in below_root:
        if _INDEXED.match(component):
            return component
    return below_root[0] if below_root else ""


class _Builder:
    def __init__(self):
        self.ops: list[G.Op] = []
        self.tensors: list[G.Tensor] = []
        self.seen_backward = False

    def new_tensor(self, shape, dtype, producer: int, index: int) -> int:
        tid = len(self.tensors)
        self.tensors.append(G.Tensor(id=tid, shape=tuple(shape), dtype=str(dtype), producer=producer,
                                     output_index=index))
        return tid

    def add_op(self, *, primitive: str, inputs: Sequence[int], output_avals: Sequence[tuple], params=None,
               role: str, layer: str = "", name_stack: str = "", path: str | None = None,
               source_info=None) -> G.Op:
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
                  signature=signature)
        self.ops.append(op)
        return op

    def constant(self, value, stack: str) -> int:
        arr = np.asarray(value) if not hasattr(value, "aval") else value
        shape, dtype = tuple(np.shape(arr)), getattr(arr, "dtype", np.asarray(arr).dtype)
        op = self.add_op(primitive="constant", inputs=(), output_avals=[(shape, dtype)], role=G.CONSTANT,
                         name_stack=stack)
        return op.outputs[0]

    def read(self, env, atom) -> int:
        if compat.is_literal(atom):
            return G.LITERAL
        return env[atom]

    def walk(self, jaxpr, env: dict, stack_prefix: str) -> None:
        for eqn in jaxpr.eqns:
            inner = compat.name_stack(eqn)
            stack = f"{stack_prefix}/{inner}" if stack_prefix and inner else (stack_prefix or inner)
            body = compat.inline_body(eqn)
            if body is not None:
                sub_jaxpr, consts = body
                sub_env = {}
                for var, value in zip(sub_jaxpr.constvars, consts):
                    sub_env[var] = self.constant(value, stack)
                for var, atom in zip(sub_jaxpr.invars, eqn.invars):
                    tid = self.read(env, atom)
                    sub_env[var] = tid if tid != G.LITERAL else self.constant(compat.literal_value(atom), stack)
                self.walk(sub_jaxpr, sub_env, stack)
                for var, atom in zip(eqn.outvars, sub_jaxpr.outvars):
                    if compat.is_literal(atom):
                        env[var] = self.constant(compat.literal_value(atom), stack)
                    else:
                        env[var] = sub_env[atom]
                continue
            backward = "transpose(" in stack
            self.seen_backward |= backward
            layer = layer_of(stack)
            if backward:
                role = G.BACKWARD
            elif layer or not self.seen_backward:
                role = G.FORWARD
            else:
                role = G.OPTIMIZER
            inputs = [self.read(env, a) for a in eqn.invars]
            avals = [compat.aval_shape_dtype(v) for v in eqn.outvars]
            op = self.add_op(primitive=eqn.primitive.name, inputs=inputs, output_avals=avals, params=eqn.params,
                             role=role, layer=layer, name_stack=stack, source_info=eqn.source_info)
            for var, tid in zip(eqn.outvars, op.outputs):
                env[var] = tid


def _layer_from_path(path: str, layers: set[str]) -> str:
    for component in path.split("/"):
        if component in layers:
            return component
    return ""


def trace(fn, *args, static_argnums: Sequence[int] = ()) -> G.Graph:
    """Trace ``fn(*args)`` into a `Graph`.

    ``args`` may hold arrays or ``jax.ShapeDtypeStruct``s; nothing is computed.

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

    builder = _Builder()
    jaxpr = closed.jaxpr
    env: dict = {}
    for var, value in zip(jaxpr.constvars, closed.consts):
        env[var] = builder.constant(value, "")
    input_ops = []
    for var, path, struct in zip(jaxpr.invars, input_paths, structs):
        op = builder.add_op(primitive="input", inputs=(), output_avals=[(struct.shape, struct.dtype)],
                            role=G.INPUT, path=path)
        env[var] = op.outputs[0]
        input_ops.append(op.id)
    builder.walk(jaxpr, env, "")

    output_ops = []
    for atom, path in zip(jaxpr.outvars, output_paths):
        tid = builder.read(env, atom)
        if tid == G.LITERAL:
            tid = builder.constant(compat.literal_value(atom), "")
        t = builder.tensors[tid]
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

    _propagate_layers(ops, builder.tensors)
    aliases = _find_aliases(out_leaves_with_paths, input_paths, structs, names, dynamic)
    return G.Graph(ops=ops, tensors=builder.tensors, input_ops=input_ops, output_ops=output_ops,
                   input_tree=input_tree, output_tree=output_tree, input_paths=input_paths,
                   output_paths=output_paths, aliases=aliases, layers=layers, closed_jaxpr=closed)


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
