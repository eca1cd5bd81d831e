"""Plans from the zoo: baselines never beat the planner, plans are readable, stable and serializable."""

import json
import os

import jax
import pytest

import autoplan

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
MESH = jax.sharding.AbstractMesh((2, 4), ("data", "model"))


@pytest.fixture(scope="module")
def gpt():
    spec = autoplan.models.get("gpt-tiny")
    args = (*spec.abstract_state(), spec.abstract_batch())
    return spec, args, autoplan.plan(spec.train_step, *args, mesh=MESH, cluster="a100-8x")


@pytest.mark.parametrize("model,mesh", [("gpt-tiny", MESH), ("mlp-tiny", jax.sharding.AbstractMesh((8,), ("data",))),
                                        ("moe-tiny", MESH)])
def test_baselines_never_beat_the_plan(model, mesh):
    spec = autoplan.models.get(model)
    args = (*spec.abstract_state(), spec.abstract_batch())
    plan = autoplan.plan(spec.train_step, *args, mesh=mesh, cluster="a100-8x")
    for name in autoplan.baselines.ALL:
        if name == "megatron_dp" and len(mesh.axis_names) < 2:
            continue
        baseline = getattr(autoplan.baselines, name)(spec.train_step, *args, mesh=mesh, cluster="a100-8x")
        assert baseline.name == name
        assert plan.cost.step_seconds <= baseline.cost.step_seconds * (1 + 1e-9), (name, baseline, plan)


def test_baselines_lay_out_what_their_papers_say(gpt):
    spec, args, _ = gpt
    dp = autoplan.baselines.data_parallel(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    params, opt_state, batch = dp.input_shardings
    assert all(s == jax.P() for s in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, jax.P)))
    assert batch["tokens"] == jax.P(("data", "model"))
    mt = autoplan.baselines.megatron(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    p = mt.input_shardings[0]
    assert p["block0"]["attn"]["qkv"]["kernel"] == jax.P(None, "model")
    assert p["block0"]["attn"]["proj"]["kernel"] == jax.P("model")
    assert p["block0"]["mlp_in"]["kernel"] == jax.P(None, "model")
    assert p["block0"]["mlp_out"]["kernel"] == jax.P("model")
    assert p["wte"]["embedding"] == jax.P("model")
    fsdp = autoplan.baselines.fsdp(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    z1 = autoplan.baselines.zero1(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    # ZeRO's ordering of model-state memory (parameters and optimizer state per device, the paper's
    # figure 1): FSDP < ZeRO-1 < data parallel.  (Peak memory adds activations, whose layouts the ILP
    # picks for speed within the budget, not for size.)
    def state_bytes(plan):
        return sum(leaf.device_bytes(plan.mesh) for leaf in plan.inputs if leaf.path.startswith(("params", "opt_state")))

    assert state_bytes(fsdp) < state_bytes(z1) < state_bytes(dp)
    assert fsdp.input_shardings[0]["block0"]["mlp_in"]["kernel"] != jax.P()
    assert z1.input_shardings[0]["block0"]["mlp_in"]["kernel"] == jax.P()
    assert z1.input_shardings[1][0].mu["block0"]["mlp_in"]["kernel"] != jax.P()


def test_summary_is_readable(gpt):
    _, _, plan = gpt
    text = plan.summary()
    for needle in ("mesh data=2 x model=4", "peak memory", "params/block{0..1}/mlp_in/kernel", "Collectives",
                   "step"):
        assert needle in text, needle
    assert "mlp_in/kernel" in plan.explain("params/block1/mlp_in/kernel")
    assert plan._repr_html_().startswith("<pre>")
    with pytest.raises(KeyError, match="no input or output leaf"):
        plan.explain("params/nope")


def test_plan_has_specs_for_every_leaf_and_anchor(gpt):
    spec, args, plan = gpt
    leaves = jax.tree_util.tree_leaves(args)
    specs = jax.tree_util.tree_leaves(plan.input_shardings, is_leaf=lambda x: isinstance(x, jax.P))
    assert len(specs) == len(leaves)
    for leaf, s in zip(leaves, specs):
        assert len(s) <= len(leaf.shape)
        for dim, axes in enumerate(s):
            if axes is not None:
                n = MESH.axis_sizes[MESH.axis_names.index(axes)] if isinstance(axes, str) else \
                    MESH.axis_sizes[0] * MESH.axis_sizes[1]
                assert leaf.shape[dim] % n == 0
    out = jax.tree_util.tree_leaves(plan.output_shardings, is_leaf=lambda x: isinstance(x, jax.P))
    assert len(out) == len(jax.tree_util.tree_leaves(jax.eval_shape(spec.train_step, *args)))
    # Updated parameters keep the layout of the parameters they replace (buffers can be donated).
    for o, i in plan.aliases.items():
        assert plan.outputs[o].spec == plan.inputs[i].spec
    assert any(a.label.endswith("dot_general") for a in plan.anchors)
    assert plan.cost.step_seconds == pytest.approx(plan.cost.compute_seconds + plan.cost.communication_seconds)
    assert plan.cost.communication_bytes == pytest.approx(sum(c.wire_bytes for c in plan.collectives))


def test_save_load_roundtrip(tmp_path, gpt):
    _, _, plan = gpt
    path = tmp_path / "plan.json"
    plan.save(str(path))
    loaded = autoplan.load_plan(str(path))
    assert loaded == plan
    assert loaded.input_shardings["params/block0/mlp_in/kernel"] == plan.input_shardings[0]["block0"]["mlp_in"]["kernel"]
    data = json.loads(path.read_text())
    data["version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 999"):
        autoplan.load_plan(str(path))
    data["version"] = 1
    data["inputs"][0]["spec"] = [["nonexistent"]] + data["inputs"][0]["spec"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="nonexistent"):
        autoplan.load_plan(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON plan"):
        autoplan.load_plan(str(path))


def test_plans_are_deterministic(gpt):
    spec, args, plan = gpt
    again = autoplan.plan(spec.train_step, *args, mesh=MESH, cluster="a100-8x")
    assert again.to_json() == plan.to_json()


def test_golden_snapshot(gpt):
    """The reference plan for gpt-tiny on a (2, 4) a100 mesh.  Regenerate with
    AUTOPLAN_UPDATE_GOLDEN=1 when a deliberate change to the planner changes it."""
    _, _, plan = gpt
    snapshot = {leaf.path: str(leaf.partition_spec) for leaf in plan.inputs}
    snapshot["predicted_step_seconds"] = round(plan.cost.step_seconds, 9)
    path = os.path.join(GOLDEN, "gpt-tiny_2x4_a100.json")
    if os.environ.get("AUTOPLAN_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            json.dump(snapshot, f, indent=1, sort_keys=True)
    assert os.path.exists(path), f"no golden plan at {path}: run with AUTOPLAN_UPDATE_GOLDEN=1 and review it"
    with open(path) as f:
        golden = json.load(f)
    assert snapshot == golden


def test_num_devices_picks_the_mesh_shape():
    spec = autoplan.models.get("mlp-tiny")
    plan = autoplan.plan(spec.train_step, *spec.abstract_state(), spec.abstract_batch(), num_devices=8,
                         cluster="a100-8x")
    assert plan.mesh.size == 8 and plan.mesh.axis_names == ("data", "model")
    fixed = [autoplan.plan(spec.train_step, *spec.abstract_state(), spec.abstract_batch(),
                           mesh=jax.sharding.AbstractMesh(s, ("data", "model")), cluster="a100-8x")
             for s in ((8, 1), (4, 2), (2, 4), (1, 8))]
    assert plan.cost.step_seconds == pytest.approx(min(p.cost.step_seconds for p in fixed))


def test_bad_cluster_and_mesh_arguments():
    spec = autoplan.models.get("mlp-tiny")
    args = (*spec.abstract_state(), spec.abstract_batch())
    with pytest.raises(ValueError, match="unknown cluster preset 'nope'"):
        autoplan.plan(spec.train_step, *args, mesh=MESH, cluster="nope")
    with pytest.raises(ValueError, match="either mesh= or num_devices="):
        autoplan.plan(spec.train_step, *args, mesh=MESH, num_devices=8)


def test_three_axis_mesh_plans():
    spec = autoplan.models.get("mlp-tiny")
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("pod", "data", "model"))
    plan = autoplan.plan(spec.train_step, *spec.abstract_state(), spec.abstract_batch(), mesh=mesh,
                         cluster="a100-8x")
    assert plan.mesh.axis_names == ("pod", "data", "model")
    dp = autoplan.baselines.data_parallel(spec.train_step, *spec.abstract_state(), spec.abstract_batch(),
                                          mesh=mesh, cluster="a100-8x")
    assert plan.cost.step_seconds <= dp.cost.step_seconds * (1 + 1e-9)
