"""Emit a `Plan` as a ``jax.jit`` program.

The plan fixes the layout of every input and output leaf and of the anchor
intermediates (dot, conv and gather results, and both ends of every reshard
it makes: the producer's result and the consumer's operand).  The emitter re-evaluates the
step's jaxpr with a small interpreter that walks it exactly as `trace` did
(same inlining, so the i-th operator here is op ``i`` of the Graph) and pins
each anchor with ``jax.lax.with_sharding_constraint``; ``jax.jit`` gets the
input/output shardings and donates the buffers that the step updates in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from autoplan._src import cluster as C
from autoplan._src import compat
from autoplan._src import graph as G
from autoplan._src import plan as P
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
    return [jax.sharding.NamedSharding(mesh, leaf.partition_spec) for leaf in leaves]


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


# Graph roles of operators that are jaxpr equations (not inputs, outputs or constants).
_EQUATION_ROLES = frozenset({G.FORWARD, G.BACKWARD, G.OPTIMIZER})


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Constraints:
    """Shardings to pin, keyed by equation ordinal (the k-th non-inlined equation of the walk)."""

    outputs: dict[int, dict[int, jax.sharding.NamedSharding]]
    operands: dict[int, dict[int, jax.sharding.NamedSharding]]


def anchor_constraints(plan: P.Plan, graph: G.Graph, mesh: jax.sharding.Mesh) -> Constraints:
    """The plan's anchors as shardings per equation ordinal: results, and operands where the plan reshards."""
    ordinal, count = {}, 0
    for op in graph.ops:
        if op.role in _EQUATION_ROLES:
            ordinal[op.id] = count
            count += 1
    outputs: dict[int, dict[int, jax.sharding.NamedSharding]] = {}
    operands: dict[int, dict[int, jax.sharding.NamedSharding]] = {}
    for anchor in plan.anchors:
        op = graph.ops[anchor.op] if 0 <= anchor.op < len(graph.ops) else None
        if anchor.operand is None:
            shapes, index, target = (op.output_shapes if op else ()), anchor.output, outputs
        else:
            shapes, index, target = (op.input_shapes if op else ()), anchor.operand, operands
        if op is None or op.id not in ordinal or not 0 <= index < len(shapes) \
                or shapes[index] != tuple(anchor.shape):
            raise PlanMismatchError(
                f"plan {plan.name!r} pins anchor {anchor.op} ({anchor.label}, shape {anchor.shape}) but the traced "
                "step has no such operator: the plan was made for a different function; re-plan it")
        sharding = jax.sharding.NamedSharding(mesh, S.to_partition_spec(anchor.spec))
        target.setdefault(ordinal[op.id], {})[index] = sharding
    return Constraints(outputs=outputs, operands=operands)


class _Interpreter:
    """Re-evaluates a jaxpr, inlining exactly as `trace` does, and pins anchored operands and results."""

    def __init__(self, constraints: Constraints):
        self.constraints = constraints
        self.count = 0

    def run(self, jaxpr, consts, args) -> list:
        env = {}

        def read(atom):
            return compat.literal_value(atom) if compat.is_literal(atom) else env[atom]

        def pin(values, shardings):
            for index, sharding in (shardings or {}).items():
                if not jax.dtypes.issubdtype(getattr(values[index], "dtype", None), jax.dtypes.extended):
                    values[index] = jax.lax.with_sharding_constraint(values[index], sharding)
            return values

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(atom) for atom in eqn.invars]
            body = compat.inline_body(eqn)
            if body is not None:
                sub_jaxpr, sub_consts = body
                with compat.equation_context(eqn):
                    outs = self.run(sub_jaxpr, sub_consts, invals)
            else:
                invals = pin(invals, self.constraints.operands.get(self.count))
                outs = pin(list(compat.bind_equation(eqn, invals)), self.constraints.outputs.get(self.count))
                self.count += 1
            env.update(zip(eqn.outvars, outs))
        return [read(atom) for atom in jaxpr.outvars]


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
        outs = _Interpreter(constraints).run(closed.jaxpr, closed.consts, leaves)
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
