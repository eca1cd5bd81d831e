"""A wide multi-layer perceptron trained by regression.

Layout::

    block{i}    Dense to ``hidden`` features, then GELU, for i < layers
    head        Dense to ``out_features``

The loss is the mean squared error between the prediction for ``x`` and the
target ``y``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autoplan.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """Sizes and training hyperparameters of an MLP.

    Attributes:
        batch: Examples per batch.
        in_features: Width of the input ``x``.
        hidden: Width of every hidden layer.
        layers: Number of hidden Dense + GELU layers (``block0`` ...).
        out_features: Width of the target ``y``.
        dtype: Compute dtype of activations; parameters stay float32.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    batch: int
    in_features: int
    hidden: int
    layers: int
    out_features: int
    dtype: Any = jnp.float32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01


CONFIGS: dict[str, MLPConfig] = {
    "mlp-tiny": MLPConfig(batch=8, in_features=16, hidden=64, layers=2,
                          out_features=8),
    "mlp-small": MLPConfig(batch=64, in_features=512, hidden=2048, layers=4,
                           out_features=512),
}


class MLP(nn.Module):
    """``config.layers`` GELU Dense layers and a linear head.

    Attributes:
        config: The model config.
    """

    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``x`` ``[batch, in_features]`` to ``[batch, out_features]``."""
        cfg = self.config
        for i in range(cfg.layers):
            x = nn.Dense(cfg.hidden, dtype=cfg.dtype, param_dtype=jnp.float32,
                         name=f"block{i}")(x)
            x = nn.gelu(x)
        return nn.Dense(cfg.out_features, dtype=cfg.dtype,
                        param_dtype=jnp.float32, name="head")(x)


def _inputs(batch: Mapping[str, jax.Array]) -> tuple[jax.Array]:
    return (batch["x"],)


def _loss(predictions: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean squared error, computed in float32."""
    return optax.squared_error(predictions.astype(jnp.float32),
                               batch["y"]).mean()


def make_spec(config: MLPConfig, name: str = "mlp") -> ModelSpec:
    """Returns the `ModelSpec` of an MLP with ``config``."""
    x_shape = (config.batch, config.in_features)
    y_shape = (config.batch, config.out_features)

    def batch_fn(rng):
        """Gaussian inputs and targets."""
        x_rng, y_rng = jax.random.split(rng)
        return {"x": jax.random.normal(x_rng, x_shape, jnp.float32),
                "y": jax.random.normal(y_rng, y_shape, jnp.float32)}

    return ModelSpec(
        name=name,
        module=MLP(config),
        optimizer=optax.adamw(config.learning_rate,
                              weight_decay=config.weight_decay),
        batch_shapes={"x": jax.ShapeDtypeStruct(x_shape, jnp.float32),
                      "y": jax.ShapeDtypeStruct(y_shape, jnp.float32)},
        config=config,
        inputs_fn=_inputs,
        loss_fn=_loss,
        batch_fn=batch_fn,
    )
