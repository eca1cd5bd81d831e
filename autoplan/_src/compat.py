"""Everything autoplan needs from JAX's internals, in one place.

Jaxpr structure (``Var``, ``Literal``, sub-jaxpr parameters), name stacks and
source locations are not public API and change between releases; the passes
call these helpers instead of touching ``jax._src`` or ``jax.extend`` directly.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.extend import core as jex_core

try:  # source locations; a private module with no public equivalent.
    from jax._src import source_info_util as _source_info_util
except ImportError:  # pragma: no cover - future JAX
    _source_info_util = None

Literal = jex_core.Literal
Var = jex_core.Var
ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr

# Primitives whose body is inlined into the graph: a nested jit and custom
# derivative rules (their primal body is what runs).  Remat regions and control
# flow are kept as structure (`structure_kind`).
INLINED_PRIMITIVES: dict[str, tuple[str, ...]] = {
    "jit": ("jaxpr",),
    "pjit": ("jaxpr",),
    "closed_call": ("call_jaxpr",),
    "core_call": ("call_jaxpr",),
    "custom_jvp_call": ("call_jaxpr",),
    "custom_vjp_call": ("call_jaxpr", "fun_jaxpr"),
    "custom_vjp_call_jaxpr": ("fun_jaxpr", "call_jaxpr"),
    "custom_lin": (),
}


def is_literal(atom: Any) -> bool:
    return isinstance(atom, Literal)


def literal_value(atom: Any) -> Any:
    return atom.val


def inline_body(eqn) -> tuple[Jaxpr, list[Any]] | None:
    """The body of an inlinable equation as (jaxpr, consts), or None."""
    keys = INLINED_PRIMITIVES.get(eqn.primitive.name)
    if not keys:
        return None
    for key in keys:
        body = eqn.params.get(key)
        if body is None:
            continue
        if isinstance(body, ClosedJaxpr):
            return body.jaxpr, list(body.consts)
        if isinstance(body, Jaxpr):
            return body, []
    return None


def name_stack(eqn) -> str:
    return str(eqn.source_info.name_stack)


def source_summary(source_info) -> str:
    """'file.py:123 (function)' for the user frame that created an equation."""
    if _source_info_util is None or source_info is None:
        return "<unknown source>"
    try:
        text = _source_info_util.summarize(source_info)
    except Exception:  # noqa: BLE001 - best effort, never fail planning over a source line
        return "<unknown source>"
    return re.sub(r":(\d+):\d+ ", r":\1 ", text)


def aval_shape_dtype(atom: Any) -> tuple[tuple[int, ...], str]:
    aval = atom.aval
    shape = tuple(int(d) for d in getattr(aval, "shape", ()))
    dtype = str(getattr(aval, "dtype", "float32"))
    return shape, dtype


def make_jaxpr(fn, *args, static_argnums=()):
    """``jax.make_jaxpr`` that also returns the output pytree structure."""
    return jax.make_jaxpr(fn, static_argnums=static_argnums, return_shape=True)(*args)


def sub_jaxprs(params: dict[str, Any]) -> list:
    """The jaxprs (closed or open) among an equation's parameters: a loop's body, a cond's branches."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (ClosedJaxpr, Jaxpr)):
                found.append(item)
    return found


def hashable_params(params: dict[str, Any]) -> tuple:
    """A hashable, deterministic key of an equation's parameters (for caching rules)."""
    items = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, (ClosedJaxpr, Jaxpr)):
            value = ("jaxpr", id(value))
        else:
            try:
                hash(value)
            except TypeError:
                value = repr(value)
        items.append((key, value))
    return tuple(items)


def equation_context(eqn):
    """The name stack and source location ``eqn`` was traced under, for re-evaluating it.

    Re-binding an equation inside this context keeps the HLO metadata (op
    names, source lines) that a direct ``jax.jit`` of the step would have.
    """
    import contextlib

    if _source_info_util is None:  # pragma: no cover - future JAX
        return contextlib.nullcontext()
    name_stack = _source_info_util.current_name_stack() + eqn.source_info.name_stack
    stack = contextlib.ExitStack()
    stack.enter_context(_source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack))
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    if manager is not None:
        stack.enter_context(manager)
    return stack


def bind_equation(eqn, invals: list[Any]) -> list[Any]:
    """Evaluate one equation on (traced) values, as ``jax.core.eval_jaxpr`` does; always a list."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with equation_context(eqn):
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


# Equations kept as structure: their bodies are walked, and re-emitted as the same construct.
_STRUCTURED = {"scan": "scan", "while": "while", "cond": "cond", "remat2": "remat", "checkpoint": "remat"}


def structure_kind(eqn) -> str | None:
    """'scan', 'while', 'cond' or 'remat' for an equation with a body kept as structure, else None."""
    return _STRUCTURED.get(eqn.primitive.name)


def is_structured(primitive: str) -> bool:
    """Whether a primitive (by name, as a Graph op records it) has a body kept as structure."""
    return primitive in _STRUCTURED


def open_jaxpr(body) -> tuple[Jaxpr, list[Any]]:
    """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr parameter."""
    if isinstance(body, ClosedJaxpr):
        return body.jaxpr, list(body.consts)
    return body, []


def bind_remat(eqn, fn, invals: list[Any]) -> list[Any]:
    """Re-emit a ``jax.checkpoint`` region ``eqn`` with ``fn`` (its body, re-evaluated) as the body.

    The region keeps the user's policy, ``prevent_cse`` and ``differentiated``
    flags: a differentiated region lowers with an optimization barrier, which
    is what stops XLA from undoing the recomputation (``jax.checkpoint`` called
    afresh outside a derivative would drop it).
    """
    from jax._src.interpreters import partial_eval as pe

    closed = jax.make_jaxpr(fn)(*invals)
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    params = dict(eqn.params)
    prevent_cse = params.get("prevent_cse", True)
    if isinstance(prevent_cse, tuple):
        prevent_cse = (False,) * len(closed.consts) + prevent_cse
    params.update(jaxpr=jaxpr, prevent_cse=prevent_cse)
    with equation_context(eqn):
        out = eqn.primitive.bind(*closed.consts, *invals, **params)
    return list(out)


def sharding_spec(sharding) -> tuple[Any, ...] | None:
    """The PartitionSpec entries of a NamedSharding-like object, or None (other shardings)."""
    spec = getattr(sharding, "spec", None)
    return None if spec is None else tuple(spec)

