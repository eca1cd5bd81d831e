"""A GPT-style transformer whose every other MLP is a mixture of experts.

Blocks ``block0, block2, ...`` are the dense blocks of `gpt`; blocks
``block1, block3, ...`` replace the MLP by a GShard-style mixture of experts
under the module name ``moe``::

    block{i}/moe/router      Dense, no bias  [hidden, experts]
    block{i}/moe/expert_in   stacked weights [experts, hidden, mlp_ratio * hidden]
    block{i}/moe/expert_out  stacked weights [experts, mlp_ratio * hidden, hidden]

Routing is top-2 with a fixed capacity per expert. Each sequence of the
batch is one routing group of ``seq_len`` tokens; an expert accepts at most
``capacity = ceil(2 * seq_len * capacity_factor / experts)`` tokens per group
and drops the rest (they pass through the residual connection only). Tokens
move to and from the experts by einsums with one-hot dispatch and combine
tensors, so with the expert axis sharded the planner sees all-to-alls.

The loss is the GPT next-token loss plus ``aux_loss_weight`` times GShard's
load-balancing loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autoplan.models import _initializers as initializers
from autoplan.models import gpt
from autoplan.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Sizes and training hyperparameters of a mixture-of-experts model.

    Attributes:
        batch: Sequences per batch.
        seq_len: Tokens the model reads per sequence (the batch holds one more).
        vocab_size: Vocabulary size.
        layers: Number of transformer blocks; odd-numbered ones are MoE.
        hidden: Model width.
        heads: Attention heads; must divide ``hidden``.
        mlp_ratio: Expert (and dense MLP) width as a multiple of ``hidden``.
        experts: Number of experts in each MoE block.
        capacity_factor: Slack of the per-expert capacity over an even split
            of the top-2 assignments.
        aux_loss_weight: Weight of the load-balancing loss.
        dtype: Compute dtype of activations; parameters stay float32.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    batch: int
    seq_len: int
    vocab_size: int
    layers: int
    hidden: int
    heads: int
    mlp_ratio: int = 4
    experts: int = 8
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01
    dtype: Any = jnp.float32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01

    def expert_capacity(self) -> int:
        """Tokens each expert accepts per routing group (one sequence)."""
        return max(1, math.ceil(2 * self.seq_len * self.capacity_factor
                                / self.experts))


CONFIGS: dict[str, MoEConfig] = {
    "moe-tiny": MoEConfig(batch=8, seq_len=16, vocab_size=128, layers=2,
                          hidden=64, heads=4, experts=8, capacity_factor=2.0),
    "moe-small": MoEConfig(batch=16, seq_len=256, vocab_size=8192, layers=4,
                           hidden=512, heads=8, experts=8),
}


def top2_routing(probs: jax.Array, capacity: int):
    """GShard top-2 routing of ``probs`` ``[groups, tokens, experts]``.

    Returns:
        ``(dispatch, combine, aux_loss)``: ``dispatch`` is one-hot
        ``[groups, tokens, experts, capacity]`` (token -> expert buffer slot),
        ``combine`` is the same tensor weighted by the normalized gate values,
        and ``aux_loss`` is the load-balancing loss (1.0 when balanced).
    """
    num_experts = probs.shape[-1]

    # First and second choice, as one-hot masks [g, s, e].
    mask1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_experts)
    probs_without_1 = probs * (1.0 - mask1)
    mask2 = jax.nn.one_hot(jnp.argmax(probs_without_1, axis=-1), num_experts)

    # Load balancing: fraction of tokens whose first choice is each expert,
    # times the mean router probability of that expert (differentiable).
    density = mask1.mean(axis=1)
    density_proxy = probs.mean(axis=1)
    aux_loss = (density * density_proxy).mean() * num_experts**2

    # Slot of each token in its expert's buffer; first choices go first.
    position1 = (jnp.cumsum(mask1, axis=1) - 1.0) * mask1
    mask1 = mask1 * (position1 < capacity)
    taken = mask1.sum(axis=1, keepdims=True)
    position2 = (jnp.cumsum(mask2, axis=1) - 1.0 + taken) * mask2
    mask2 = mask2 * (position2 < capacity)

    # Gates of the kept assignments, normalized over the two choices.
    gate1 = (probs * mask1).sum(axis=-1)
    gate2 = (probs * mask2).sum(axis=-1)
    norm = jnp.maximum(gate1 + gate2, 1e-9)
    gate1, gate2 = gate1 / norm, gate2 / norm

    slot1 = jax.nn.one_hot(position1.sum(axis=-1).astype(jnp.int32), capacity)
    slot2 = jax.nn.one_hot(position2.sum(axis=-1).astype(jnp.int32), capacity)
    dispatch1 = mask1[..., None] * slot1[:, :, None, :]
    dispatch2 = mask2[..., None] * slot2[:, :, None, :]
    dispatch = dispatch1 + dispatch2
    combine = (gate1[..., None, None] * dispatch1
               + gate2[..., None, None] * dispatch2)
    return dispatch, combine, aux_loss


class MixtureOfExperts(nn.Module):
    """Top-2 routed GELU experts with stacked weights.

    Attributes:
        config: The model config.
    """

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Maps ``x`` ``[batch, length, hidden]`` to ``(y, aux_loss)``."""
        cfg = self.config
        ffn = cfg.mlp_ratio * cfg.hidden
        init = initializers.normal(0.02)
        expert_in = self.param("expert_in", init,
                               (cfg.experts, cfg.hidden, ffn), jnp.float32)
        expert_out = self.param("expert_out", init,
                                (cfg.experts, ffn, cfg.hidden), jnp.float32)

        router_logits = gpt.dense(cfg.experts, "router", jnp.float32,
                                  use_bias=False)(x)
        probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
        capacity = min(cfg.expert_capacity(), x.shape[1])
        dispatch, combine, aux_loss = top2_routing(probs, capacity)

        # Groups (g) are sequences, s tokens, e experts, c capacity slots.
        dispatch = dispatch.astype(cfg.dtype)
        expert_inputs = jnp.einsum("gsec,gsd->egcd", dispatch, x.astype(cfg.dtype))
        h = jnp.einsum("egcd,edf->egcf", expert_inputs,
                       expert_in.astype(cfg.dtype))
        h = nn.gelu(h)
        expert_outputs = jnp.einsum("egcf,efd->egcd", h,
                                    expert_out.astype(cfg.dtype))
        y = jnp.einsum("gsec,egcd->gsd", combine.astype(cfg.dtype),
                       expert_outputs)
        return y, aux_loss


class MoEBlock(nn.Module):
    """A pre-LayerNorm transformer block whose MLP may be a mixture of experts.

    Attributes:
        config: The model config.
        use_moe: Whether the MLP is `MixtureOfExperts` (module ``moe``) rather
            than the dense ``mlp_in`` / ``mlp_out`` pair.
    """

    config: MoEConfig
    use_moe: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x = x + gpt.CausalSelfAttention(cfg.heads, cfg.dtype, name="attn")(
            gpt.layer_norm("ln1", cfg.dtype)(x))
        h = gpt.layer_norm("ln2", cfg.dtype)(x)
        if self.use_moe:
            h, aux_loss = MixtureOfExperts(cfg, name="moe")(h)
        else:
            h = gpt.dense(cfg.mlp_ratio * cfg.hidden, "mlp_in", cfg.dtype)(h)
            h = gpt.dense(cfg.hidden, "mlp_out", cfg.dtype)(nn.gelu(h))
            aux_loss = jnp.zeros((), jnp.float32)
        return x + h, aux_loss


class MoETransformer(nn.Module):
    """GPT-style decoder alternating dense and mixture-of-experts blocks.

    Attributes:
        config: The model config.
    """

    config: MoEConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Maps tokens ``[batch, length]`` to ``(logits, aux_loss)``.

        ``aux_loss`` is the mean load-balancing loss of the MoE blocks.
        """
        cfg = self.config
        x = gpt.embed_tokens(cfg, tokens)
        aux_losses = []
        for i in range(cfg.layers):
            x, aux_loss = MoEBlock(cfg, use_moe=i % 2 == 1, name=f"block{i}")(x)
            if i % 2 == 1:
                aux_losses.append(aux_loss)
        x = gpt.layer_norm("ln_f", cfg.dtype)(x)
        logits = gpt.dense(cfg.vocab_size, "head", cfg.dtype, use_bias=False)(x)
        aux = sum(aux_losses) / len(aux_losses) if aux_losses else 0.0
        return logits, jnp.asarray(aux, jnp.float32)


def make_spec(config: MoEConfig, name: str = "moe") -> ModelSpec:
    """Returns the `ModelSpec` of a mixture-of-experts model with ``config``."""
    if config.hidden % config.heads:
        raise ValueError(f"hidden={config.hidden} is not divisible by "
                         f"heads={config.heads}")

    def loss_fn(outputs, batch):
        logits, aux_loss = outputs
        return gpt.lm_loss(logits, batch) + config.aux_loss_weight * aux_loss

    return ModelSpec(
        name=name,
        module=MoETransformer(config),
        optimizer=optax.adamw(config.learning_rate,
                              weight_decay=config.weight_decay),
        batch_shapes=gpt.lm_batch_shapes(config.batch, config.seq_len),
        config=config,
        inputs_fn=gpt.lm_inputs,
        loss_fn=loss_fn,
        batch_fn=lambda rng: gpt.random_tokens(rng, config.batch,
                                               config.seq_len, config.vocab_size),
    )
