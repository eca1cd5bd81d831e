"""One tiny GPT written three ways: a Python loop of blocks, nn.scan over blocks, nn.scan(nn.remat(Block)).

The blocks are `autoplan.models.gpt.Block`; only how they are stacked differs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autoplan.models import gpt

CONFIG = gpt.GPTConfig(vocab_size=256, seq_len=64, hidden=256, heads=4, layers=4, batch=16)
OPTIMIZER = optax.adam(1e-2, eps=1e-3)


class ScanBlock(nn.Module):
    config: gpt.GPTConfig

    @nn.compact
    def __call__(self, x, _):
        return gpt.Block(self.config, name="block")(x), None


class StackedGPT(nn.Module):
    """``config.layers`` blocks stacked by ``style``: "loop", "scan" or "remat_scan"."""

    config: gpt.GPTConfig
    style: str = "loop"

    @nn.compact
    def __call__(self, tokens):
        cfg = self.config
        x = gpt.embed_tokens(cfg, tokens)
        if self.style == "loop":
            for i in range(cfg.layers):
                x = gpt.Block(cfg, name=f"block{i}")(x)
        else:
            block = nn.remat(ScanBlock, prevent_cse=False) if self.style == "remat_scan" else ScanBlock
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.layers)
            x, _ = stack(cfg, name="blocks")(x, None)
        x = gpt.layer_norm("ln_f", cfg.dtype)(x)
        return gpt.dense(cfg.vocab_size, "head", cfg.dtype, use_bias=False)(x)


def make(style: str, config: gpt.GPTConfig = CONFIG, optimizer=OPTIMIZER, *, abstract: bool = False):
    """(train_step, params, opt_state, batch) of the GPT stacked as ``style``; ShapeDtypeStructs if ``abstract``."""
    model = StackedGPT(config, style)

    def state():
        batch = gpt.random_tokens(jax.random.key(1), config.batch, config.seq_len, config.vocab_size)
        params = model.init(jax.random.key(0), gpt.lm_inputs(batch)[0])["params"]
        return params, optimizer.init(params), batch

    params, opt_state, batch = jax.eval_shape(state) if abstract else state()

    def loss_fn(params, batch):
        return gpt.lm_loss(model.apply({"params": params}, *gpt.lm_inputs(batch)), batch)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step, params, opt_state, batch


def run(step, params, opt_state, batch, steps: int = 3):
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return jnp.asarray(losses), params
