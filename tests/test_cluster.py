import math

import pytest

import autoplan
from autoplan._src.cluster import MeshShape, collective_bytes, collective_seconds, group_bandwidth


def test_presets_match_spec():
    for name in ("a100-8x", "h100-8x", "v100-8x", "tpu-v4", "tpu-v5e", "cpu"):
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
