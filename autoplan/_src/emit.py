"""Emit a `Plan` as a ``jax.jit`` program.

The plan fixes the layout of every input and output leaf and of the anchor
intermediates (dot, conv and gather results, and both ends of every reshard
it makes: the producer's result and the consumer's operand).  The emitter
re-evaluates the step's jaxpr with the walker `trace` used (`walk.walk`), so
an anchor's key names the same operator here, and pins each anchor with
``jax.lax.with_sharding_constraint``; loops, branches and checkpoints are
re-emitted as themselves.  ``jax.jit`` gets the input/output shardings and
donates the buffers that the step updates in place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from autoplan._src import cluster as C
from autoplan._src import compat
from autoplan._src import graph as G
from autoplan._src import plan as P
from autoplan._src import walk
from autoplan._src.strategies import base as S


def device_mesh(mesh_shape: C.MeshShape, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A concrete mesh with ``mesh_shape``'s axes over ``devices`` (default: all), every axis ``Auto``.

    The emitted program places data with sharding constraints, which need
    automatic axes; arrays on an ``Explicit`` mesh over the same devices are
    accepted as inputs and resharded as needed.

    >>> from autoplan._src.cluster import MeshShape
    >>> dict(device_mesh(MeshShape(axis_names=("data", "model"), axis_sizes=(2, 4))).shape)
    {'data': 2, 'model': 4}
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != mesh_shape.size:
        raise ValueError(
            f"the plan's mesh {dict(zip(mesh_shape.axis_names, mesh_shape.axis_sizes))} has {mesh_shape.size} "
            f"devices but {len(devices)} are available; plan for this device count (mesh= or num_devices=) "
            f"or start JAX with {mesh_shape.size} devices")
    grid = np.asarray(devices, dtype=object).reshape(mesh_shape.axis_sizes)
    auto = (jax.sharding.AxisType.Auto,) * len(mesh_shape.axis_names)
    return jax.sharding.Mesh(grid, mesh_shape.axis_names, axis_types=auto)


def as_auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The same devices and axis names with every axis ``Auto``."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(getattr(mesh, "axis_types", auto)) == auto:
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def leaf_shardings(leaves: Sequence[P.LeafSharding], mesh: jax.sharding.Mesh) -> list[jax.sharding.NamedSharding]:
    """Each leaf's NamedSharding: on ``mesh``, or on its stage row's devices when a pipeline keeps it there."""
    return [jax.sharding.NamedSharding(mesh if leaf.stage is None else stage_row(mesh, leaf.stage), leaf.partition_spec)
            for leaf in leaves]


def stage_row(mesh: jax.sharding.Mesh, row: int) -> jax.sharding.Mesh:
    """Stage row ``row``'s devices as a mesh with ``mesh``'s axes (``"stage"`` of size 1)."""
    if "stage" not in mesh.axis_names:
        raise ValueError(f"a leaf kept on pipeline stage {row} needs a mesh with a 'stage' axis; mesh has "
                         f"{dict(mesh.shape)}")
    devices = np.take(mesh.devices, [row], axis=mesh.axis_names.index("stage"))
    return jax.sharding.Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)


def input_named_shardings(plan: P.Plan, mesh: jax.sharding.Mesh | None = None):
    """NamedShardings shaped like the step's arguments (a path -> sharding dict for a loaded plan).

    >>> import jax, jax.numpy as jnp, autoplan
    >>> w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    >>> p = autoplan.plan(lambda w: (w * 2).sum(), w, num_devices=8)
    >>> s = input_named_shardings(p)
    >>> type(s[0]).__name__
    'NamedSharding'
    """
    mesh = device_mesh(plan.mesh) if mesh is None else mesh
    shardings = leaf_shardings(plan.inputs, mesh)
    if plan.input_tree is None:
        return {leaf.path: s for leaf, s in zip(plan.inputs, shardings)}
    return jax.tree_util.tree_unflatten(plan.input_tree, shardings)


class PlanMismatchError(ValueError):
    """A plan does not belong to the function, arguments or mesh it is applied to."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Constraints:
    """Shardings to pin, keyed by operator key (`autoplan._src.walk`): results, and operands read resharded.

    A key may also name a loop or branch boundary (``"7/in2"``: the third
    value entering equation 7's body), pinned where the body receives or
    returns it.
    """

    outputs: dict[str, dict[int, jax.sharding.NamedSharding]]
    operands: dict[str, dict[int, jax.sharding.NamedSharding]]


def anchor_constraints(plan: P.Plan, graph: G.Graph, mesh: jax.sharding.Mesh) -> Constraints:
    """The plan's anchors as shardings per operator key: results, and operands where the plan reshards.

    An anchor saved before keys existed (plan format 1) names its operator by
    graph position; the plan's fingerprint has already matched the graph.
    """
    by_key = {op.key: op for op in graph.ops if op.key}
    outputs: dict[str, dict[int, jax.sharding.NamedSharding]] = {}
    operands: dict[str, dict[int, jax.sharding.NamedSharding]] = {}
    for anchor in plan.anchors:
        if anchor.key:
            op = by_key.get(anchor.key)
        else:
            op = graph.ops[anchor.op] if 0 <= anchor.op < len(graph.ops) else None
        if anchor.operand is None:
            shapes, index, target = (op.output_shapes if op else ()), anchor.output, outputs
        else:
            shapes, index, target = (op.input_shapes if op else ()), anchor.operand, operands
        if op is None or not op.key or not 0 <= index < len(shapes) or shapes[index] != tuple(anchor.shape):
            raise PlanMismatchError(
                f"plan {plan.name!r} pins anchor {anchor.key or anchor.op} ({anchor.label}, shape {anchor.shape}) "
                "but the traced step has no such operator: the plan was made for a different function; re-plan it")
        sharding = jax.sharding.NamedSharding(mesh, S.to_partition_spec(anchor.spec))
        target.setdefault(op.key, {})[index] = sharding
    return Constraints(outputs=outputs, operands=operands)


def microbatch_pins(anchors: Sequence[P.Anchor], graph: G.Graph, mesh: jax.sharding.Mesh,
                    manual: Sequence[str] = ()) -> dict[int, tuple[dict, dict]]:
    """Anchors of a plan made at one size of the batch, as constraints for ``graph`` traced at another
    (a microbatch, one data-parallel replica's share of it): op id -> (result index -> sharding, operand
    index -> sharding).

    Operators are matched by key.  Inside a region manual over ``manual`` (the
    data-parallel axes, which already split the examples) those axes are left
    out of every spec; a pin whose rank differs, or whose remaining split does
    not divide the traced shape, is skipped and left to XLA.
    """
    by_key = {op.key: op for op in graph.ops if op.key}
    sizes = dict(mesh.shape)
    pins: dict[int, tuple[dict, dict]] = {}
    for anchor in anchors:
        op = by_key.get(anchor.key)
        if op is None:
            continue
        shapes = op.output_shapes if anchor.operand is None else op.input_shapes
        index = anchor.output if anchor.operand is None else anchor.operand
        if not 0 <= index < len(shapes) or len(shapes[index]) != len(anchor.spec):
            continue
        spec = tuple(tuple(axis for axis in dim if axis not in manual) for dim in anchor.spec)
        if any(size % math.prod(sizes[axis] for axis in dim) for size, dim in zip(shapes[index], spec)):
            continue
        results, operands = pins.setdefault(op.id, ({}, {}))
        table = results if anchor.operand is None else operands
        table[index] = jax.sharding.NamedSharding(mesh, S.to_partition_spec(spec))
    return pins


def _pin(values: list, shardings: dict | None) -> list:
    for index, sharding in (shardings or {}).items():
        if not jax.dtypes.issubdtype(getattr(values[index], "dtype", None), jax.dtypes.extended):
            values[index] = jax.lax.with_sharding_constraint(values[index], sharding)
    return values


class _Interpreter:
    """Re-evaluates the step's jaxpr as a `walk.Visitor`, pinning anchored operands and results.

    Loops and branches are re-emitted as ``lax.scan`` / ``lax.while_loop`` /
    ``lax.switch`` with their body's constraints inside (the compiled program
    keeps its loop), remat regions as checkpoints with the user's policy, and
    the user's own sharding constraints on the plan's mesh.
    """

    def __init__(self, constraints: Constraints, mesh: jax.sharding.Mesh):
        self.constraints = constraints
        self.mesh = mesh

    def run(self, jaxpr, consts, args) -> list:
        return walk.walk(jaxpr, consts, args, self)

    def constant(self, value, stack):
        return value

    def literal(self, atom, stack):
        return compat.literal_value(atom)

    def equation(self, eqn, key, stack, invals):
        invals = _pin(list(invals), self.constraints.operands.get(key))
        if eqn.primitive.name in ("sharding_constraint", "reshard"):
            outs = [self.user_constraint(eqn, invals[0])]
        else:
            outs = compat.bind_equation(eqn, invals)
        return _pin(list(outs), self.constraints.outputs.get(key))

    def user_constraint(self, eqn, value):
        """The user's layout on the plan's mesh (their sharding may name an abstract or Explicit mesh)."""
        entries = compat.sharding_spec(eqn.params.get("sharding", eqn.params.get("dst_sharding")))
        if entries is None:
            return compat.bind_equation(eqn, [value])[0]
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*entries))
        with compat.equation_context(eqn):
            return jax.lax.with_sharding_constraint(value, sharding)

    def boundary(self, key: str, side: str, values: list, operand: bool) -> list:
        """Pin values crossing a body boundary as the plan's loop_in / loop_out operators lay them out."""
        table = self.constraints.operands if operand else self.constraints.outputs
        out = list(values)
        for j in range(len(out)):
            pins = table.get(f"{key}/{side}{j}")
            if pins and 0 in pins:
                out[j] = _pin([out[j]], {0: pins[0]})[0]
        return out

    def body(self, jaxpr, consts, args, key: str, scope: str, stack: str, in_offset: int = 0) -> list:
        args = self.boundary(key, "in", [None] * in_offset + list(args), operand=False)[in_offset:]
        outs = walk.walk(jaxpr, consts, args, self, prefix=walk.scope_key(key, scope), stack=stack)
        return self.boundary(key, "out", outs, operand=True)

    def structured(self, kind, eqn, key, stack, invals):
        params = eqn.params
        if kind == "remat":
            jaxpr, consts = compat.open_jaxpr(params["jaxpr"])
            fn = lambda *args: walk.walk(jaxpr, consts, args, self,  # noqa: E731
                                         prefix=walk.scope_key(key, "remat"), stack=stack)
            return compat.bind_remat(eqn, fn, list(invals))
        with compat.equation_context(eqn):
            if kind == "scan":
                return self.scan(eqn, key, stack, invals)
            if kind == "while":
                return self.while_loop(eqn, key, stack, invals)
            return self.cond(eqn, key, stack, invals)

    def scan(self, eqn, key, stack, invals):
        params = eqn.params
        jaxpr, consts = compat.open_jaxpr(params["jaxpr"])
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        closed, init, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]
        closed = self.boundary(key, "in", closed, operand=True)
        init = self.boundary(key, "in", [None] * n_consts + init, operand=True)[n_consts:]
        xs = self.boundary(key, "in", [None] * (n_consts + n_carry) + xs, operand=True)[n_consts + n_carry:]

        def step(carry, x):
            outs = self.body(jaxpr, consts, [*closed, *carry, *x], key, "body", stack)
            return outs[:n_carry], outs[n_carry:]

        carry, ys = jax.lax.scan(step, init, xs, length=params["length"], reverse=params["reverse"],
                                 unroll=params["unroll"])
        return self.leave(key, [*carry, *ys])

    def while_loop(self, eqn, key, stack, invals):
        params = eqn.params
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        cond_jaxpr, cond_consts = compat.open_jaxpr(params["cond_jaxpr"])
        body_jaxpr, body_consts = compat.open_jaxpr(params["body_jaxpr"])
        cond_args, body_args, init = invals[:n_cond], invals[n_cond:n_cond + n_body], invals[n_cond + n_body:]
        body_args = self.boundary(key, "in", body_args, operand=True)
        init = self.boundary(key, "in", [None] * n_body + init, operand=True)[n_body:]

        def keep_going(carry):
            return walk.walk(cond_jaxpr, cond_consts, [*cond_args, *carry], self,
                             prefix=walk.scope_key(key, "cond"), stack=stack)[0]

        def step(carry):
            return self.body(body_jaxpr, body_consts, [*body_args, *carry], key, "body", stack)

        return self.leave(key, list(jax.lax.while_loop(keep_going, step, list(init))))

    def cond(self, eqn, key, stack, invals):
        index, operands = invals[0], self.boundary(key, "in", invals[1:], operand=True)

        def branch(b, jaxpr, consts):
            return lambda *args: self.body(jaxpr, consts, list(args), key, f"branch{b}", stack)

        branches = [branch(b, *compat.open_jaxpr(closed)) for b, closed in enumerate(eqn.params["branches"])]
        return self.leave(key, list(jax.lax.switch(index, branches, *operands)))

    def leave(self, key: str, values: list) -> list:
        """Results of a loop or branch, in the layout the plan gives its ``loop_out`` operators."""
        return self.boundary(key, "out", values, operand=False)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Program:
    """A plan made runnable: a ``jax.jit`` function of the step's non-static arguments."""

    plan: P.Plan
    mesh: jax.sharding.Mesh
    graph: G.Graph
    jitted: Any
    in_shardings: tuple
    out_shardings: Any
    donate_argnums: tuple[int, ...]

    def __call__(self, *dynamic_args):
        return self.jitted(*dynamic_args)

    def lower(self, *dynamic_args):
        """``jax.jit(...).lower``: arrays or ShapeDtypeStructs, laid out as the plan says."""
        structs = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), dynamic_args, self.in_shardings)
        return self.jitted.lower(*structs)

    def trace(self, *dynamic_args):
        structs = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), dynamic_args, self.in_shardings)
        return self.jitted.trace(*structs)


def emit(plan: P.Plan, graph: G.Graph, mesh: jax.sharding.Mesh | None = None, *, donate: bool = True) -> Program:
    """Turn ``plan`` for the traced ``graph`` into a `Program` on ``mesh`` (default: all devices).

    Every input and output leaf gets the plan's NamedSharding, anchors get
    sharding constraints, and with ``donate`` every argument whose leaves the
    step returns updated (parameters, optimizer state) is donated.

    >>> import jax, jax.numpy as jnp, autoplan
    >>> from autoplan._src.trace import trace
    >>> step = lambda w, x: (w - 0.1 * x.T @ (x @ w), ((x @ w) ** 2).mean())
    >>> w, x = jnp.ones((16, 16)), jnp.ones((32, 16))
    >>> program = emit(autoplan.plan(step, w, x, num_devices=8), trace(step, w, x))
    >>> float(program(w, x)[1])
    256.0
    """
    if plan.fingerprint and plan.fingerprint != P.graph_fingerprint(graph):
        raise PlanMismatchError(
            f"plan {plan.name!r} was made for a different step or different argument shapes (fingerprint "
            f"{plan.fingerprint[:12]} != {P.graph_fingerprint(graph)[:12]}); re-plan for these arguments")
    if mesh is None:
        mesh = device_mesh(plan.mesh)
    else:
        mesh = as_auto_mesh(mesh)
        if C.MeshShape.from_mesh(mesh) != plan.mesh:
            raise PlanMismatchError(
                f"plan {plan.name!r} is for mesh {dict(zip(plan.mesh.axis_names, plan.mesh.axis_sizes))} but "
                f"the program runs on {dict(mesh.shape)}; plan on this mesh or pass a matching one")
    in_shardings = jax.tree_util.tree_unflatten(graph.input_tree, leaf_shardings(plan.inputs, mesh))
    out_shardings = jax.tree_util.tree_unflatten(graph.output_tree, leaf_shardings(plan.outputs, mesh))
    constraints = anchor_constraints(plan, graph, mesh)
    closed = graph.closed_jaxpr
    donate_argnums = _donated_arguments(graph) if donate else ()

    def body(*dynamic_args):
        leaves = jax.tree_util.tree_leaves(dynamic_args)
        outs = _Interpreter(constraints, mesh).run(closed.jaxpr, closed.consts, leaves)
        return jax.tree_util.tree_unflatten(graph.output_tree, outs)

    jitted = jax.jit(body, in_shardings=tuple(in_shardings), out_shardings=out_shardings,
                     donate_argnums=donate_argnums)
    return Program(plan=plan, mesh=mesh, graph=graph, jitted=jitted, in_shardings=tuple(in_shardings),
                   out_shardings=out_shardings, donate_argnums=donate_argnums)


def _donated_arguments(graph: G.Graph) -> tuple[int, ...]:
    """Arguments whose every leaf is returned updated (aliased): their buffers can be reused."""
    aliased = set(graph.aliases.values())
    leaf_arg = _leaf_argument_index(graph)
    donated = []
    for arg in sorted(set(leaf_arg)):
        leaves = [i for i, a in enumerate(leaf_arg) if a == arg]
        if leaves and all(i in aliased for i in leaves):
            donated.append(arg)
    return tuple(donated)


def _leaf_argument_index(graph: G.Graph) -> list[int]:
    """For each input leaf, the position of the (dynamic) argument it belongs to."""
    positions = []
    for arg, subtree in enumerate(graph.input_tree.children()):
        positions += [arg] * subtree.num_leaves
    return positions
