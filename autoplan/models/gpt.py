"""A decoder-only, GPT-2 style language model.

Parameter names are part of the contract: plans and tests refer to them, e.g.
``params/block3/mlp_in/kernel``. The layout is::

    wte                      token embedding          [vocab, hidden]
    wpe                      learned positions        [seq_len, hidden]
    block{i}/ln1             LayerNorm
    block{i}/attn/qkv        fused q, k, v projection [hidden, 3 * hidden]
    block{i}/attn/proj       attention output         [hidden, hidden]
    block{i}/ln2             LayerNorm
    block{i}/mlp_in          MLP up projection        [hidden, mlp_ratio * hidden]
    block{i}/mlp_out         MLP down projection      [mlp_ratio * hidden, hidden]
    ln_f                     final LayerNorm
    head                     untied output head       [hidden, vocab], no bias

Each block is a submodule named ``block{i}``, so every operation it traces,
forward and backward, carries ``block{i}/...`` in JAX's name stack.

The loss is next-token cross-entropy: a batch holds ``tokens`` of shape
``[batch, seq_len + 1]``; the model reads ``tokens[:, :-1]`` and predicts
``tokens[:, 1:]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autoplan.models import _initializers as initializers
from autoplan.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes and training hyperparameters of a GPT model.

    Attributes:
        batch: Sequences per batch.
        seq_len: Tokens the model reads per sequence (the batch holds one more).
        vocab_size: Vocabulary size (GPT-2's 50257 is padded to 50304).
        layers: Number of transformer blocks.
        hidden: Model width.
        heads: Attention heads; must divide ``hidden``.
        mlp_ratio: MLP width as a multiple of ``hidden``.
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
    dtype: Any = jnp.float32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01


CONFIGS: dict[str, GPTConfig] = {
    "gpt-tiny": GPTConfig(batch=8, seq_len=16, vocab_size=128, layers=2,
                          hidden=64, heads=4),
    "gpt-small": GPTConfig(batch=16, seq_len=256, vocab_size=8192, layers=4,
                           hidden=512, heads=8),
    # GPT-2 shapes (124M / 350M / 1.5B with a tied head and 50257 tokens).
    "gpt2-12": GPTConfig(batch=8, seq_len=1024, vocab_size=50304, layers=12,
                         hidden=768, heads=12, learning_rate=3e-4),
    "gpt2-24": GPTConfig(batch=8, seq_len=1024, vocab_size=50304, layers=24,
                         hidden=1024, heads=16, learning_rate=3e-4),
    "gpt2-48": GPTConfig(batch=8, seq_len=1024, vocab_size=50304, layers=48,
                         hidden=1600, heads=25, learning_rate=3e-4),
}

# GPT-2's initialization: N(0, 0.02) for every weight matrix and embedding.
_INIT = initializers.normal(0.02)


def dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    """A float32-parameter Dense layer computing in ``dtype``."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=_INIT, name=name)


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    """A float32-parameter LayerNorm computing in ``dtype``."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                        name=name)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection.

    Attributes:
        heads: Number of attention heads.
        dtype: Compute dtype; softmax runs in float32.
    """

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, hidden = x.shape
        head_dim = hidden // self.heads
        qkv = dense(3 * hidden, "qkv", self.dtype)(x)
        qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]   # [b, t, h, d]

        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores.astype(jnp.float32), -1e9)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = out.reshape(batch, length, hidden)
        return dense(hidden, "proj", self.dtype)(out)


class Block(nn.Module):
    """A pre-LayerNorm transformer block: attention, then a GELU MLP.

    Attributes:
        config: The model config.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = x + CausalSelfAttention(cfg.heads, cfg.dtype, name="attn")(
            layer_norm("ln1", cfg.dtype)(x))
        h = layer_norm("ln2", cfg.dtype)(x)
        h = dense(cfg.mlp_ratio * cfg.hidden, "mlp_in", cfg.dtype)(h)
        h = nn.gelu(h)
        h = dense(cfg.hidden, "mlp_out", cfg.dtype)(h)
        return x + h


class GPT(nn.Module):
    """GPT-2 style decoder: embeddings, ``config.layers`` blocks, untied head.

    Attributes:
        config: The model config.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Maps int tokens ``[batch, length]`` to logits ``[batch, length, vocab]``."""
        cfg = self.config
        x = embed_tokens(cfg, tokens)
        for i in range(cfg.layers):
            x = Block(cfg, name=f"block{i}")(x)
        x = layer_norm("ln_f", cfg.dtype)(x)
        return dense(cfg.vocab_size, "head", cfg.dtype, use_bias=False)(x)


def embed_tokens(cfg: Any, tokens: jax.Array) -> jax.Array:
    """Token plus learned position embeddings (modules ``wte`` and ``wpe``).

    Called inside a compact module method, whose submodules these become.
    ``cfg`` is any config with ``vocab_size``, ``seq_len``, ``hidden`` and
    ``dtype`` (`GPTConfig`, `moe.MoEConfig`).
    """
    length = tokens.shape[1]
    wte = nn.Embed(cfg.vocab_size, cfg.hidden, dtype=cfg.dtype,
                   param_dtype=jnp.float32, embedding_init=_INIT, name="wte")
    wpe = nn.Embed(cfg.seq_len, cfg.hidden, dtype=cfg.dtype,
                   param_dtype=jnp.float32, embedding_init=_INIT, name="wpe")
    return wte(tokens) + wpe(jnp.arange(length))[None]


# Language-model batches and loss, shared with `moe`.

def lm_batch_shapes(batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """``{"tokens": int32[batch, seq_len + 1]}``."""
    return {"tokens": jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)}


def lm_inputs(batch: Mapping[str, jax.Array]) -> tuple[jax.Array]:
    """The model reads every token but the last."""
    return (batch["tokens"][:, :-1],)


def lm_loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy, computed in float32."""
    labels = batch["tokens"][:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return losses.mean()


def random_tokens(rng: jax.Array, batch: int, seq_len: int,
                  vocab_size: int) -> dict[str, jax.Array]:
    """Uniformly random tokens: no structure, but memorizable."""
    tokens = jax.random.randint(rng, (batch, seq_len + 1), 0, vocab_size,
                                dtype=jnp.int32)
    return {"tokens": tokens}


def make_spec(config: GPTConfig, name: str = "gpt") -> ModelSpec:
    """Returns the `ModelSpec` of a GPT model with ``config``."""
    if config.hidden % config.heads:
        raise ValueError(f"hidden={config.hidden} is not divisible by "
                         f"heads={config.heads}")
    return ModelSpec(
        name=name,
        module=GPT(config),
        optimizer=optax.adamw(config.learning_rate,
                              weight_decay=config.weight_decay),
        batch_shapes=lm_batch_shapes(config.batch, config.seq_len),
        config=config,
        inputs_fn=lm_inputs,
        loss_fn=lm_loss,
        batch_fn=lambda rng: random_tokens(rng, config.batch, config.seq_len,
                                           config.vocab_size),
    )
