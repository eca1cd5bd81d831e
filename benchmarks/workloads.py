"""Training steps on model code autoplan's authors did not write, at a tiny and a benchmark size.

Each workload is a `Workload`: a pure ``train_step(params, opt_state, batch) ->
(params, opt_state, loss)`` with optax AdamW (or SGD), abstract arguments
(``jax.ShapeDtypeStruct`` s, nothing allocated) and a concrete init.  It has the
same interface as `autoplan.models.ModelSpec` (``name``, ``train_step``,
``abstract_state()``, ``abstract_batch()``, ``init(rng)``, ``make_batch(rng)``),
so the plan-quality benchmark treats zoo models and these alike.

Families (``NAMES``):

* ``flax-gpt``   GPT from Flax's ``nn.MultiHeadDotProductAttention`` (3-D q/k/v kernels)
* ``t5-dg``      T5-like encoder-decoder from ``nn.DenseGeneral`` and ``nn.Einsum``
* ``gshard-moe`` transformer whose every other MLP is an einsum GShard top-2 MoE
* ``wresnet-gn`` Wide-ResNet-like conv net with GroupNorm
* ``wide-mlp``   3 x (d -> 8d -> d) residual MLP (benchmark: 4096 -> 32768 -> 4096, batch 1024)
* ``hf-gpt2``, ``hf-bert``, ``hf-gptneo``, ``hf-llama``, ``hf-mistral``, ``hf-t5``, ``hf-vit``:
  Hugging Face transformers Flax models from a config, random init, no downloads
* ``flax-mha-block``, ``hf-gpt2-block``: one tiny transformer block each, for planner tests

>>> w = get("wide-mlp", "tiny")
>>> params, opt_state = w.abstract_state()
>>> sorted(params)
['block0', 'block1', 'block2']
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

SIZES = ("tiny", "bench")


# ----------------------------------------------------------------------------- the workload type


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Workload:
    """A loss over ``(params, batch)``, an initializer, an optimizer and a batch; the train step is derived.

    Attributes:
        name: e.g. ``"flax-gpt-tiny"``.
        loss: ``(params, batch) -> scalar float32``.
        init_params: ``rng -> params`` (plain nested dicts).
        batch_shapes: name -> ``jax.ShapeDtypeStruct``.
        batch_fn: ``rng -> batch`` of real arrays.
        optimizer: the optax transformation.
        train_step: ``(params, opt_state, batch) -> (params, opt_state, loss)``, built once.
    """

    name: str
    loss: Callable[[Any, dict], jax.Array] = dataclasses.field(repr=False)
    init_params: Callable[[jax.Array], Any] = dataclasses.field(repr=False)
    batch_shapes: dict[str, jax.ShapeDtypeStruct]
    batch_fn: Callable[[jax.Array], dict] = dataclasses.field(repr=False)
    optimizer: optax.GradientTransformation = dataclasses.field(repr=False)
    train_step: Callable = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        def train_step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(self.loss)(params, batch)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        object.__setattr__(self, "train_step", train_step)

    def _state(self, rng):
        params = self.init_params(rng)
        return params, self.optimizer.init(params)

    def init(self, rng: jax.Array):
        """Real ``(params, opt_state)``."""
        return jax.jit(self._state)(rng)

    def abstract_state(self):
        """``(params, opt_state)`` as ShapeDtypeStructs (``jax.eval_shape``: nothing allocated)."""
        return jax.eval_shape(self._state, jax.random.key(0))

    def abstract_batch(self) -> dict:
        return dict(self.batch_shapes)

    def make_batch(self, rng: jax.Array) -> dict:
        return self.batch_fn(rng)

    def abstract_args(self):
        """``(params, opt_state, batch)`` as ShapeDtypeStructs."""
        return (*self.abstract_state(), self.abstract_batch())

    def concrete_args(self, seed: int = 0):
        """``(params, opt_state, batch)`` as real arrays."""
        return (*self.init(jax.random.key(seed)), self.make_batch(jax.random.key(seed + 1)))


def make_optimizer(kind: str = "adamw", learning_rate: float = 1e-3, eps: float = 1e-8):
    """``"adamw"`` (weight decay 0.01) or ``"sgd"``."""
    if kind == "adamw":
        return optax.adamw(learning_rate, eps=eps, weight_decay=0.01)
    if kind == "sgd":
        return optax.sgd(learning_rate)
    raise ValueError(f"optimizer {kind!r}: expected 'adamw' or 'sgd'")


def _tokens(batch: int, length: int, vocab: int, *keys: str) -> tuple[dict, Callable]:
    shapes = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32) for k in keys}

    def draw(rng):
        rngs = jax.random.split(rng, len(keys))
        return {k: jax.random.randint(r, (batch, length), 0, vocab, jnp.int32) for k, r in zip(keys, rngs)}

    return shapes, draw


def _next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits[:, :-1] against tokens[:, 1:]."""
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _flax_workload(name, module, inputs_fn, loss_fn, batch_shapes, batch_fn, optimizer) -> Workload:
    def loss(params, batch):
        return loss_fn(module.apply({"params": params}, *inputs_fn(batch)), batch)

    def init_params(rng):
        example = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_shapes.items()}
        return module.init(rng, *inputs_fn(example))["params"]

    return Workload(name=name, loss=loss, init_params=init_params, batch_shapes=batch_shapes,
                    batch_fn=batch_fn, optimizer=optimizer)


# ----------------------------------------------------------------------------- (a) GPT from nn.MultiHeadDotProductAttention


class MHABlock(nn.Module):
    """Pre-LN transformer block built from Flax's own attention (q/k/v kernels [d, heads, head_dim])."""

    heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=nn.make_causal_mask(x[..., 0]))
        x = x + h
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.mlp_ratio * d)(h)
        h = nn.Dense(d)(nn.gelu(h))
        return x + h


class FlaxGPT(nn.Module):
    vocab: int
    length: int
    width: int
    layers: int
    heads: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        x = x + nn.Embed(self.length, self.width)(jnp.arange(tokens.shape[1]))[None]
        for _ in range(self.layers):
            x = MHABlock(self.heads)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(self.vocab, use_bias=False)(x)


def flax_gpt(size="tiny", *, optimizer=None):
    batch, length, vocab, width, n, heads = {"tiny": (8, 16, 64, 32, 2, 4),
                                             "bench": (64, 1024, 32768, 1024, 4, 16)}[size]
    shapes, draw = _tokens(batch, length, vocab, "tokens")
    return _flax_workload(f"flax-gpt-{size}",
                          FlaxGPT(vocab, length, width, n, heads), lambda b: (b["tokens"],),
                          lambda logits, b: _next_token_loss(logits, b["tokens"]), shapes, draw,
                          optimizer or make_optimizer())


class MHABlockOnly(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        return MHABlock(self.heads)(x)


def flax_mha_block(size="tiny", *, optimizer=None):
    """One `MHABlock` on float inputs; loss = mean squared output."""
    batch, length, width, heads = {"tiny": (8, 16, 32, 4), "bench": (32, 1024, 1024, 16)}[size]
    shapes = {"x": jax.ShapeDtypeStruct((batch, length, width), jnp.float32)}
    return _flax_workload(f"flax-mha-block-{size}", MHABlockOnly(heads), lambda b: (b["x"],),
                          lambda y, b: jnp.mean(y.astype(jnp.float32) ** 2), shapes,
                          lambda rng: {"x": jax.random.normal(rng, (batch, length, width))},
                          optimizer or make_optimizer())


# ----------------------------------------------------------------------------- (b) T5-like encoder-decoder


class DGAttention(nn.Module):
    """Attention from nn.DenseGeneral: q/k/v [d, heads, head_dim], out [heads, head_dim, d]."""

    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x, memory, causal: bool):
        d = x.shape[-1]
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), use_bias=False, name=name)  # noqa: E731
        q, k, v = proj("query")(x), proj("key")(memory), proj("value")(memory)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        if causal:
            n = x.shape[1]
            scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, name="out")(out)


class EinsumMLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.Einsum((d, self.hidden), "bsd,df->bsf", use_bias=False, name="wi")(x)
        return nn.Einsum((self.hidden, d), "bsf,fd->bsd", use_bias=False, name="wo")(nn.relu(h))


class T5Like(nn.Module):
    vocab: int
    width: int
    layers: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, inputs, targets):
        embed = nn.Embed(self.vocab, self.width, name="shared")
        hd = self.width // self.heads
        x = embed(inputs)
        for i in range(self.layers):
            x = x + DGAttention(self.heads, hd, name=f"enc{i}_attn")(nn.RMSNorm()(x), nn.RMSNorm()(x), False)
            x = x + EinsumMLP(self.mlp, name=f"enc{i}_mlp")(nn.RMSNorm()(x))
        memory = nn.RMSNorm(name="enc_norm")(x)
        y = embed(targets)
        for i in range(self.layers):
            h = nn.RMSNorm()(y)
            y = y + DGAttention(self.heads, hd, name=f"dec{i}_self")(h, h, True)
            y = y + DGAttention(self.heads, hd, name=f"dec{i}_cross")(nn.RMSNorm()(y), memory, False)
            y = y + EinsumMLP(self.mlp, name=f"dec{i}_mlp")(nn.RMSNorm()(y))
        y = nn.RMSNorm(name="dec_norm")(y)
        return nn.DenseGeneral(self.vocab, use_bias=False, name="lm_head")(y)


def t5_dg(size="tiny", *, optimizer=None):
    batch, length, vocab, width, n, heads, mlp = {"tiny": (8, 16, 64, 32, 1, 4, 64),
                                                  "bench": (32, 512, 32128, 1024, 2, 16, 4096)}[size]
    shapes, draw = _tokens(batch, length, vocab, "inputs", "targets")
    return _flax_workload(f"t5-dg-{size}", T5Like(vocab, width, n, heads, mlp),
                          lambda b: (b["inputs"], b["targets"]),
                          lambda logits, b: _next_token_loss(logits, b["targets"]), shapes, draw,
                          optimizer or make_optimizer())


# ----------------------------------------------------------------------------- (c) GShard MoE with einsum dispatch


class EinsumMoE(nn.Module):
    """Top-2 gating; tokens reach experts by einsum with a [group, token, expert, capacity] dispatch mask."""

    experts: int
    hidden: int
    capacity_factor: float = 2.0

    @nn.compact
    def __call__(self, x):
        groups, tokens, d = x.shape
        capacity = max(1, math.ceil(2 * tokens * self.capacity_factor / self.experts))
        gate = self.param("gate", nn.initializers.lecun_normal(), (d, self.experts))
        wi = self.param("wi", nn.initializers.lecun_normal(batch_axis=(0,)), (self.experts, d, self.hidden))
        wo = self.param("wo", nn.initializers.lecun_normal(batch_axis=(0,)), (self.experts, self.hidden, d))
        probs = jax.nn.softmax(jnp.einsum("gsd,de->gse", x, gate), axis=-1)
        top1 = jax.nn.one_hot(jnp.argmax(probs, -1), self.experts)
        top2 = jax.nn.one_hot(jnp.argmax(probs * (1 - top1), -1), self.experts)
        pos1 = (jnp.cumsum(top1, axis=1) - 1) * top1
        top1 = top1 * (pos1 < capacity)
        pos2 = (jnp.cumsum(top2, axis=1) - 1 + top1.sum(axis=1, keepdims=True)) * top2
        top2 = top2 * (pos2 < capacity)
        slot = lambda mask, pos: mask[..., None] * jax.nn.one_hot(pos.astype(jnp.int32), capacity)  # noqa: E731
        dispatch = slot(top1, pos1) + slot(top2, pos2)  # [g, s, e, c]
        combine = (probs * top1)[..., None] * slot(top1, pos1) + (probs * top2)[..., None] * slot(top2, pos2)
        expert_in = jnp.einsum("gsec,gsd->egcd", dispatch, x)
        h = nn.relu(jnp.einsum("egcd,edf->egcf", expert_in, wi))
        out = jnp.einsum("egcf,efd->egcd", h, wo)
        aux = (top1.mean(axis=1) * probs.mean(axis=1)).mean() * self.experts**2
        self.sow("intermediates", "aux", aux)
        return jnp.einsum("egcd,gsec->gsd", out, combine)


class MoEBlock(nn.Module):
    heads: int
    experts: int
    dense: bool

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=nn.make_causal_mask(x[..., 0]))
        h = nn.LayerNorm()(x)
        if self.dense:
            return x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(h)))
        return x + EinsumMoE(self.experts, 4 * d)(h)


class GShardMoE(nn.Module):
    vocab: int
    width: int
    layers: int
    heads: int
    experts: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        for i in range(self.layers):
            x = MoEBlock(self.heads, self.experts, dense=i % 2 == 0)(x)
        return nn.Dense(self.vocab, use_bias=False)(nn.LayerNorm()(x))


def gshard_moe(size="tiny", *, optimizer=None):
    batch, length, vocab, width, n, heads, experts = {"tiny": (8, 16, 64, 32, 2, 4, 8),
                                                      "bench": (32, 512, 32768, 1024, 4, 16, 8)}[size]
    shapes, draw = _tokens(batch, length, vocab, "tokens")
    return _flax_workload(f"gshard-moe-{size}", GShardMoE(vocab, width, n, heads, experts),
                          lambda b: (b["tokens"],), lambda logits, b: _next_token_loss(logits, b["tokens"]),
                          shapes, draw, optimizer or make_optimizer())


# ----------------------------------------------------------------------------- (d) conv net with GroupNorm


class ResBlock(nn.Module):
    width: int
    stride: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.GroupNorm(num_groups=8)(x))
        shortcut = x if x.shape[-1] == self.width and self.stride == 1 else nn.Conv(
            self.width, (1, 1), self.stride, use_bias=False)(h)
        h = nn.Conv(self.width, (3, 3), self.stride, use_bias=False)(h)
        h = nn.Conv(self.width, (3, 3), use_bias=False)(nn.relu(nn.GroupNorm(num_groups=8)(h)))
        return shortcut + h


class WideResNetGN(nn.Module):
    widths: tuple[int, ...]
    blocks: int
    classes: int

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(images)
        for s, width in enumerate(self.widths):
            for b in range(self.blocks):
                x = ResBlock(width, 2 if s > 0 and b == 0 else 1)(x)
        x = nn.relu(nn.GroupNorm(num_groups=8)(x)).mean(axis=(1, 2))
        return nn.Dense(self.classes)(x)


def _classification(batch, image, channels, classes, layout="NHWC"):
    shape = (batch, image, image, channels) if layout == "NHWC" else (batch, channels, image, image)
    shapes = {"images": jax.ShapeDtypeStruct(shape, jnp.float32),
              "labels": jax.ShapeDtypeStruct((batch,), jnp.int32)}

    def draw(rng):
        a, b = jax.random.split(rng)
        return {"images": jax.random.normal(a, shape), "labels": jax.random.randint(b, (batch,), 0, classes)}

    return shapes, draw


def _class_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def wresnet_gn(size="tiny", *, optimizer=None):
    batch, image, widths, blocks, classes = {"tiny": (8, 8, (16, 32), 1, 10),
                                             "bench": (128, 32, (256, 512, 1024), 2, 100)}[size]
    shapes, draw = _classification(batch, image, 3, classes)
    return _flax_workload(f"wresnet-gn-{size}", WideResNetGN(widths, blocks, classes), lambda b: (b["images"],),
                          lambda logits, b: _class_loss(logits, b["labels"]), shapes, draw,
                          optimizer or make_optimizer())


# ----------------------------------------------------------------------------- (e) wide MLP


class WideMLP(nn.Module):
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        for i in range(self.layers):
            x = x + nn.Dense(d, name="wo")(nn.relu(nn.Dense(self.hidden, name="wi")(x)))
        return x


class _Blocks(nn.Module):
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = WideMLP(self.hidden, 1, name=f"block{i}")(x)
        return x


def wide_mlp(size="tiny", *, optimizer=None):
    batch, d, hidden = {"tiny": (16, 16, 64), "bench": (1024, 4096, 32768)}[size]
    shapes = {"x": jax.ShapeDtypeStruct((batch, d), jnp.float32), "y": jax.ShapeDtypeStruct((batch, d), jnp.float32)}

    def draw(rng):
        a, b = jax.random.split(rng)
        return {"x": jax.random.normal(a, (batch, d)), "y": jax.random.normal(b, (batch, d))}

    return _flax_workload(f"wide-mlp-{size}", _Blocks(hidden, 3), lambda b: (b["x"],),
                          lambda y, b: jnp.mean((y - b["y"]) ** 2), shapes, draw, optimizer or make_optimizer())


# ----------------------------------------------------------------------------- (f) Hugging Face transformers Flax models


@functools.cache
def _transformers():
    """Imports transformers (a benchmark extra) with a shim for `jnp.clip(a_max=)`, which jax 0.10 dropped."""
    import transformers

    if "a_max" not in _clip_parameters():
        original = jnp.clip

        @functools.wraps(original)
        def clip(x, a_min=None, a_max=None, *, min=None, max=None, **kwargs):  # noqa: A002
            return original(x, min if min is not None else a_min, max if max is not None else a_max, **kwargs)

        jnp.clip = clip
    return transformers


def _clip_parameters():
    import inspect

    return inspect.signature(jnp.clip).parameters


def _hf_workload(name, model, input_shape, inputs_fn, loss_fn, batch_shapes, batch_fn, optimizer) -> Workload:
    """A transformers Flax model as a pure loss; params are the plain nested dicts transformers builds."""

    def loss(params, batch):
        return loss_fn(model(**inputs_fn(batch), params=params, train=False), batch)

    def init_params(rng):
        return jax.tree.map(lambda x: x, dict(model.init_weights(rng, input_shape)))

    return Workload(name=name, loss=loss, init_params=init_params, batch_shapes=batch_shapes, batch_fn=batch_fn,
                    optimizer=optimizer)


_HF_SIZES = {  # size -> (batch, length, vocab, width, layers, heads)
    "tiny": (8, 16, 64, 32, 2, 4),
    "bench": (32, 1024, 32768, 1024, 4, 16),
}


def _hf_causal_lm(kind: str, size: str, optimizer, layers=None):
    tf = _transformers()
    batch, length, vocab, width, n, heads = _HF_SIZES[size]
    n = layers or n
    common = dict(vocab_size=vocab)
    if kind == "gpt2":
        config = tf.GPT2Config(n_layer=n, n_embd=width, n_head=heads, n_positions=length, **common)
        cls = tf.FlaxGPT2LMHeadModel
    elif kind == "gptneo":
        config = tf.GPTNeoConfig(num_layers=n, hidden_size=width, num_heads=heads, max_position_embeddings=length,
                                 attention_types=[[["global", "local"], max(1, n // 2)]] if n > 1 else
                                 [[["global"], 1]], window_size=length // 2, intermediate_size=4 * width, **common)
        cls = tf.FlaxGPTNeoForCausalLM
    elif kind in ("llama", "mistral"):
        cfg_cls = tf.LlamaConfig if kind == "llama" else tf.MistralConfig
        config = cfg_cls(num_hidden_layers=n, hidden_size=width, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), intermediate_size=(8 * width) // 3 // 8 * 8,
                         max_position_embeddings=length, **common)
        cls = tf.FlaxLlamaForCausalLM if kind == "llama" else tf.FlaxMistralForCausalLM
    else:
        raise ValueError(kind)
    model = cls(config, input_shape=(batch, length), seed=0, _do_init=False)
    shapes, draw = _tokens(batch, length, vocab, "tokens")
    label = f"hf-{kind}{'-block' if layers == 1 else ''}-{size}"
    return _hf_workload(label, model, (batch, length), lambda b: {"input_ids": b["tokens"]},
                        lambda out, b: _next_token_loss(out.logits, b["tokens"]), shapes, draw,
                        optimizer or make_optimizer())


def hf_bert(size="tiny", *, optimizer=None):
    tf = _transformers()
    batch, length, vocab, width, n, heads = _HF_SIZES[size]
    config = tf.BertConfig(num_hidden_layers=n, hidden_size=width, num_attention_heads=heads,
                           intermediate_size=4 * width, vocab_size=vocab, max_position_embeddings=length)
    model = tf.FlaxBertForMaskedLM(config, input_shape=(batch, length), seed=0, _do_init=False)
    shapes, draw = _tokens(batch, length, vocab, "tokens", "labels")
    return _hf_workload(f"hf-bert-{size}", model, (batch, length), lambda b: {"input_ids": b["tokens"]},
                        lambda out, b: optax.softmax_cross_entropy_with_integer_labels(
                            out.logits.astype(jnp.float32), b["labels"]).mean(),
                        shapes, draw, optimizer or make_optimizer())


def hf_t5(size="tiny", *, optimizer=None):
    tf = _transformers()
    batch, length, vocab, width, n, heads = _HF_SIZES[size]
    length = min(length, 512)
    config = tf.T5Config(num_layers=n, num_decoder_layers=n, d_model=width, d_kv=width // heads, num_heads=heads,
                         d_ff=4 * width, vocab_size=vocab)
    model = tf.FlaxT5ForConditionalGeneration(config, input_shape=(batch, length), seed=0, _do_init=False)
    shapes, draw = _tokens(batch, length, vocab, "inputs", "targets")
    return _hf_workload(f"hf-t5-{size}", model, (batch, length),
                        lambda b: {"input_ids": b["inputs"], "decoder_input_ids": b["targets"]},
                        lambda out, b: _next_token_loss(out.logits, b["targets"]), shapes, draw,
                        optimizer or make_optimizer())


def hf_vit(size="tiny", *, optimizer=None):
    tf = _transformers()
    batch, image, patch, width, n, heads, classes = {"tiny": (8, 16, 4, 32, 2, 4, 10),
                                                     "bench": (128, 224, 16, 768, 4, 12, 1000)}[size]
    config = tf.ViTConfig(num_hidden_layers=n, hidden_size=width, num_attention_heads=heads,
                          intermediate_size=4 * width, image_size=image, patch_size=patch, num_labels=classes)
    model = tf.FlaxViTForImageClassification(config, input_shape=(batch, image, image, 3), seed=0, _do_init=False)
    shapes, draw = _classification(batch, image, 3, classes, layout="NCHW")
    return _hf_workload(f"hf-vit-{size}", model, (batch, image, image, 3), lambda b: {"pixel_values": b["images"]},
                        lambda out, b: _class_loss(out.logits, b["labels"]), shapes, draw,
                        optimizer or make_optimizer())


# ----------------------------------------------------------------------------- registry

BUILDERS: dict[str, Callable[..., Workload]] = {
    "flax-gpt": flax_gpt,
    "t5-dg": t5_dg,
    "gshard-moe": gshard_moe,
    "wresnet-gn": wresnet_gn,
    "wide-mlp": wide_mlp,
    "hf-gpt2": lambda size="tiny", **kw: _hf_causal_lm("gpt2", size, kw.get("optimizer")),
    "hf-bert": hf_bert,
    "hf-gptneo": lambda size="tiny", **kw: _hf_causal_lm("gptneo", size, kw.get("optimizer")),
    "hf-llama": lambda size="tiny", **kw: _hf_causal_lm("llama", size, kw.get("optimizer")),
    "hf-mistral": lambda size="tiny", **kw: _hf_causal_lm("mistral", size, kw.get("optimizer")),
    "hf-t5": hf_t5,
    "hf-vit": hf_vit,
    # tiny single blocks for planner tests
    "flax-mha-block": flax_mha_block,
    "hf-gpt2-block": lambda size="tiny", **kw: _hf_causal_lm("gpt2", size, kw.get("optimizer"), layers=1),
}
NAMES = tuple(BUILDERS)
SUITE = tuple(n for n in NAMES if not n.endswith("-block"))  # the benchmark's wider suite
BLOCKS = ("flax-mha-block", "hf-gpt2-block")


@functools.cache
def _cached(name: str, size: str, optimizer: str, eps: float) -> Workload:
    return BUILDERS[name](size, optimizer=make_optimizer(optimizer, eps=eps))


def get(name: str, size: str = "tiny", *, optimizer: str = "adamw", eps: float = 1e-8) -> Workload:
    """The workload ``name`` (see `NAMES`) at ``size`` ``"tiny"`` or ``"bench"``; cached, so the same
    arguments give the same `Workload` and ``train_step`` object.  ``name`` may also carry the size as a
    suffix: ``get("hf-gpt2-bench")``."""
    for s in SIZES:
        if name.endswith("-" + s) and name[: -len(s) - 1] in BUILDERS:
            name, size = name[: -len(s) - 1], s
    if name not in BUILDERS:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(NAMES)} (optionally suffixed -tiny/-bench)")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {SIZES}")
    return _cached(name, size, optimizer, float(eps))


def is_workload(name: str) -> bool:
    """Whether ``get`` accepts ``name`` (with or without a size suffix)."""
    base = next((name[: -len(s) - 1] for s in SIZES if name.endswith("-" + s)), name)
    return base in BUILDERS
