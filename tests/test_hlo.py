"""Collectives and costs read from what XLA compiled (autoplan._src.hlo)."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoplan
from autoplan._src import hlo
from autoplan._src.cluster import MeshShape, collective_bytes, collective_seconds

F32 = jnp.float32
MESH_SHAPE = MeshShape(axis_names=("data", "model"), axis_sizes=(2, 4))
# Four devices per node: on the (2, 4) mesh "model" stays in a node and "data" crosses nodes.
CLUSTER = autoplan.Cluster(name="test-4x", device_flops=1e12, device_memory=16e9, devices_per_node=4,
                           intra_node_bandwidth=100e9, inter_node_bandwidth=10e9, latency=5e-6)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _s(mesh, *spec):
    return NamedSharding(mesh, P(*spec))


def _sds(*shape):
    return jax.ShapeDtypeStruct(shape, F32)


# ----------------------------------------------------------------------------- compiled programs


def test_contracting_dim_sharded_matmul_all_reduces_over_model(mesh):
    m, k, n = 64, 128, 256
    compiled = jax.jit(lambda x, w: x @ w, in_shardings=(_s(mesh, None, "model"), _s(mesh, "model", None)),
                       out_shardings=_s(mesh)).lower(_sds(m, k), _sds(k, n)).compile()
    (c,) = hlo.collectives(compiled, mesh)
    assert (c.kind, c.axes, c.group_size, c.shape, c.dtype) == ("all-reduce", ("model",), 4, (m, n), "f32")
    assert c.nbytes == m * n * 4 and c.index is None
    report = hlo.compiled_report(compiled, mesh, CLUSTER)
    expected = collective_seconds("all-reduce", m * n * 4, ("model",), MESH_SHAPE, CLUSTER)
    assert report.communication_seconds == pytest.approx(expected)
    assert report.communication_bytes == pytest.approx(2 * 3 / 4 * m * n * 4)
    # Per-device flops: a quarter of the matmul (plus the all-reduce's additions).
    assert report.flops == pytest.approx(2 * m * n * k / 4, rel=0.05)
    assert report.step_seconds == pytest.approx(report.compute_seconds + report.communication_seconds)
    assert report.bytes_accessed > m * k * 4  # at least the operands are read
    # One compute-bound kernel: its FLOPs at the device rate, its operand bytes hidden under them.
    assert report.compute_seconds == pytest.approx(2 * m * n * k / 4 / CLUSTER.device_flops, rel=0.01)


def _mlp_step(params, x, y):
    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def test_data_parallel_gradients_are_one_tuple_all_reduce_over_data(mesh):
    params = {"w1": _sds(32, 64), "b1": _sds(64), "w2": _sds(64, 16), "b2": _sds(16)}
    replicated = jax.tree.map(lambda _: _s(mesh), params)
    compiled = jax.jit(_mlp_step, in_shardings=(replicated, _s(mesh, "data"), _s(mesh, "data")),
                       out_shardings=replicated).lower(params, _sds(64, 32), _sds(64, 16)).compile()
    colls = hlo.collectives(compiled, mesh)
    assert {c.kind for c in colls} == {"all-reduce"}
    assert {c.axes for c in colls} == {("data",)} and {c.group_size for c in colls} == {2}
    param_bytes = sum(math.prod(p.shape) * 4 for p in jax.tree.leaves(params))
    assert sum(c.nbytes for c in colls) == param_bytes
    # One element per gradient (XLA may hold a weight gradient transposed).
    assert sorted(math.prod(c.shape) for c in colls) == sorted(math.prod(p.shape) for p in jax.tree.leaves(params))
    # XLA combined them: one instruction, tuple elements 0..3, one alpha for all.
    assert len({c.name for c in colls}) == 1 and sorted(c.index for c in colls) == [0, 1, 2, 3]
    report = hlo.compiled_report(compiled, mesh, CLUSTER)
    assert report.communication_seconds == pytest.approx(
        collective_seconds("all-reduce", param_bytes, ("data",), MESH_SHAPE, CLUSTER))
    # "data" crosses nodes on this cluster: priced at the slow link.
    assert report.communication_seconds > CLUSTER.latency + 2 * 0.5 * param_bytes / CLUSTER.intra_node_bandwidth


def test_gathering_a_data_sharded_array_is_an_all_gather_of_the_full_buffer(mesh):
    compiled = jax.jit(lambda x: x * 2, in_shardings=_s(mesh, "data"),
                       out_shardings=_s(mesh)).lower(_sds(64, 128)).compile()
    (c,) = hlo.collectives(compiled, mesh)
    assert (c.kind, c.axes, c.group_size, c.shape, c.nbytes) == ("all-gather", ("data",), 2, (64, 128), 64 * 128 * 4)
    assert c.wire_bytes == pytest.approx(collective_bytes("all-gather", 64 * 128 * 4, 2))


def test_psum_scatter_is_a_reduce_scatter_priced_on_the_unscattered_buffer(mesh):
    fn = jax.shard_map(lambda a: jax.lax.psum_scatter(a, "model", tiled=True), mesh=mesh,
                       in_specs=P("data", None), out_specs=P("data", "model"))
    compiled = jax.jit(fn).lower(_sds(64, 128)).compile()
    (c,) = hlo.collectives(compiled, mesh)
    assert (c.kind, c.axes, c.group_size) == ("reduce-scatter", ("model",), 4)
    assert c.shape == (8, 128)  # the scattered per-device result ...
    assert c.nbytes == 32 * 128 * 4  # ... but nbytes is the per-device input, as cluster.py counts it


def test_ppermute_is_a_point_to_point_over_its_axis(mesh):
    fn = jax.shard_map(lambda a: jax.lax.ppermute(a, "model", [(i, (i + 1) % 4) for i in range(4)]), mesh=mesh,
                       in_specs=P("data", "model"), out_specs=P("data", "model"))
    compiled = jax.jit(fn).lower(_sds(64, 128)).compile()
    (c,) = hlo.collectives(compiled, mesh)
    assert (c.kind, c.axes, c.group_size, c.nbytes) == ("collective-permute", ("model",), 2, 32 * 32 * 4)
    report = hlo.compiled_report(compiled, mesh, CLUSTER)
    assert report.communication_seconds == pytest.approx(collective_seconds("p2p", c.nbytes, ("model",),
                                                                            MESH_SHAPE, CLUSTER))
    assert report.flops == 0.0  # cost_analysis has no "flops" key for a pure data movement


def test_collective_in_a_loop_body_is_counted_once(mesh):
    def body(a):
        return jax.lax.fori_loop(0, 5, lambda i, c: jax.lax.psum(c, "data") * 0.5, a)

    fn = jax.shard_map(body, mesh=mesh, in_specs=P("data", "model"), out_specs=P("data", "model"), check_vma=False)
    compiled = jax.jit(fn).lower(_sds(64, 128)).compile()
    (c,) = hlo.collectives(compiled, mesh)
    assert (c.kind, c.axes) == ("all-reduce", ("data",))
    assert "main" not in c.computation  # found in the loop body, not the entry


def test_matmul_flops_are_per_device(mesh):
    m, k, n = 128, 256, 64
    x, w = _sds(m, k), _sds(k, n)
    whole = hlo.compiled_report(jax.jit(lambda x, w: x @ w).lower(x, w).compile(), mesh, CLUSTER)
    assert whole.flops == pytest.approx(2 * m * n * k, rel=0.05)
    assert whole.collectives == ()
    split = jax.jit(lambda x, w: x @ w, in_shardings=(_s(mesh, ("data", "model")), _s(mesh)),
                    out_shardings=_s(mesh, ("data", "model"))).lower(x, w).compile()
    report = hlo.compiled_report(split, mesh, CLUSTER)
    assert report.flops == pytest.approx(2 * m * n * k / 8, rel=0.05)
    assert report.collectives == () and report.communication_seconds == 0.0


def test_memory_is_per_device_and_within_the_upper_bound(mesh):
    x, w = _sds(512, 256), _sds(256, 256)
    compiled = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w, in_shardings=(_s(mesh, "data"), _s(mesh, None, "model")),
                       out_shardings=_s(mesh, "data")).lower(x, w).compile()
    report = hlo.compiled_report(compiled, mesh, CLUSTER)
    assert report.argument_bytes == 512 * 256 * 4 / 2 + 256 * 256 * 4 / 4
    assert report.output_bytes == 512 * 256 * 4 / 2
    upper = report.argument_bytes + report.output_bytes + report.temp_bytes - report.alias_bytes
    assert report.argument_bytes <= report.memory_bytes <= upper
    assert report.cost().memory_bytes == report.memory_bytes
    d = report.to_dict()
    assert json.loads(json.dumps(d))["collectives"] == [c.to_dict() for c in report.collectives]
    assert d["cluster"] == "test-4x"


# ----------------------------------------------------------------------------- hand-written HLO


def _module(*instructions, partitions=8):
    body = "\n".join(f"  {line}" for line in instructions)
    return (f"HloModule m, is_scheduled=true, num_partitions={partitions}\n\n"
            "%add (a: f32[], b: f32[]) -> f32[] {\n  %a = f32[] parameter(0)\n  %b = f32[] parameter(1)\n"
            "  ROOT %s = f32[] add(%a, %b)\n}\n\n"
            f"ENTRY %main (p: f32[128,256]) -> f32[128,256] {{\n  %p = f32[128,256]{{1,0}} parameter(0)\n{body}\n}}\n")


def test_parser_tuple_all_reduce_counts_every_element():
    text = _module('%ar = (f32[128,256]{1,0}, f32[256]{0}, bf16[4,4]{1,0}) all-reduce(%p, %q, %r), channel_id=3, '
                   'replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add, '
                   'metadata={op_name="a=b, replica_groups={{0,1}}"}')
    colls = hlo.collectives(text, MESH_SHAPE)
    assert [(c.dtype, c.shape, c.nbytes, c.index) for c in colls] == [
        ("f32", (128, 256), 128 * 256 * 4, 0), ("f32", (256,), 1024, 1), ("bf16", (4, 4), 32, 2)]
    assert {c.axes for c in colls} == {("data",)}
    total = 128 * 256 * 4 + 1024 + 32
    assert hlo.communication_seconds(colls, MESH_SHAPE, CLUSTER) == pytest.approx(
        collective_seconds("all-reduce", total, ("data",), MESH_SHAPE, CLUSTER))


def test_parser_iota_replica_groups():
    plain = _module("%ag = f32[128,256]{1,0} all-gather(%p), replica_groups=[2,4]<=[8], dimensions={0}")
    transposed = _module("%ag = f32[128,256]{1,0} all-gather(%p), replica_groups=[4,2]<=[2,4]T(1,0), "
                         "dimensions={0}")
    everyone = _module("%ag = f32[128,256]{1,0} all-gather(%p), replica_groups=[1,8]<=[8], dimensions={0}")
    assert [(c.axes, c.group_size) for c in hlo.collectives(plain, MESH_SHAPE)] == [(("model",), 4)]
    assert [(c.axes, c.group_size) for c in hlo.collectives(transposed, MESH_SHAPE)] == [(("data",), 2)]
    assert [(c.axes, c.group_size) for c in hlo.collectives(everyone, MESH_SHAPE)] == [(("data", "model"), 8)]


def test_parser_mesh_axes_replica_groups():
    # XLA's newer form: the groups vary along the named axes of its own mesh.
    model = _module("%ar = f32[64]{0} all-reduce(%p), channel_id=1, replica_groups=mesh['axis_0'=1,'axis_1'=4,"
                    "'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, use_global_device_ids=true, to_apply=%add")
    data = _module("%ar = f32[64]{0} all-reduce(%p), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=1,"
                   "'axis_2'=4] {'axis_0'}, use_global_device_ids=true, to_apply=%add")
    explicit = _module("%ar = f32[64]{0} all-reduce(%p), replica_groups=mesh['x'=2,'y'=4], "
                       "device_ids=(0,4,1,5,2,6,3,7) {'x'}, to_apply=%add")
    sub = _module("%ar = f32[64]{0} all-reduce(%p), replica_groups=mesh['axis_0'=8] {'axis_0':(2)2}, to_apply=%add")
    assert [(c.axes, c.group_size) for c in hlo.collectives(model, MESH_SHAPE)] == [(("model",), 4)]
    assert [(c.axes, c.group_size) for c in hlo.collectives(data, MESH_SHAPE)] == [(("data",), 2)]
    # device_ids (0,4,1,5 | 2,6,3,7) grouped over x: {0,2}, {4,6}, ... differ only along "model".
    assert [(c.axes, c.group_size) for c in hlo.collectives(explicit, MESH_SHAPE)] == [(("model",), 2)]
    # The middle factor 2 of 8 = 2 x 2 x 2: {0,2}, {1,3}, ...: half of "model".
    (c,) = hlo.collectives(sub, MESH_SHAPE)
    assert (c.axes, c.group_size) == (("model",), 2)
    seconds = hlo.communication_seconds([c], MESH_SHAPE, CLUSTER)
    assert seconds == pytest.approx(CLUSTER.latency + collective_bytes("all-reduce", 256, 2)
                                    / CLUSTER.intra_node_bandwidth)
    assert seconds < collective_seconds("all-reduce", 256, ("model",), MESH_SHAPE, CLUSTER)


def test_parser_async_pairs_are_counted_once():
    text = _module(
        "%ars = f32[128,256]{1,0} all-reduce-start(%p), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
        "%ard = f32[128,256]{1,0} all-reduce-done(%ars)",
        "%ags = (f32[64,256]{1,0}, f32[128,256]{1,0}) all-gather-start(%p), replica_groups={{0,4},{1,5},{2,6},"
        "{3,7}}, dimensions={0}",
        "%agd = f32[128,256]{1,0} all-gather-done(%ags)",
        "%cps = (f32[128,256]{1,0}, f32[128,256]{1,0}, u32[], u32[]) collective-permute-start(%p), "
        "source_target_pairs={{0,4},{4,0}}",
        "ROOT %cpd = f32[128,256]{1,0} collective-permute-done(%cps)")
    colls = hlo.collectives(text, MESH_SHAPE)
    assert [(c.kind, c.name, c.axes, c.nbytes) for c in colls] == [
        ("all-reduce", "ars", ("model",), 128 * 256 * 4),
        ("all-gather", "ags", ("data",), 128 * 256 * 4),  # the gathered result, not the operand
        ("collective-permute", "cps", ("data",), 128 * 256 * 4)]


def test_parser_gpu_async_forms_count_results_once():
    """XLA:GPU's async collectives print (operands, results): read the results, once."""
    text = _module(
        "%ars = ((f32[1000]{0}), f32[1000]{0}) all-reduce-start(%c), channel_id=1, "
        "replica_groups=mesh['axis_0'=8] {'axis_0'}, use_global_device_ids=true, to_apply=%add, "
        "output_to_operand_aliasing={{1}: (0, {})}",
        "%ard = f32[1000]{0} all-reduce-done(%ars)",
        "%rss = ((f32[64,8]{1,0}, f32[64]{0}), (f32[8,8]{1,0}, f32[8]{0})) reduce-scatter-start(%a, %b), "
        "channel_id=2, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}, to_apply=%add",
        "%rsd = (f32[8,8]{1,0}, f32[8]{0}) reduce-scatter-done(%rss)",
        "%a2s = ((f32[16,4]{1,0}), (f32[16,4]{1,0})) all-to-all-start(%x), channel_id=3, "
        "replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}",
        "ROOT %a2d = f32[16,4]{1,0} all-to-all-done(%a2s)")
    colls = hlo.collectives(text, MESH_SHAPE)
    assert [(c.kind, c.name, c.shape, c.nbytes, c.index) for c in colls] == [
        ("all-reduce", "ars", (1000,), 4000, None),
        ("reduce-scatter", "rss", (8, 8), 64 * 8 * 4, 0),  # priced on the unscattered buffer
        ("reduce-scatter", "rss", (8,), 64 * 4, 1),
        ("all-to-all", "a2s", (16, 4), 16 * 4 * 4, 0)]  # a one-element result tuple


def test_parser_collective_permute_ignores_self_pairs_and_maps_devices():
    text = _module("%cp = f32[8]{0} collective-permute(%p), source_target_pairs={{0,0},{1,2},{2,1},{3,3}}")
    (c,) = hlo.collectives(text, MESH_SHAPE)
    assert (c.axes, c.group_size, c.nbytes) == (("model",), 2, 32)
    # With ids 1 and 2 sitting in different rows of the mesh, the pair crosses "data".
    (d,) = hlo.collectives(text, MESH_SHAPE, device_positions=[0, 4, 1, 5, 2, 6, 3, 7])
    assert d.axes == ("data", "model")
    only_self = _module("%cp = f32[8]{0} collective-permute(%p), source_target_pairs={{0,0},{1,1}}")
    (s,) = hlo.collectives(only_self, MESH_SHAPE)
    assert (s.axes, s.group_size, s.wire_bytes) == ((), 1, 0.0)
    assert hlo.communication_seconds([s], MESH_SHAPE, CLUSTER) == 0.0


def test_parser_reduce_scatter_all_to_all_and_long_tuples():
    elements = ", ".join(["f32[16,8]{1,0}"] * 3 + ["/*index=3*/f32[16,8]{1,0}"] + ["f32[16,8]{1,0}"] * 2)
    text = _module("%rs = f32[32,256]{1,0} reduce-scatter(%p), replica_groups={{0,1,2,3},{4,5,6,7}}, "
                   "dimensions={0}, to_apply=%add",
                   f"%a2a = ({elements}) all-to-all(%a, %b, %c, %d, %e, %f), replica_groups={{{{0,1,2,3,4,5,6,7}}}}",
                   "%not = f32[128,256]{1,0} add(%p, %p)")
    colls = hlo.collectives(text, MESH_SHAPE)
    rs, a2a = colls[0], colls[1:]
    assert (rs.kind, rs.nbytes, rs.axes) == ("reduce-scatter", 128 * 256 * 4, ("model",))
    assert len(a2a) == 6 and {c.kind for c in a2a} == {"all-to-all"} and {c.group_size for c in a2a} == {8}
    assert sum(c.wire_bytes for c in a2a) == pytest.approx(7 / 8 * 6 * 16 * 8 * 4)


def test_parser_refuses_what_it_cannot_price():
    outside = _module("%ar = f32[8]{0} all-reduce(%p), replica_groups={{0,9}}, to_apply=%add", partitions=16)
    with pytest.raises(ValueError, match="outside the mesh"):
        hlo.collectives(outside, MESH_SHAPE)
    with pytest.raises(ValueError, match="optimized HLO"):
        hlo.collectives("module @jit_f attributes {mhlo.num_partitions = 8 : i32} {}", MESH_SHAPE)


class _FakeCompiled:
    """Older JAX: cost_analysis() as a list of dicts, memory_analysis() without a peak."""

    def __init__(self, text):
        self._text = text

    def as_text(self):
        return self._text

    def cost_analysis(self):
        return [{"flops": 2e9, "bytes accessed": 1e6}]

    def memory_analysis(self):
        return type("Stats", (), dict(argument_size_in_bytes=100, output_size_in_bytes=50, temp_size_in_bytes=30,
                                      alias_size_in_bytes=20, generated_code_size_in_bytes=7))()


def test_report_accepts_older_analysis_formats():
    text = _module("%ar = f32[1024]{0} all-reduce(%p), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add")
    report = hlo.compiled_report(_FakeCompiled(text), {"data": 2, "model": 4}, CLUSTER)
    assert report.flops == 2e9 and report.bytes_accessed == 1e6
    assert report.memory_bytes == 100 + 50 + 30 - 20 and report.generated_code_bytes == 7
    assert report.compute_seconds == 0.0  # timed from the text's kernels (none here), not from the totals
    expected = collective_seconds("all-reduce", 4096, ("data", "model"), MESH_SHAPE, CLUSTER)
    assert report.step_seconds == pytest.approx(report.compute_seconds + expected)
    assert np.isclose(report.communication_bytes, 2 * 7 / 8 * 4096)


def test_sliced_all_reduce_is_priced_as_reduce_scatter():
    text = """HloModule m, num_partitions=4
ENTRY %main (p: f32[8,4]) -> f32[2,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %ar = f32[8,4]{1,0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  ROOT %f = f32[2,4]{1,0} fusion(%ar, %pid), kind=kLoop, calls=%fc
}"""
    mesh = {"data": 4}
    colls = hlo.collectives(text, mesh)
    sliced = hlo.sliced_all_reduces(text, colls)
    assert sliced == {("main", "ar", None)}
    report = hlo.CompiledReport(cluster="a100-8x", flops=0.0, bytes_accessed=0.0, memory_bytes=0.0,
                                argument_bytes=0.0, output_bytes=0.0, temp_bytes=0.0, alias_bytes=0.0,
                                generated_code_bytes=0.0, collectives=tuple(colls), communication_bytes=0.0,
                                communication_seconds=0.0, compute_seconds=1.0, step_seconds=1.0)
    gpu = hlo.with_reduce_scatters(report, sliced, mesh, "a100-8x")
    assert gpu.communication_bytes == pytest.approx(3 / 4 * 128)  # reduce-scatter of 128 bytes over 4 devices
    assert gpu.communication_seconds == pytest.approx(hlo.communication_seconds(
        [hlo.HloCollective(kind="reduce-scatter", name="rs", dtype="f32", shape=(2, 4), nbytes=128, group_size=4,
                           axes=("data",))], mesh, "a100-8x"))
    assert gpu.step_seconds == pytest.approx(1.0 + gpu.communication_seconds)
    # A consumer that needs the whole buffer keeps it an all-reduce.
    whole = text.replace("ROOT %f = f32[2,4]{1,0} fusion(%ar, %pid)", "ROOT %f = f32[8,4]{1,0} negate(%ar)")
    assert hlo.sliced_all_reduces(whole, colls) == set()


def test_cpu_reduce_scatter_is_found_in_compiled_hlo():
    """A matmul split on its contraction with a row-split result: the CPU writes all-reduce + slice."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))  # noqa: E731
    f = jax.jit(lambda a, b: a @ b, in_shardings=(shard(None, "data"), shard("data", None)),
                out_shardings=shard("data", None))
    compiled = f.lower(jax.ShapeDtypeStruct((64, 256), jnp.float32),
                       jax.ShapeDtypeStruct((256, 128), jnp.float32)).compile()
    report = hlo.compiled_report(compiled, mesh, "a100-8x")
    sliced = hlo.sliced_all_reduces(compiled, report.collectives)
    gpu = hlo.with_reduce_scatters(report, sliced, mesh, "a100-8x")
    full = 64 * 128 * 4
    if any(c.kind == "reduce-scatter" for c in report.collectives):  # a backend that emits it directly
        assert report.communication_bytes == pytest.approx(7 / 8 * full)
    else:
        assert sliced and report.communication_bytes == pytest.approx(2 * 7 / 8 * full)
    assert gpu.communication_bytes == pytest.approx(7 / 8 * full)


def test_cpu_reduce_scatter_inside_a_loop_is_found():
    """A reduce-scatter once per iteration of a scan (a gradient-accumulation loop's sums kept row-split):
    XLA hoists ``partition-id`` out of the loop and hands the slice offset to the body in the loop's
    tuple.  Found there too, the loop's reduce-scatters cost what the unrolled loop's do (missed, they
    priced as all-reduces: twice the bytes)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))  # noqa: E731
    trips = 4

    def accumulate(a, b, w, unroll):
        def body(total, ab):
            h = jnp.tanh(ab[0] @ w)  # a body big enough that XLA keeps the loop
            return jax.lax.with_sharding_constraint(jnp.tanh(total) + h.T @ ab[1], shard("data", None)), None
        return jax.lax.scan(body, jnp.zeros((128, 128), jnp.float32), (a, b), unroll=unroll)[0]

    args = (_sds(trips, 256, 64), _sds(trips, 256, 128), _sds(64, 128))
    priced = []
    for looped, unroll in ((True, 1), (False, True)):
        f = jax.jit(functools.partial(accumulate, unroll=unroll),
                    in_shardings=(shard(None, "data", None), shard(None, "data", None), shard()),
                    out_shardings=shard("data", None))
        compiled = f.lower(*args).compile()
        report = hlo.compiled_report(compiled, mesh, "a100-8x")
        sliced = hlo.sliced_all_reduces(compiled, report.collectives)
        assert ("while" in compiled.as_text()) == looped == any(c.repeats == trips for c in report.collectives)
        if not any(c.kind == "reduce-scatter" for c in report.collectives):  # the CPU: all-reduce + slice
            assert sliced
        priced.append(hlo.with_reduce_scatters(report, sliced, mesh, "a100-8x").communication_bytes)
    assert priced[0] == pytest.approx(priced[1]) == pytest.approx(trips * 7 / 8 * 128 * 128 * 4)


class _PeakBelowTemps(_FakeCompiled):
    def memory_analysis(self):
        return type("Stats", (), dict(argument_size_in_bytes=100, output_size_in_bytes=50, temp_size_in_bytes=900,
                                      alias_size_in_bytes=20, generated_code_size_in_bytes=7,
                                      peak_memory_in_bytes=150))()


def test_a_peak_below_the_temporaries_is_not_taken_as_the_peak():
    """XLA:CPU sometimes reports arguments + outputs as the peak; the temporaries alone exceed it."""
    text = _module("%ar = f32[1024]{0} all-reduce(%p), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add")
    report = hlo.compiled_report(_PeakBelowTemps(text), {"data": 2, "model": 4}, CLUSTER)
    assert report.memory_bytes == 100 + 50 + 900 - 20


def test_compute_is_priced_at_the_rate_of_the_programs_matmuls():
    """An fp32 matmul on an A100 preset runs at TF32 (156 TF/s), HIGHEST at fp32 (19.5), as the planner prices it."""
    a100 = autoplan.clusters["a100-8x"]
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    default = jax.jit(lambda a, b: a @ b).lower(x, x).compile()
    highest = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest")).lower(x, x).compile()
    for compiled, rate in ((default, 156e12), (highest, 19.5e12)):
        report = hlo.compiled_report(compiled, {"data": 8}, a100)
        # one kernel: the slower of its FLOPs at that rate and its bytes
        assert report.compute_seconds == pytest.approx(
            max(report.flops / rate, report.bytes_accessed / a100.memory_bandwidth), rel=1e-3)
    bf16 = hlo.compiled_report(default, {"data": 8}, a100, matmul_dtypes=("bfloat16", "bfloat16"))
    assert bf16.compute_seconds == pytest.approx(max(bf16.flops / 312e12, bf16.bytes_accessed / a100.memory_bandwidth))
    big = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)  # compute-bound at either rate: the rate shows
    compiled = jax.jit(lambda a, b: a @ b).lower(big, big).compile()
    tf32 = hlo.compiled_report(compiled, {"data": 8}, a100)
    bf16 = hlo.compiled_report(compiled, {"data": 8}, a100, matmul_dtypes=("bfloat16", "bfloat16"))
    assert tf32.compute_seconds == pytest.approx(2 * 2048 ** 3 / 156e12)
    assert bf16.compute_seconds == pytest.approx(2 * 2048 ** 3 / 312e12)


# ----------------------------------------------------------------------------- kernels and the roofline


def _scan_step(unroll):
    def step(x, w):
        def body(carry, wi):
            return jnp.tanh(carry @ wi), None
        return jax.lax.scan(body, x, w, unroll=unroll)[0].sum()
    return jax.grad(step, argnums=(0, 1))


@pytest.mark.parametrize("model", ["gpt-tiny", "wresnet-tiny"])
def test_kernel_flops_and_bytes_add_up_to_xla_cost_analysis(model):
    """Per-kernel counts, summed, are XLA's own totals (a transformer; a conv net with strides and padding)."""
    spec = autoplan.models.get(model)
    compiled = jax.jit(spec.train_step).lower(*spec.abstract_state(), spec.abstract_batch()).compile()
    kernels = hlo.kernels(compiled)
    costs = compiled.cost_analysis()
    assert sum(k.bytes for k in kernels) == pytest.approx(costs["bytes accessed"], rel=1e-3)
    assert sum(k.flops for k in kernels) == pytest.approx(costs["flops"], rel=0.02)
    assert all(k.repeats == 1 for k in kernels)


def test_loop_kernels_and_collectives_count_every_iteration(mesh):
    """A scanned step costs what the same step unrolled costs; XLA's cost analysis counts the body once."""
    trips = 4
    x, w = _sds(64, 128), _sds(trips, 128, 128)
    shardings = (_s(mesh, "data", "model"), _s(mesh, None, "model", None))
    scanned = jax.jit(_scan_step(1), in_shardings=shardings).lower(x, w).compile()
    unrolled = jax.jit(_scan_step(True), in_shardings=shardings).lower(x, w).compile()
    assert "while" in scanned.as_text() and "while" not in unrolled.as_text()
    kernels = hlo.kernels(scanned)
    assert max(k.repeats for k in kernels) == trips
    xla_flops = scanned.cost_analysis()["flops"]  # the body once
    assert sum(k.flops for k in kernels) == pytest.approx(xla_flops, rel=0.02)
    assert sum(k.flops * k.repeats for k in kernels) > 2 * xla_flops
    matmul = sum(k.matmul_flops * k.repeats for k in kernels)
    assert matmul == pytest.approx(sum(k.matmul_flops for k in hlo.kernels(unrolled)), rel=1e-6)
    looped = [c for c in hlo.collectives(scanned, mesh) if c.repeats == trips]
    assert looped, "the scan body reduces over 'model' every iteration"
    report = hlo.compiled_report(scanned, mesh, CLUSTER)
    plain = hlo.compiled_report(unrolled, mesh, CLUSTER)
    assert report.communication_bytes == pytest.approx(plain.communication_bytes, rel=0.05)


def test_roofline_is_the_slower_of_flops_and_bytes_per_kernel():
    """An elementwise program is memory-bound (bytes / bandwidth); a big matmul compute-bound (flops / rate)."""
    n = 1 << 20
    add = jax.jit(lambda a, b: a + b).lower(_sds(n), _sds(n)).compile()
    report = hlo.compiled_report(add, MESH_SHAPE, CLUSTER)
    assert report.compute_seconds == pytest.approx(3 * n * 4 / CLUSTER.memory_bandwidth, rel=1e-6)
    m = 512
    matmul = jax.jit(lambda a, b: a @ b).lower(_sds(m, m), _sds(m, m)).compile()
    report = hlo.compiled_report(matmul, MESH_SHAPE, CLUSTER)
    assert report.compute_seconds == pytest.approx(2 * m ** 3 / CLUSTER.device_flops, rel=1e-6)


def test_fusion_updating_a_slot_in_place_moves_the_slot_not_the_buffer():
    """A fusion whose root updates one window of a buffer (`x.at[i].set(where(p, y, x[i]))`, as the
    pipeline's stash stores compile) and whose only other read of that buffer slices the same window
    runs in place in XLA: it reads the window and y and writes the window, not the 4-slot buffer."""
    window, buffer = 4 * 1024, 4 * 4 * 1024
    text = (
        "HloModule m\n\n"
        "%fused (b: f32[4,1024], i: s32[], y: f32[1,1024], p: pred[]) -> f32[4,1024] {\n"
        "  %b = f32[4,1024]{1,0} parameter(0)\n  %i = s32[] parameter(1)\n  %y = f32[1,1024]{1,0} parameter(2)\n"
        "  %p = pred[] parameter(3)\n  %z = s32[] constant(0)\n"
        "  %old = f32[1,1024]{1,0} dynamic-slice(%b, %i, %z), dynamic_slice_sizes={1,1024}\n"
        "  %bp = pred[1,1024]{1,0} broadcast(%p), dimensions={}\n"
        "  %new = f32[1,1024]{1,0} select(%bp, %y, %old)\n"
        "  ROOT %u = f32[4,1024]{1,0} dynamic-update-slice(%b, %new, %i, %z)\n}\n\n"
        "ENTRY %main (b: f32[4,1024], i: s32[], y: f32[1,1024], p: pred[]) -> f32[4,1024] {\n"
        "  %b = f32[4,1024]{1,0} parameter(0)\n  %i = s32[] parameter(1)\n  %y = f32[1,1024]{1,0} parameter(2)\n"
        "  %p = pred[] parameter(3)\n"
        "  ROOT %f = f32[4,1024]{1,0} fusion(%b, %i, %y, %p), kind=kLoop, calls=%fused\n}\n")
    (kernel,) = hlo.kernels(text)
    assert kernel.bytes == window + 4 + window + 1 + window < buffer  # window read, i, y, p, window written
    # Sliced at another window, the buffer is read whole (XLA copies it rather than update in place).
    other = text.replace("dynamic-slice(%b, %i, %z)", "dynamic-slice(%b, %z, %z)")
    assert hlo.kernels(other)[0].bytes == window + 4 + window + 1 + buffer


def test_fusion_slicing_a_bitcast_of_a_packed_buffer_moves_the_slice():
    """The pipeline's update reads each parameter as a slice of a bitcast of its stage row's packed
    buffer: a bitcast is a view, so the kernel reads the window, as it does slicing the buffer directly
    (which XLA's cost analysis counts as the window too).  Counting the whole buffer priced a GPT stage's
    update from compiled HLO at 15.9 ms instead of 1.2 ms."""
    packed, window = 1 << 20, 3072 * 768

    def module(body: str) -> str:
        return ("HloModule m\n\n"
                f"%fused (w: f32[3072,768], b: f32[1,1,{packed}]) -> f32[3072,768] {{\n"
                f"  %w = f32[3072,768]{{1,0}} parameter(0)\n  %b = f32[1,1,{packed}]{{2,1,0}} parameter(1)\n"
                f"{body}"
                "  %g = f32[3072,768]{1,0} bitcast(%s)\n"
                "  ROOT %a = f32[3072,768]{1,0} add(%w, %g)\n}\n\n"
                f"ENTRY %main (w: f32[3072,768], b: f32[1,1,{packed}]) -> f32[3072,768] {{\n"
                f"  %w = f32[3072,768]{{1,0}} parameter(0)\n  %b = f32[1,1,{packed}]{{2,1,0}} parameter(1)\n"
                "  ROOT %f = f32[3072,768]{1,0} fusion(%w, %b), kind=kLoop, calls=%fused\n}\n")

    through_bitcast = module(f"  %flat = f32[{packed}]{{0}} bitcast(%b)\n"
                             f"  %s = f32[{window}]{{0}} slice(%flat), slice={{[4096:{4096 + window}]}}\n")
    direct = module(f"  %s = f32[1,1,{window}]{{2,1,0}} slice(%b), slice={{[0:1], [0:1], [4096:{4096 + window}]}}\n")
    (kernel,) = hlo.kernels(through_bitcast)
    assert kernel.bytes == hlo.kernels(direct)[0].bytes == 3 * 4 * window
    # Read otherwise too (the bitcast's whole value used by another op), the buffer counts whole.
    whole = module(f"  %flat = f32[{packed}]{{0}} bitcast(%b)\n  %n = f32[{packed}]{{0}} negate(%flat)\n"
                   f"  %s = f32[{window}]{{0}} slice(%n), slice={{[4096:{4096 + window}]}}\n")
    assert hlo.kernels(whole)[0].bytes == 2 * 4 * window + 4 * packed
