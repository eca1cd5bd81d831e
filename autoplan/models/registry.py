"""The model zoo by name: `get` and `names`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from autoplan.models import gpt, mlp, moe, wide_resnet
from autoplan.models.spec import ModelSpec

# name -> (make_spec, default config), in the order `names()` lists them.
_REGISTRY: dict[str, tuple[Callable[..., ModelSpec], Any]] = {
    name: (family.make_spec, config)
    for family in (gpt, moe, wide_resnet, mlp)
    for name, config in family.CONFIGS.items()
}


def names() -> tuple[str, ...]:
    """Returns the names that `get` accepts."""
    return tuple(_REGISTRY)


def get(name: str, **overrides: Any) -> ModelSpec:
    """Returns the `ModelSpec` registered as ``name``.

    Keyword arguments replace fields of the model's config dataclass, e.g.
    ``get("gpt-tiny", batch=32, layers=3)``. Specs are cached: the same name
    and overrides give the same spec object, hence the same ``train_step``.

    Raises:
        ValueError: ``name`` is not registered, or an override names no field
            of the config.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: "
                         f"{', '.join(_REGISTRY)}")
    _, config = _REGISTRY[name]
    fields = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{name!r} has no config field(s) {unknown}; "
                         f"{type(config).__name__} fields: {', '.join(fields)}")
    return _build(name, tuple(sorted(overrides.items())))


@functools.cache
def _build(name: str, overrides: tuple[tuple[str, Any], ...]) -> ModelSpec:
    make_spec, config = _REGISTRY[name]
    return make_spec(dataclasses.replace(config, **dict(overrides)), name=name)
