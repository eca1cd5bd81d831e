import json
import math

import jax
import jax.numpy as jnp
import pytest

import autoplan
from autoplan._src.cluster import MeshShape, collective_bytes, collective_seconds, group_bandwidth, preset_for_device


def test_presets_match_spec():
    for name in ("a100-8x", "h100-8x", "v100-8x", "tpu-v4", "tpu-v5e", "tpu-v5p", "cpu"):
        c = autoplan.clusters[name]
        assert c.name == name and c.device_flops > 0 and c.device_memory > 0


def test_cluster_validates_fields():
    with pytest.raises(ValueError, match="device_flops"):
        autoplan.Cluster(name="bad", device_flops=0, device_memory=1e9, devices_per_node=8,
                         intra_node_bandwidth=1e9, inter_node_bandwidth=1e9)


def test_alpha_beta_formulas():
    n, nbytes = 8, 1e9
    assert collective_bytes("all-reduce", nbytes, n) == pytest.approx(2 * 7 / 8 * nbytes)
    assert collective_bytes("all-gather", nbytes, n) == pytest.approx(7 / 8 * nbytes)
    assert collective_bytes("reduce-scatter", nbytes, n) == pytest.approx(7 / 8 * nbytes)
    assert collective_bytes("p2p", nbytes, 2) == nbytes
    assert collective_bytes("all-reduce", nbytes, 1) == 0
    mesh = MeshShape(axis_names=("x",), axis_sizes=(8,))
    c = autoplan.clusters["a100-8x"]
    t = collective_seconds("all-reduce", nbytes, ("x",), mesh, c)
    assert t == pytest.approx(c.latency + 2 * 7 / 8 * nbytes / c.intra_node_bandwidth)


def test_node_crossing_follows_mesh_order():
    c = autoplan.clusters["a100-8x"]
    mesh = MeshShape(axis_names=("data", "model"), axis_sizes=(4, 8))
    assert group_bandwidth(c, mesh, ("model",)) == c.intra_node_bandwidth
    assert group_bandwidth(c, mesh, ("data",)) == c.inter_node_bandwidth
    assert group_bandwidth(c, mesh, ("data", "model")) == c.inter_node_bandwidth
    # A (2, 4) mesh fits in one 8-GPU node: both axes are fast.
    small = MeshShape(axis_names=("data", "model"), axis_sizes=(2, 4))
    assert group_bandwidth(c, small, ("data",)) == c.intra_node_bandwidth
    # Slowest link wins: a group over both axes of a (16, 4) mesh crosses nodes.
    big = MeshShape(axis_names=("a", "b"), axis_sizes=(16, 4))
    assert group_bandwidth(c, big, ("b",)) == c.intra_node_bandwidth
    assert group_bandwidth(c, big, ("a",)) == c.inter_node_bandwidth


def test_cost_adds_fieldwise_and_energy():
    a = autoplan.Cost(step_seconds=1.0, compute_seconds=0.5, communication_seconds=0.5,
                      communication_bytes=10.0, memory_bytes=3.0)
    b = a + a
    assert b.step_seconds == 2.0 and b.communication_bytes == 20.0 and b.memory_bytes == 6.0
    c = autoplan.clusters["h100-8x"]
    assert a.energy_joules(c, 8) == pytest.approx(c.device_power * 8)
    with pytest.raises(Exception):
        a.step_seconds = 3.0  # frozen


def test_calibrate_measures_local_devices():
    c = autoplan.calibrate(nbytes=1 << 16, repeats=1)
    assert c.device_flops > 0 and c.intra_node_bandwidth > 0 and math.isfinite(c.device_flops)
    # It fills the per-dtype rates it can measure here.
    assert c.platform == "cpu" and set(c.dtype_flops) == {"float32", "bfloat16"}
    assert c.device_flops == max(c.dtype_flops.values())
    assert c.flops_for(("float32", "float32"), "highest") == c.dtype_flops["float32"]


# ---------------------------------------------------------------------------
# Peak FLOP/s per dtype (issue 9, item 4).

TF = 1e12


def test_presets_carry_the_published_dense_rates():
    a100, h100, v100 = (autoplan.clusters[n].dtype_flops for n in ("a100-8x", "h100-8x", "v100-8x"))
    assert (a100["bfloat16"], a100["float16"], a100["tf32"], a100["float32"], a100["int8"]) == \
        (312 * TF, 312 * TF, 156 * TF, 19.5 * TF, 624 * TF)
    assert (h100["bfloat16"], h100["float8_e4m3fn"], h100["tf32"], h100["float32"]) == \
        (989 * TF, 1979 * TF, 494.5 * TF, 67 * TF)
    assert (v100["float16"], v100["float32"]) == (125 * TF, 15.7 * TF)
    for name, bf16 in (("tpu-v4", 275), ("tpu-v5e", 197), ("tpu-v5p", 459)):
        c = autoplan.clusters[name]
        assert c.platform == "tpu" and c.dtype_flops["bfloat16"] == c.device_flops == bf16 * TF
    v5p = autoplan.clusters["tpu-v5p"]
    assert (v5p.device_memory, v5p.memory_bandwidth) == (95e9, 2.76e12)
    # The headline figure stays the bf16 (fp16 on V100) peak.
    assert [autoplan.clusters[n].device_flops for n in ("a100-8x", "h100-8x", "v100-8x")] == [312 * TF, 989 * TF,
                                                                                            125 * TF]


@pytest.mark.parametrize("cluster,dtypes,precision,tflops", [
    # GPU: float32 at DEFAULT/HIGH runs as TF32 where the device has it (JAX docs, "Matmul precision").
    ("a100-8x", ("float32", "float32"), None, 156), ("a100-8x", ("float32", "float32"), "high", 156),
    ("a100-8x", ("float32", "float32"), "highest", 19.5), ("h100-8x", ("float32", "float32"), None, 494.5),
    ("h100-8x", ("float32", "float32"), "float32", 67), ("v100-8x", ("float32", "float32"), None, 15.7),
    ("a100-8x", ("bfloat16", "bfloat16"), None, 312), ("a100-8x", ("bfloat16", "bfloat16"), "highest", 312),
    ("v100-8x", ("float16", "float16"), None, 125), ("h100-8x", ("float8_e4m3fn", "float8_e5m2"), None, 1979),
    ("a100-8x", ("int8", "int8"), None, 624),
    # Mixed operands run at the slower rate; a dtype the table lacks at the slowest listed rate.
    ("a100-8x", ("bfloat16", "float32"), None, 156), ("a100-8x", ("float8_e4m3fn", "float8_e4m3fn"), None, 19.5),
    ("v100-8x", ("bfloat16", "bfloat16"), None, 15.7), ("a100-8x", ("float64", "float64"), None, 19.5),
    # One pair of per-operand levels: the higher one governs.
    ("a100-8x", ("float32", "float32"), ("DEFAULT", "HIGHEST"), 19.5),
    # TPU: float32 DEFAULT is one bf16 pass, HIGH three, HIGHEST six.
    ("tpu-v4", ("float32", "float32"), None, 275), ("tpu-v4", ("float32", "float32"), "high", 275 / 3),
    ("tpu-v4", ("float32", "float32"), "highest", 275 / 6), ("tpu-v5p", ("bfloat16", "bfloat16"), None, 459),
    # Dot algorithms: the storage types' rate divided by the passes.
    ("a100-8x", ("float32", "float32"), "BF16_BF16_F32", 312), ("a100-8x", ("float32", "float32"),
                                                                 "BF16_BF16_F32_X3", 104),
    ("a100-8x", ("float32", "float32"), "TF32_TF32_F32", 156), ("a100-8x", ("float32", "float32"), "F32_F32_F32", 19.5),
    ("h100-8x", ("float8_e4m3fn", "float8_e4m3fn"), "ANY_F8_ANY_F8_F32_FAST_ACCUM", 1979),
    # CPU: precision changes nothing.
    ("cpu", ("float32", "float32"), "highest", 0.05), ("cpu", ("bfloat16", "bfloat16"), None, 0.05),
])
def test_flops_for_prices_dtype_and_precision_as_xla_runs_them(cluster, dtypes, precision, tflops):
    assert autoplan.clusters[cluster].flops_for(dtypes, precision) == pytest.approx(tflops * TF, rel=1e-12)


def test_flops_for_takes_jax_precision_objects():
    a100 = autoplan.clusters["a100-8x"]
    highest = jax.lax.Precision.HIGHEST
    assert a100.flops_for(("float32", "float32"), (highest, highest)) == 19.5 * TF
    assert a100.flops_for(("float32", "float32"), jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6) == 52 * TF
    assert a100.flops_for(("float32", "float32"), jax.lax.DotAlgorithmPreset.DEFAULT) == 156 * TF
    # A custom algorithm is never priced above a known rate.
    assert a100.flops_for(("float32", "float32"), object()) == 19.5 * TF


def test_a_cluster_without_a_table_prices_every_dtype_at_its_headline():
    c = autoplan.Cluster(name="mine", device_flops=100e12, device_memory=80e9, devices_per_node=8,
                         intra_node_bandwidth=300e9, inter_node_bandwidth=25e9)
    assert c.flops_for(("float32", "float32"), "highest") == c.flops_for(("bfloat16", "bfloat16")) == 100e12
    with pytest.raises(ValueError, match="dtype_flops"):
        autoplan.Cluster(name="bad", device_flops=1e12, device_memory=1e9, devices_per_node=8,
                         intra_node_bandwidth=1e9, inter_node_bandwidth=1e9, dtype_flops={"float32": 0})
    with pytest.raises(ValueError, match="platform"):
        autoplan.Cluster(name="bad", device_flops=1e12, device_memory=1e9, devices_per_node=8,
                         intra_node_bandwidth=1e9, inter_node_bandwidth=1e9, platform="npu")


def test_cluster_dict_round_trip_keeps_the_table_and_stays_hashable():
    for name, c in autoplan.clusters.items():
        again = autoplan.Cluster.from_dict(json.loads(json.dumps(c.to_dict())))
        assert again == c and hash(again) == hash(c), name
        assert dict(again.dtype_flops) == dict(c.dtype_flops) and again.platform == c.platform
    with pytest.raises(TypeError):
        autoplan.clusters["a100-8x"].dtype_flops["float32"] = 1.0  # frozen


def test_plan_files_keep_the_table_and_files_without_it_still_load(tmp_path):
    fn = lambda x, w: x @ w  # noqa: E731
    x, w = jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32)
    plan = autoplan.plan(fn, x, w, mesh=jax.sharding.AbstractMesh((2,), ("data",)), cluster="h100-8x")
    plan.save(str(tmp_path / "plan.json"))
    loaded = autoplan.load_plan(str(tmp_path / "plan.json"))
    assert loaded == plan and loaded.cluster == autoplan.clusters["h100-8x"]
    assert loaded.cluster.flops_for(("float32", "float32"), "highest") == 67 * TF
    # A plan file written before clusters had per-dtype rates: every dtype at the headline rate.
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["cluster"]["dtype_flops"], data["cluster"]["platform"]
    old = autoplan.Plan.from_dict(data)
    assert old.cluster.name == "h100-8x" and not old.cluster.dtype_flops
    assert old.cluster.flops_for(("float32", "float32"), "highest") == 989 * TF
    assert old.input_shardings == loaded.input_shardings


M, N, K = 4096, 4096, 4096  # one dot, compute-bound on every preset below (the roofline takes the max)


@pytest.mark.parametrize("dtype,precision,cluster,tflops", [
    (jnp.bfloat16, None, "a100-8x", 312), (jnp.float32, None, "a100-8x", 156),
    (jnp.float32, "highest", "a100-8x", 19.5), (jnp.float32, None, "v100-8x", 15.7),
    (jnp.bfloat16, None, "h100-8x", 989), (jnp.float32, "high", "tpu-v4", 275 / 3),
])
def test_a_planned_dot_costs_its_xla_flops_at_the_published_rate(dtype, precision, cluster, tflops):
    x, w = jax.ShapeDtypeStruct((M, K), dtype), jax.ShapeDtypeStruct((K, N), dtype)
    fn = lambda x, w: jnp.matmul(x, w, precision=precision)  # noqa: E731
    # The reference flop count is XLA's own, from the compiled single-device float32 program (XLA:CPU
    # runs a bf16 dot as converts around a float32 one, and counts the converts too).
    x32, w32 = (jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, w))
    analysis = jax.jit(fn).lower(x32, w32).compile().cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    assert xla_flops == 2 * M * N * K
    plan = autoplan.plan(fn, x, w, mesh=jax.sharding.AbstractMesh((8,), ("data",)), cluster=cluster)
    assert plan.cost.compute_seconds == pytest.approx(xla_flops / (8 * tflops * TF), rel=1e-9)


@pytest.mark.parametrize("dtype,precision,tflops", [(jnp.bfloat16, None, 312), (jnp.float32, None, 156),
                                                    (jnp.float32, "highest", 19.5)])
def test_a_planned_convolution_costs_its_xla_flops_at_the_published_rate(dtype, precision, tflops):
    fn = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", precision=precision)  # noqa: E731
    shapes = ((64, 128, 34, 34), (128, 128, 3, 3))  # NCHW, OIHW: a 32x32 output
    analysis = jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile().cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    assert xla_flops == 2 * 64 * 32 * 32 * 128 * 128 * 9
    plan = autoplan.plan(fn, *(jax.ShapeDtypeStruct(s, dtype) for s in shapes),
                         mesh=jax.sharding.AbstractMesh((8,), ("data",)), cluster="a100-8x")
    assert plan.cost.compute_seconds == pytest.approx(xla_flops / (8 * tflops * TF), rel=1e-9)


def test_the_default_matmul_precision_config_is_priced_too():
    x, w = jax.ShapeDtypeStruct((M, K), jnp.float32), jax.ShapeDtypeStruct((K, N), jnp.float32)
    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    with jax.default_matmul_precision("highest"):
        plan = autoplan.plan(lambda x, w: x @ w, x, w, mesh=mesh, cluster="a100-8x")
    assert plan.cost.compute_seconds == pytest.approx(2 * M * N * K / (8 * 19.5 * TF), rel=1e-9)


def test_gpt_step_dots_use_bf16_rates_in_bf16_and_tf32_rates_in_fp32():
    from autoplan._src import trace
    from autoplan._src.strategies import base, core

    ctx = base.Context(mesh=MeshShape(axis_names=("data",), axis_sizes=(8,)), cluster=autoplan.clusters["a100-8x"])
    for dtype, tflops in ((jnp.bfloat16, 312), (jnp.float32, 156)):
        spec = autoplan.models.get("gpt-tiny", dtype=dtype)
        graph = trace.trace(spec.train_step, *spec.abstract_state(), spec.abstract_batch())
        dots = [op for op in graph.ops if op.primitive == "dot_general"]
        assert len(dots) >= 20 and all(set(op.input_dtypes) == {jnp.dtype(dtype).name} for op in dots)
        for op in dots:
            (lc, rc), (lb, rb) = op.params["dimension_numbers"]
            lhs, rhs = op.input_shapes
            flops = 2 * math.prod(lhs) * math.prod(n for d, n in enumerate(rhs) if d not in rc and d not in rb)
            replicated = next(s for s in core.dot_general(op, ctx) if s.name == "R")
            assert replicated.compute_seconds == pytest.approx(flops / (tflops * TF), rel=1e-12)


# ---------------------------------------------------------------------------
# The default cluster: the preset of the devices the process runs on (issue 9, item 7).


@pytest.mark.parametrize("kind,preset", [
    ("NVIDIA A100-SXM4-80GB", "a100-8x"), ("NVIDIA A100-SXM4-40GB", "a100-8x"), ("NVIDIA A100 80GB PCIe", "a100-8x"),
    ("NVIDIA H100 80GB HBM3", "h100-8x"), ("NVIDIA H100 PCIe", "h100-8x"), ("NVIDIA H200", "h100-8x"),
    ("Tesla V100-SXM2-16GB", "v100-8x"), ("TPU v4", "tpu-v4"), ("TPU v5 lite", "tpu-v5e"), ("TPU v5e", "tpu-v5e"),
    ("TPU v5p", "tpu-v5p"), ("TPU v5", "tpu-v5p"), ("cpu", "cpu"), ("NVIDIA GeForce RTX 4090", "cpu"),
    ("TPU v6 lite", "cpu"),
])
def test_device_kind_maps_to_its_preset(kind, preset):
    assert preset_for_device(kind) == preset


class _FakeDevice:
    def __init__(self, kind, platform):
        self.device_kind, self.platform = kind, platform


def test_plan_without_cluster_uses_the_device_preset_and_says_so(monkeypatch):
    spec = autoplan.models.get("mlp-tiny")
    args = (*spec.abstract_state(), spec.abstract_batch())
    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    here = autoplan.plan(spec.train_step, *args, mesh=mesh)
    assert here.cluster == autoplan.clusters["cpu"]
    assert "cluster cpu (chosen automatically from device kind 'cpu')" in here.summary()
    named = autoplan.plan(spec.train_step, *args, mesh=mesh, cluster="cpu")
    assert named.cluster_origin == "" and "chosen automatically" not in named.summary()
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice("NVIDIA A100-SXM4-80GB", "gpu")])
    remote = autoplan.plan(spec.train_step, *args, mesh=mesh)
    assert remote.cluster == autoplan.clusters["a100-8x"]
    assert "cluster a100-8x (chosen automatically from device kind 'NVIDIA A100-SXM4-80GB')" in remote.summary()
    assert autoplan.baselines.fsdp(spec.train_step, *args, mesh=mesh).cluster.name == "a100-8x"
    assert autoplan.Plan.from_dict(remote.to_dict()).cluster_origin == remote.cluster_origin
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice("NVIDIA GeForce RTX 4090", "gpu")])
    with pytest.warns(UserWarning, match="no cluster preset for device kind 'NVIDIA GeForce RTX 4090'"):
        assert autoplan.plan(spec.train_step, *args, mesh=mesh).cluster.name == "cpu"
