"""`ModelSpec`: everything needed to train one model of the zoo.

A `ModelSpec` bundles a Flax linen module, an optax optimizer, the shapes of
one training batch, and three small functions that say how a batch feeds the
module (`inputs_fn`), how the module's outputs become a scalar loss
(`loss_fn`) and how to draw a random batch (`batch_fn`). From those it derives
the pure training step that autoplan plans::

    spec = autoplan.models.get("gpt-tiny")
    params, opt_state = spec.init(jax.random.key(0))
    batch = spec.make_batch(jax.random.key(1))
    step = jax.jit(spec.train_step)
    params, opt_state, loss = step(params, opt_state, batch)

Planning needs no real arrays: `abstract_state()` and `abstract_batch()` give
`jax.ShapeDtypeStruct` pytrees of the same structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
Params = Any
OptState = Any
TrainStep = Callable[[Params, OptState, Batch], tuple[Params, OptState, jax.Array]]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class ModelSpec:
    """A model, its optimizer and its batch, ready to train or to plan.

    Specs compare and hash by identity, so a spec (and its `train_step`) can
    key a cache; the same spec always returns the same `train_step` object.

    Attributes:
        name: Registry name, e.g. ``"gpt-tiny"``.
        module: The Flax linen module. ``params`` is its only variable
            collection (no batch statistics), so training is a pure function.
        optimizer: The optax transformation (``optax.adamw`` in the zoo).
        batch_shapes: Shape and dtype of every entry of a training batch.
        config: The model's config dataclass (sizes, dtype, learning rate).
        inputs_fn: Maps a batch to the positional arguments of ``module``.
        loss_fn: Maps ``(module outputs, batch)`` to a scalar float32 loss.
        batch_fn: Maps a PRNG key to a random batch matching ``batch_shapes``.
        train_step: ``(params, opt_state, batch) -> (params, opt_state,
            loss)``, one optimizer step. Pure (no ``jit`` inside), built once
            per spec.
    """

    name: str
    module: nn.Module = dataclasses.field(repr=False)
    optimizer: optax.GradientTransformation = dataclasses.field(repr=False)
    batch_shapes: dict[str, jax.ShapeDtypeStruct]
    config: Any = None
    inputs_fn: Callable[[Mapping[str, jax.Array]], tuple[Any, ...]] = (
        dataclasses.field(repr=False))
    loss_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array] = (
        dataclasses.field(repr=False))
    batch_fn: Callable[[jax.Array], Batch] = dataclasses.field(repr=False)
    train_step: TrainStep = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        # Built once, so that `spec.train_step is spec.train_step`: jit caches
        # and autoplan's plan cache key on the function object.
        object.__setattr__(self, "train_step", _make_train_step(self))

    def loss(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Returns the scalar training loss of ``params`` on ``batch``."""
        outputs = self.module.apply({"params": params}, *self.inputs_fn(batch))
        return self.loss_fn(outputs, batch)

    def init(self, rng: jax.Array) -> tuple[Params, OptState]:
        """Returns freshly initialized ``(params, opt_state)`` as real arrays."""
        return jax.jit(self._init_state)(rng)

    def abstract_state(self) -> tuple[Params, OptState]:
        """Returns ``(params, opt_state)`` as ``jax.ShapeDtypeStruct`` pytrees.

        Only traces the initializers (``jax.eval_shape``): nothing is computed
        or allocated, so this is cheap even for billion-parameter configs.
        """
        return jax.eval_shape(self._init_state, jax.random.key(0))

    def make_batch(self, rng: jax.Array) -> Batch:
        """Returns a random batch of real arrays matching `batch_shapes`."""
        return self.batch_fn(rng)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Returns the batch as ``jax.ShapeDtypeStruct`` s (a fresh dict)."""
        return dict(self.batch_shapes)

    def _init_state(self, rng: jax.Array) -> tuple[Params, OptState]:
        example = {key: jnp.zeros(shape.shape, shape.dtype)
                   for key, shape in self.batch_shapes.items()}
        params = self.module.init(rng, *self.inputs_fn(example))["params"]
        return params, self.optimizer.init(params)


def _make_train_step(spec: ModelSpec) -> TrainStep:
    """Builds the pure training step of ``spec``."""

    def train_step(params, opt_state, batch):
        """One optimizer step: returns ``(params, opt_state, loss)``."""
        loss, grads = jax.value_and_grad(spec.loss)(params, batch)
        updates, opt_state = spec.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    return train_step
