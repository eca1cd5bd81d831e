"""Hugging Face transformers Flax models (code we did not write) planned and trained under `@autoparallel`.

Random-init tiny configs from `benchmarks/workloads.py` (BERT, T5, GPT-Neo, Mistral, ViT), SGD so that
float noise is not amplified.  Each plans on a 2x4 mesh with no fallback warning, gives the layers that
transformers numbers 0, 1, ... the same specs, and trains 3 steps to single-device `jax.jit`'s numbers.
Planned for the "cpu" preset: at this size an A100 plan is fully replicated, while on slow devices the
batch splits over all eight and the gradients are reduced.  The same models at benchmark size (d=1024,
abstract arguments) are planned where their weights split, to check equal layers there.
"""

import dataclasses
import os
import re
import sys
import warnings

import jax
import numpy as np
import pytest

import autoplan

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import workloads  # noqa: E402

pytest.importorskip("transformers")

MODELS = ("hf-bert", "hf-t5", "hf-gptneo", "hf-mistral", "hf-vit")
_LAYER = re.compile(r"(?<=[/'\[])(\d+)(?=[/'\]])")  # a layer index in a keystr path: ['0'] or /0/


def _layer_groups(tree) -> dict[str, list[tuple[str, object]]]:
    """Leaves grouped by path with layer numbers masked: layer i's `kernel` joins every other layer's."""
    groups: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.P))[0]:
        key = jax.tree_util.keystr(path)
        groups.setdefault(_LAYER.sub("*", key), []).append((key, leaf))
    return {k: v for k, v in groups.items() if len(v) > 1}


_LAYER_PREFIX = re.compile(r"^.*?\['\d+'\]")  # a keystr path up to its first layer index


def _layer_structures(params) -> dict[str, tuple]:
    """Per layer (path prefix up to its index): its parameters' relative paths and shapes.

    Layers whose parameters differ are not the same layer: Hugging Face T5's block 0 alone holds
    the relative position bias.
    """
    found: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = jax.tree_util.keystr(path)
        prefix = _LAYER_PREFIX.match(key)
        if prefix:
            found.setdefault(prefix.group(0), []).append((key[prefix.end():], tuple(leaf.shape)))
    return {prefix: tuple(sorted(leaves)) for prefix, leaves in found.items()}


@pytest.mark.parametrize("name", MODELS)
def test_hugging_face_model_plans_alike_per_layer_and_trains_like_jit(name):
    w = workloads.get(name, "tiny", optimizer="sgd")
    params, opt_state, batch = w.concrete_args()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    step = autoplan.autoparallel(w.train_step, mesh=mesh, cluster="cpu", donate=False)
    reference = jax.jit(w.train_step)
    want = got = (params, opt_state)
    with warnings.catch_warnings():
        # No operator planned replicated for want of a rule (a time-limited ILP on a busy CI box is allowed).
        warnings.simplefilter("error", autoplan.UnsupportedPrimitiveWarning)
        for _ in range(3):
            *want, want_loss = reference(*want, batch)
            *got, got_loss = step(*got, batch)
            np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=2e-6)
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    batch_specs = jax.tree.leaves(step.plan.input_shardings[2], is_leaf=lambda x: isinstance(x, jax.P))
    assert all(spec[0] is not None for spec in batch_specs), batch_specs  # the plan splits the batch
    param_specs = step.plan.input_shardings[0]
    groups = _layer_groups(param_specs)
    assert len(groups) >= 4, f"{name}: expected numbered layers in {jax.tree_util.tree_structure(param_specs)}"
    for key, members in groups.items():
        specs = {str(spec) for _, spec in members}
        assert len(specs) == 1, f"{name}: {key} planned differently per layer: {members}"


# (model, inter-node slowdown): where the plan splits weights.  BERT's is data parallel at the
# preset's inter-node bandwidth, and ViT's at any: its weights stay whole, nothing to compare.
BENCH_SPLITS = (("hf-bert", 4), ("hf-t5", 1), ("hf-gptneo", 1), ("hf-mistral", 1))


@pytest.mark.parametrize("name,slowdown", BENCH_SPLITS)
def test_hugging_face_model_at_benchmark_size_splits_its_layers_alike(name, slowdown):
    """At d=1024 on a 4x2 mesh of 4-GPU nodes the plans split weights, so equal specs per layer mean something.

    Layers are compared with the layers whose parameters match (T5's block 0 alone holds the relative
    position bias).  (On 2x4 GPT-Neo's alternating global and local attention layers, which share
    their parameters' shapes but not their masks, get layouts of their own.)
    """
    w = workloads.get(name, "bench", optimizer="sgd")
    preset = autoplan.clusters["a100-8x"]
    cluster = dataclasses.replace(preset, name="a100-4x", devices_per_node=4,
                                  inter_node_bandwidth=preset.inter_node_bandwidth / slowdown)
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoplan.UnsupportedPrimitiveWarning)
        plan = autoplan.plan(w.train_step, *w.abstract_args(), mesh=mesh, cluster=cluster)
    param_specs = plan.input_shardings[0]
    specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, jax.P))
    split = [spec for spec in specs if any(axes is not None for axes in spec)]
    assert len(split) >= len(specs) // 4, f"{name}: {len(split)} of {len(specs)} weights split"
    groups = _layer_groups(param_specs)
    assert len(groups) >= 4
    structure = _layer_structures(w.abstract_args()[0])
    for key, members in groups.items():
        alike: dict[tuple, set] = {}
        for path, spec in members:
            alike.setdefault(structure[_LAYER_PREFIX.match(path).group(0)], set()).add(str(spec))
        for specs in alike.values():
            assert len(specs) == 1, f"{name}: {key} planned differently in equal layers: {members}"
