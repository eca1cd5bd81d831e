"""The one jaxpr walker that `trace` and `emit` share.

Both passes visit the step's jaxpr the same way: nested ``jit`` and custom
derivative calls are inlined, and every other equation gets a stable *key*,
the path of equation indices through the nested jaxprs (``"7"`` is the
eighth top-level equation, ``"7/body/3"`` the fourth equation of its scan
body, ``"9/branch1/0"`` the first of a cond's second branch).  A `Plan`'s
anchors name operators by key, so the emitter finds them without counting.

Control flow (``scan``, ``while``, ``cond``) and remat regions are handed to
the visitor whole (`Visitor.structured`): trace walks their bodies into the
graph as repeated blocks, emit re-emits them as loops, branches and
checkpoints with the plan's sharding constraints inside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from autoplan._src import compat


class Visitor(Protocol):
    """What a pass does at each kind of equation (values are the pass's own: tensor ids, arrays)."""

    def constant(self, value: Any, stack: str) -> Any:
        """A value for a jaxpr constant or a literal bound to a sub-jaxpr's argument."""

    def literal(self, atom: Any, stack: str) -> Any:
        """A literal read directly as an equation's operand."""

    def equation(self, eqn, key: str, stack: str, invals: list) -> list:
        """An ordinary equation: its results."""

    def structured(self, kind: str, eqn, key: str, stack: str, invals: list) -> list:
        """A scan / while / cond / remat equation (`compat.structure_kind`): its results."""


def scope_key(key: str, scope: str) -> str:
    """The key prefix of a body nested in equation ``key``: ``scope_key("7", "body") == "7/body"``."""
    return f"{key}/{scope}"


def join_stack(prefix: str, inner: str) -> str:
    return f"{prefix}/{inner}" if prefix and inner else (prefix or inner)


def walk(jaxpr, consts: Sequence[Any], args: Sequence[Any], visitor: Visitor, *, prefix: str = "",
         stack: str = "") -> list:
    """Visit ``jaxpr`` bound to ``consts`` and ``args``; returns the values of its outputs.

    >>> import jax, jax.numpy as jnp
    >>> class Keys:
    ...     def constant(self, value, stack): return value
    ...     def literal(self, atom, stack): return atom.val
    ...     def equation(self, eqn, key, stack, invals): print(key, eqn.primitive); return [0] * len(eqn.outvars)
    ...     def structured(self, kind, eqn, key, stack, invals): print(key, kind); return [0] * len(eqn.outvars)
    >>> closed = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x) + 1)(1.0)
    >>> _ = walk(closed.jaxpr, closed.consts, [0], Keys())
    0/jit/0 sin
    1 add
    """
    env: dict = {}
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def bound(atom, where):
        return visitor.constant(compat.literal_value(atom), where) if compat.is_literal(atom) else env[atom]

    for index, eqn in enumerate(jaxpr.eqns):
        key = f"{prefix}/{index}" if prefix else str(index)
        where = join_stack(stack, compat.name_stack(eqn))
        body = compat.inline_body(eqn)
        if body is not None:
            sub_jaxpr, sub_consts = body
            sub_args = [bound(atom, where) for atom in eqn.invars]
            sub_consts = [visitor.constant(value, where) for value in sub_consts]
            with compat.equation_context(eqn):
                outs = walk(sub_jaxpr, sub_consts, sub_args, visitor, prefix=scope_key(key, "jit"), stack=where)
        elif (kind := compat.structure_kind(eqn)) is not None:
            outs = visitor.structured(kind, eqn, key, where, [bound(atom, where) for atom in eqn.invars])
        else:
            invals = [visitor.literal(atom, where) if compat.is_literal(atom) else env[atom] for atom in eqn.invars]
            outs = visitor.equation(eqn, key, where, invals)
        env.update(zip(eqn.outvars, outs))
    return [bound(atom, stack) for atom in jaxpr.outvars]


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of a jaxpr: 2 per multiply-add of a dot, one per result element of anything else.

    Sub-jaxprs count too (a scan's body times its length), so a ``cond``'s branches, a Pallas
    kernel or a ``shard_map`` body can be weighed without tracing it.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        sizes = [math.prod(compat.aval_shape_dtype(v)[0]) for v in eqn.outvars]
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = compat.aval_shape_dtype(eqn.invars[0])[0]
            total += 2.0 * sum(sizes) * math.prod(lhs[d] for d in contract)
        else:
            total += sum(sizes)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if isinstance(sub, (compat.ClosedJaxpr, compat.Jaxpr)):
                    total += times * jaxpr_flops(compat.open_jaxpr(sub)[0])
    return total
