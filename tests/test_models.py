"""Tests of the model zoo (`autoplan.models`)."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from autoplan import models
from autoplan.models import gpt, moe

TINY = ("gpt-tiny", "moe-tiny", "wresnet-tiny", "mlp-tiny")


@functools.cache
def _initial_state(name):
    """Real ``(params, opt_state)`` of a model, initialized once per session."""
    return models.get(name).init(jax.random.key(0))


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def _num_params(params):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _all_eqns(jaxpr):
    """Yields the equations of ``jaxpr`` and of every jaxpr nested in them."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from _all_eqns(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from _all_eqns(sub)


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loss_decreases(name):
    spec = models.get(name)
    params, opt_state = _initial_state(name)
    batch = spec.make_batch(jax.random.key(1))
    step = jax.jit(spec.train_step)
    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    if name in ("gpt-tiny", "moe-tiny"):
        # The first loss is at initialization: small weights give nearly
        # uniform predictions (the MoE adds aux_loss_weight * ~1).
        assert abs(losses[0] - math.log(spec.config.vocab_size)) < 0.1


@pytest.mark.parametrize("name", TINY)
def test_abstract_state_matches_init(name):
    spec = models.get(name)
    assert _shapes(spec.abstract_state()) == _shapes(_initial_state(name))
    batch = spec.make_batch(jax.random.key(1))
    assert _shapes(spec.abstract_batch()) == _shapes(batch)
    assert spec.abstract_batch() == spec.batch_shapes


# gpt2-24 and gpt2-48 differ from gpt2-12 only in size and take seconds to
# trace; their abstract state is checked in test_gpt2_48_abstract_state_is_quick.
@pytest.mark.parametrize(
    "name", [n for n in models.names() if n not in ("gpt2-24", "gpt2-48")])
def test_every_model_traces_at_abstract_shapes(name):
    spec = models.get(name)
    params, opt_state = spec.abstract_state()
    new_params, new_opt_state, loss = jax.eval_shape(
        spec.train_step, params, opt_state, spec.abstract_batch())
    assert _shapes(new_params) == _shapes(params)
    assert _shapes(new_opt_state) == _shapes(opt_state)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert "block0" in params and "block1" in params


def test_train_step_is_a_stable_object():
    spec = models.get("gpt-tiny")
    assert spec.train_step is spec.train_step
    assert models.get("gpt-tiny") is spec
    assert models.get("gpt-tiny").train_step is spec.train_step
    assert models.get("gpt-tiny", batch=16) is not spec
    hash(spec.train_step)


def test_names_and_unknown_name():
    expected = {"gpt-tiny", "gpt-small", "gpt2-12", "gpt2-24", "gpt2-48",
                "moe-tiny", "moe-small", "wresnet-tiny", "wresnet-small",
                "mlp-tiny", "mlp-small"}
    assert set(models.names()) == expected
    with pytest.raises(ValueError, match="gpt-tiny") as info:
        models.get("gpt-huge")
    for name in expected:
        assert name in str(info.value)


def test_overrides():
    spec = models.get("gpt-tiny", batch=32, layers=3)
    assert spec.config.batch == 32 and spec.config.layers == 3
    assert spec.batch_shapes["tokens"].shape == (32, 17)
    params, _ = spec.abstract_state()
    assert sorted(k for k in params if k.startswith("block")) == [
        "block0", "block1", "block2"]
    with pytest.raises(ValueError, match="layers"):
        models.get("gpt-tiny", num_blocks=3)


def test_bfloat16_compute_keeps_float32_params():
    spec = models.get("gpt-tiny", dtype=jnp.bfloat16)
    params, opt_state = spec.abstract_state()
    new_params, _, loss = jax.eval_shape(spec.train_step, params, opt_state,
                                         spec.abstract_batch())
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(new_params)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert loss.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(spec.loss)(params, spec.abstract_batch())
    dot_types = {eqn.outvars[0].aval.dtype for eqn in _all_eqns(jaxpr.jaxpr)
                 if eqn.primitive.name == "dot_general"}
    assert jnp.dtype(jnp.bfloat16) in dot_types


def test_gpt_name_stack_has_blocks_forward_and_backward():
    spec = models.get("gpt-tiny")
    params, opt_state = spec.abstract_state()
    jaxpr = jax.make_jaxpr(spec.train_step)(params, opt_state,
                                            spec.abstract_batch())
    stacks = [str(eqn.source_info.name_stack) for eqn in _all_eqns(jaxpr.jaxpr)]
    for block in ("block0", "block1"):
        assert any(f"/{block}/" in s and "transpose" not in s for s in stacks)
        assert any(f"/{block}/" in s and "transpose" in s for s in stacks)
    assert any("block0/mlp_in" in s for s in stacks)
    assert any("block1/attn/qkv" in s for s in stacks)


def test_gpt_parameter_layout():
    cfg = models.get("gpt-tiny").config
    params, _ = models.get("gpt-tiny").abstract_state()
    d, v = cfg.hidden, cfg.vocab_size
    block = _shapes(params["block1"])
    assert block["attn"]["qkv"]["kernel"][0] == (d, 3 * d)
    assert block["attn"]["proj"]["kernel"][0] == (d, d)
    assert block["mlp_in"]["kernel"][0] == (d, 4 * d)
    assert block["mlp_out"]["kernel"][0] == (4 * d, d)
    assert set(block) == {"ln1", "attn", "ln2", "mlp_in", "mlp_out"}
    assert params["wte"]["embedding"].shape == (v, d)
    assert params["wpe"]["embedding"].shape == (cfg.seq_len, d)
    assert set(params["head"]) == {"kernel"}
    assert params["head"]["kernel"].shape == (d, v)


def test_gpt2_12_parameter_count():
    # GPT-2 small has 124M parameters with a head tied to the embedding and a
    # 50257-token vocabulary. Here the vocabulary is padded to 50304 and the
    # head is untied (a separate hidden x vocab matrix), which gives about
    # 163M. The count must match the formula exactly:
    #   embeddings  vocab * d + seq_len * d
    #   per block   12 d^2 + 13 d   (qkv 3d^2+3d, proj d^2+d, MLP 8d^2+5d,
    #                                two LayerNorms 4d)
    #   final LN    2d;  head  d * vocab
    spec = models.get("gpt2-12")
    cfg = spec.config
    d, v, t = cfg.hidden, cfg.vocab_size, cfg.seq_len
    expected = v * d + t * d + cfg.layers * (12 * d * d + 13 * d) + 2 * d + d * v
    params, _ = spec.abstract_state()
    assert _num_params(params) == expected == 163_109_376
    tied_unpadded = expected - d * v - (v - 50257) * d
    assert abs(tied_unpadded - 124e6) / 124e6 < 0.05


def test_gpt2_48_abstract_state_is_quick():
    spec = models.get("gpt2-48")
    start = time.perf_counter()
    params, opt_state = spec.abstract_state()
    elapsed = time.perf_counter() - start
    assert elapsed < 20, elapsed
    assert isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    assert 1.5e9 < _num_params(params) < 1.7e9
    assert "block47" in params and "block48" not in params
    # AdamW keeps two moments per parameter, plus a scalar step count.
    assert _num_params(opt_state) == 2 * _num_params(params) + 1


def test_moe_parameter_layout():
    spec = models.get("moe-tiny")
    cfg = spec.config
    params, _ = spec.abstract_state()
    d, f, e = cfg.hidden, cfg.mlp_ratio * cfg.hidden, cfg.experts
    assert "mlp_in" in params["block0"] and "moe" not in params["block0"]
    experts = _shapes(params["block1"]["moe"])
    assert experts["expert_in"][0] == (e, d, f)
    assert experts["expert_out"][0] == (e, f, d)
    assert experts["router"]["kernel"][0] == (d, e)


def test_top2_routing_respects_capacity():
    groups, tokens, experts, capacity = 2, 16, 4, 5
    logits = jax.random.normal(jax.random.key(0), (groups, tokens, experts))
    probs = jax.nn.softmax(logits)
    route = jax.jit(moe.top2_routing, static_argnums=1)
    dispatch, combine, aux_loss = route(probs, capacity)
    assert dispatch.shape == (groups, tokens, experts, capacity)
    dispatch, combine = np.asarray(dispatch), np.asarray(combine)
    # Each buffer slot holds at most one token; each token goes to <= 2 slots.
    assert dispatch.sum(axis=1).max() <= 1
    assert dispatch.sum(axis=(2, 3)).max() <= 2
    # Combine weights live on dispatched slots and sum to 1 for routed tokens.
    assert np.all((combine > 0) <= (dispatch > 0))
    weights = combine.sum(axis=(2, 3))
    routed = dispatch.sum(axis=(2, 3)) > 0
    np.testing.assert_allclose(weights[routed], 1.0, rtol=1e-5)
    assert float(aux_loss) > 0


def test_capacity_formula():
    cfg = moe.CONFIGS["moe-small"]
    assert cfg.expert_capacity() == math.ceil(
        2 * cfg.seq_len * cfg.capacity_factor / cfg.experts)


def test_tiny_dimensions_split_over_eight_devices():
    for name in TINY:
        cfg = models.get(name).config
        assert cfg.batch % 8 == 0
    cfg = gpt.CONFIGS["gpt-tiny"]
    for size in (cfg.seq_len, cfg.vocab_size, cfg.hidden, 4 * cfg.hidden):
        assert size % 8 == 0
