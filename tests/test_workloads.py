"""benchmarks/workloads.py: every tiny workload traces and trains one step on one device."""

import doctest
import math
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import workloads  # noqa: E402

pytest.importorskip("transformers")


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


# Compiling a step costs seconds on a 2-core box: the Hugging Face models whose step another test already
# runs through the same code path (`_hf_causal_lm`: hf-gpt2-block; hf-mistral's loss, the Llama family)
# are traced, not run.
TRACE_ONLY = ("hf-gpt2", "hf-gptneo", "hf-llama", "hf-bert")


@pytest.mark.parametrize("name", [n for n in workloads.NAMES if n in TRACE_ONLY])
def test_tiny_workload_traces(name):
    w = workloads.get(name, "tiny")
    args = w.abstract_args()
    new_params, new_opt_state, loss = jax.eval_shape(w.train_step, *args)
    assert _shapes((new_params, new_opt_state)) == _shapes(args[:2])
    assert loss.shape == () and loss.dtype == np.float32


@pytest.mark.parametrize("name", [n for n in workloads.NAMES if n not in TRACE_ONLY])
def test_tiny_workload_trains_one_step(name):
    w = workloads.get(name, "tiny", optimizer="sgd")
    abstract = w.abstract_args()
    params, opt_state, batch = w.concrete_args()
    assert _shapes((params, opt_state, batch)) == _shapes(abstract)
    # Plain dicts all the way down (no FrozenDict): the hand strategies and autoplan match leaves by path.
    assert all(type(node) is dict for node in _dict_nodes(params)), name
    new_params, _, loss = jax.jit(w.train_step)(params, opt_state, batch)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert _shapes(new_params) == _shapes(params)
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params))]
    assert max(moved) > 0  # SGD moved the parameters


def _dict_nodes(tree):
    if isinstance(tree, dict) or type(tree).__name__ == "FrozenDict":
        yield tree
        for value in tree.values():
            yield from _dict_nodes(value)


def test_language_model_starts_near_uniform():
    """A randomly initialized Hugging Face LM predicts close to uniform: loss ~ ln(vocab) (a published fact of init)."""
    for name in ("hf-mistral",):
        w = workloads.get(name, "tiny")
        params, _, batch = w.concrete_args()
        loss = float(jax.jit(w.loss)(params, batch))
        assert abs(loss - math.log(64)) < 0.1, (name, loss)


def test_benchmark_sizes_are_abstract_and_large():
    w = workloads.get("wide-mlp-bench")
    params, opt_state = w.abstract_state()
    assert params["block0"]["wi"]["kernel"].shape == (4096, 32768)
    assert w.abstract_batch()["x"].shape == (1024, 4096)
    assert workloads.get("wide-mlp", "bench") is w  # cached: same train_step object for plan caches
    gpt2 = workloads.get("hf-gpt2-bench")
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(gpt2.abstract_state()[0]))
    assert n > 80e6


def test_unknown_names_say_what_is_valid():
    with pytest.raises(ValueError, match="valid: flax-gpt"):
        workloads.get("gpt-5")
    with pytest.raises(ValueError, match="size 'huge'"):
        workloads.get("wide-mlp", "huge")
    assert workloads.is_workload("hf-t5-bench") and not workloads.is_workload("gpt-small")


def test_docstring_examples():
    assert doctest.testmod(workloads).failed == 0
