"""A Wide-ResNet image classifier with GroupNorm instead of BatchNorm.

BatchNorm's running statistics would make the training step stateful;
GroupNorm keeps ``params`` the only variable collection, so the step is a pure
function of ``(params, opt_state, batch)``.

Layout (NHWC images)::

    stem                     3x3 conv to the first stage's width
    block{i}/norm1, conv1    pre-activation residual block: GroupNorm, ReLU,
    block{i}/norm2, conv2    3x3 conv (stride 2 on a stage's first block), twice
    block{i}/shortcut        1x1 conv where the shape changes
    norm, head               final GroupNorm, global average pool, Dense

Blocks are numbered across stages: with two blocks per stage, stage 0 holds
``block0, block1``, stage 1 ``block2, block3``, and so on. Stage ``s`` has
``base_width * widen_factor * 2**s`` channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autoplan.models import _initializers as initializers
from autoplan.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class WideResNetConfig:
    """Sizes and training hyperparameters of a Wide-ResNet.

    Attributes:
        batch: Images per batch.
        image_size: Height and width of the (square) images.
        in_channels: Channels of the input images.
        num_classes: Number of classes.
        stages: Number of stages; each after the first halves the resolution.
        blocks_per_stage: Residual blocks per stage.
        base_width: Channels of the first stage before widening.
        widen_factor: The "k" of WRN-d-k.
        norm_groups: Groups of every GroupNorm; must divide every width.
        dtype: Compute dtype of activations; parameters stay float32.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    batch: int
    image_size: int
    in_channels: int = 3
    num_classes: int
    stages: int = 3
    blocks_per_stage: int
    base_width: int = 16
    widen_factor: int
    norm_groups: int = 8
    dtype: Any = jnp.float32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01

    def stage_widths(self) -> tuple[int, ...]:
        """Channels of each stage."""
        return tuple(self.base_width * self.widen_factor * 2**s
                     for s in range(self.stages))


CONFIGS: dict[str, WideResNetConfig] = {
    "wresnet-tiny": WideResNetConfig(batch=8, image_size=8, num_classes=8,
                                     blocks_per_stage=1, base_width=8,
                                     widen_factor=1),
    # WRN-16-4 on 32x32 images.
    "wresnet-small": WideResNetConfig(batch=32, image_size=32, num_classes=16,
                                      blocks_per_stage=2, base_width=16,
                                      widen_factor=4),
}


def _conv(features: int, kernel: int, strides: int, name: str,
          dtype: Any) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding="SAME", use_bias=False, dtype=dtype,
                   param_dtype=jnp.float32,
                   kernel_init=initializers.he_normal, name=name)


def _group_norm(groups: int, name: str, dtype: Any) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class ResidualBlock(nn.Module):
    """A pre-activation residual block of two 3x3 convolutions.

    Attributes:
        features: Output channels.
        strides: Stride of the first convolution (and of the shortcut).
        norm_groups: Groups of the GroupNorms.
        dtype: Compute dtype.
    """

    features: int
    strides: int
    norm_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(_group_norm(self.norm_groups, "norm1", self.dtype)(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, self.strides, "shortcut",
                             self.dtype)(h)
        h = _conv(self.features, 3, self.strides, "conv1", self.dtype)(h)
        h = nn.relu(_group_norm(self.norm_groups, "norm2", self.dtype)(h))
        h = _conv(self.features, 3, 1, "conv2", self.dtype)(h)
        return shortcut + h


class WideResNet(nn.Module):
    """Wide-ResNet: stem, stages of `ResidualBlock` s, pooled linear head.

    Attributes:
        config: The model config.
    """

    config: WideResNetConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Maps images ``[batch, h, w, c]`` to logits ``[batch, classes]``."""
        cfg = self.config
        widths = cfg.stage_widths()
        x = _conv(widths[0], 3, 1, "stem", cfg.dtype)(images)
        index = 0
        for stage, width in enumerate(widths):
            for i in range(cfg.blocks_per_stage):
                strides = 2 if stage > 0 and i == 0 else 1
                x = ResidualBlock(width, strides, cfg.norm_groups, cfg.dtype,
                                  name=f"block{index}")(x)
                index += 1
        x = nn.relu(_group_norm(cfg.norm_groups, "norm", cfg.dtype)(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(cfg.num_classes, dtype=cfg.dtype,
                        param_dtype=jnp.float32, name="head")(x)


def _inputs(batch: Mapping[str, jax.Array]) -> tuple[jax.Array]:
    return (batch["images"],)


def _loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["labels"]).mean()


def make_spec(config: WideResNetConfig, name: str = "wresnet") -> ModelSpec:
    """Returns the `ModelSpec` of a Wide-ResNet with ``config``."""
    bad = [w for w in config.stage_widths() if w % config.norm_groups]
    if bad:
        raise ValueError(f"norm_groups={config.norm_groups} does not divide "
                         f"stage widths {bad}")
    image_shape = (config.batch, config.image_size, config.image_size,
                   config.in_channels)

    def batch_fn(rng):
        """Gaussian images with uniformly random labels."""
        image_rng, label_rng = jax.random.split(rng)
        return {
            "images": initializers.normal(1.0)(image_rng, image_shape),
            "labels": jax.random.randint(label_rng, (config.batch,), 0,
                                         config.num_classes, dtype=jnp.int32),
        }

    return ModelSpec(
        name=name,
        module=WideResNet(config),
        optimizer=optax.adamw(config.learning_rate,
                              weight_decay=config.weight_decay),
        batch_shapes={
            "images": jax.ShapeDtypeStruct(image_shape, jnp.float32),
            "labels": jax.ShapeDtypeStruct((config.batch,), jnp.int32),
        },
        config=config,
        inputs_fn=_inputs,
        loss_fn=_loss,
        batch_fn=batch_fn,
    )
