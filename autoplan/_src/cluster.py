"""Clusters, meshes as the cost model sees them, and alpha-beta collective costs.

A `Cluster` is plain data describing hardware: how fast a device computes, how
much memory it has, how devices group into nodes and how fast the links inside
and between nodes are.  Planning never needs the hardware itself, so a plan for
1024 H100s can be made on a laptop.

Device ids in mesh order fill nodes consecutively: on a (4, 8) mesh of
"a100-8x" the last ("model") axis stays inside a node and the first ("data")
axis crosses nodes.  A collective over a group of devices runs at the bandwidth
of the slowest link that the group crosses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    """Hardware description used by the cost model.

    Bandwidths are bytes per second per device; ``latency`` is the fixed cost
    (alpha) of one collective; ``device_power`` is watts per device, used for
    energy estimates.

    >>> import autoplan
    >>> c = autoplan.Cluster(name="mine", device_flops=312e12, device_memory=80e9,
    ...                      devices_per_node=8, intra_node_bandwidth=300e9,
    ...                      inter_node_bandwidth=25e9, latency=10e-6, device_power=400.0)
    >>> c.devices_per_node
    8
    """

    name: str
    device_flops: float
    device_memory: float
    devices_per_node: int
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    latency: float = 10e-6
    device_power: float = 400.0
    memory_bandwidth: float = 2.0e12  # bytes/s of device memory (roofline for memory-bound ops)

    def __post_init__(self):
        for field in ("device_flops", "device_memory", "intra_node_bandwidth", "inter_node_bandwidth",
                      "memory_bandwidth"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Cluster.{field} must be a positive number, got {value!r}")
        if not (isinstance(self.devices_per_node, int) and self.devices_per_node >= 1):
            raise ValueError(f"Cluster.devices_per_node must be an int >= 1, got {self.devices_per_node!r}")
        if self.latency < 0:
            raise ValueError(f"Cluster.latency must be >= 0, got {self.latency!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Cluster:
        return cls(**data)


clusters: dict[str, Cluster] = {
    # 8x A100-80GB per node, NVLink 3 (300 GB/s per direction per GPU), 200 Gb/s HDR IB per GPU.
    "a100-8x": Cluster(
        name="a100-8x", device_flops=312e12, device_memory=80e9, devices_per_node=8,
        intra_node_bandwidth=300e9, inter_node_bandwidth=25e9, latency=10e-6, device_power=400.0,
        memory_bandwidth=2.0e12),
    # 8x H100-80GB SXM per node, NVLink 4 (450 GB/s per direction), 400 Gb/s NDR IB per GPU.
    "h100-8x": Cluster(
        name="h100-8x", device_flops=989e12, device_memory=80e9, devices_per_node=8,
        intra_node_bandwidth=450e9, inter_node_bandwidth=50e9, latency=10e-6, device_power=700.0,
        memory_bandwidth=3.35e12),
    # AWS p3.16xlarge: 8x V100-16GB, NVLink, 25 Gb/s between nodes (Alpa's testbed).
    "v100-8x": Cluster(
        name="v100-8x", device_flops=125e12, device_memory=16e9, devices_per_node=8,
        intra_node_bandwidth=150e9, inter_node_bandwidth=25e9 / 8 / 8, latency=20e-6, device_power=300.0,
        memory_bandwidth=0.9e12),
    # TPU v4: 4 chips per host, ICI between all chips of a slice.
    "tpu-v4": Cluster(
        name="tpu-v4", device_flops=275e12, device_memory=32e9, devices_per_node=4,
        intra_node_bandwidth=135e9, inter_node_bandwidth=135e9, latency=5e-6, device_power=192.0,
        memory_bandwidth=1.2e12),
    # TPU v5e: 8 chips per host, 16 GB HBM each.
    "tpu-v5e": Cluster(
        name="tpu-v5e", device_flops=197e12, device_memory=16e9, devices_per_node=8,
        intra_node_bandwidth=100e9, inter_node_bandwidth=100e9, latency=5e-6, device_power=170.0,
        memory_bandwidth=0.82e12),
    # The local CPU with fake devices: all in one node, memory-copy collectives.
    "cpu": Cluster(
        name="cpu", device_flops=50e9, device_memory=16e9, devices_per_node=1024,
        intra_node_bandwidth=10e9, inter_node_bandwidth=10e9, latency=20e-6, device_power=100.0,
        memory_bandwidth=20e9),
}


def get_cluster(cluster: Cluster | str | None) -> Cluster:
    """Resolve a preset name (or None, meaning "cpu") to a `Cluster`."""
    if cluster is None:
        return clusters["cpu"]
    if isinstance(cluster, Cluster):
        return cluster
    if isinstance(cluster, str):
        try:
            return clusters[cluster]
        except KeyError:
            raise ValueError(
                f"unknown cluster preset {cluster!r}; choose one of {sorted(clusters)} "
                "or pass an autoplan.Cluster(...)") from None
    raise TypeError(f"cluster must be an autoplan.Cluster or a preset name, got {type(cluster).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MeshShape:
    """Axis names and sizes of a (possibly abstract) device mesh."""

    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]

    def __post_init__(self):
        if len(self.axis_names) != len(self.axis_sizes):
            raise ValueError("MeshShape: axis_names and axis_sizes differ in length")
        if len(set(self.axis_names)) != len(self.axis_names):
            raise ValueError(f"MeshShape: repeated axis name in {self.axis_names}")

    @classmethod
    def from_mesh(cls, mesh) -> MeshShape:
        """From a `jax.sharding.Mesh`, an `AbstractMesh`, a MeshShape or a {name: size} mapping."""
        if isinstance(mesh, MeshShape):
            return mesh
        if isinstance(mesh, Mapping):
            return cls(axis_names=tuple(mesh), axis_sizes=tuple(int(s) for s in mesh.values()))
        shape = getattr(mesh, "shape", None)
        if isinstance(shape, Mapping):
            return cls(axis_names=tuple(shape), axis_sizes=tuple(int(s) for s in shape.values()))
        raise TypeError(f"expected a jax Mesh or AbstractMesh, got {type(mesh).__name__}")

    @property
    def size(self) -> int:
        return math.prod(self.axis_sizes)

    def axis_size(self, axes: str | Sequence[str]) -> int:
        if isinstance(axes, str):
            axes = (axes,)
        sizes = dict(zip(self.axis_names, self.axis_sizes))
        return math.prod(sizes[a] for a in axes)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.axis_sizes))


@functools.lru_cache(maxsize=4096)
def _crosses_nodes(mesh: MeshShape, axes: tuple[str, ...], devices_per_node: int) -> bool:
    if not axes:
        return False
    ids = np.arange(mesh.size).reshape(mesh.axis_sizes)
    positions = [mesh.axis_names.index(a) for a in axes]
    rest = [i for i in range(len(mesh.axis_sizes)) if i not in positions]
    groups = ids.transpose(rest + positions).reshape(-1, mesh.axis_size(axes))
    nodes = groups // devices_per_node
    return bool(np.any(nodes != nodes[:, :1]))


def group_bandwidth(cluster: Cluster, mesh: MeshShape, axes: Sequence[str]) -> float:
    """Bandwidth (bytes/s per device) of the slowest link a group over ``axes`` crosses."""
    if _crosses_nodes(mesh, tuple(axes), cluster.devices_per_node):
        return cluster.inter_node_bandwidth
    return cluster.intra_node_bandwidth


# Collectives.  ``nbytes`` is always the size of the full (gathered / reduced)
# buffer that each device ends up with or starts from, as in NCCL's accounting.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "p2p")


def collective_bytes(kind: str, nbytes: float, group_size: int) -> float:
    """Bytes each device sends over the wire for one collective (ring algorithms)."""
    n = group_size
    if n <= 1 or nbytes <= 0:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n * nbytes
    if kind in ("all-gather", "reduce-scatter"):
        return (n - 1) / n * nbytes
    if kind == "all-to-all":
        return (n - 1) / n * nbytes
    if kind == "p2p":
        return float(nbytes)
    raise ValueError(f"unknown collective {kind!r}; expected one of {COLLECTIVES}")


def collective_seconds(kind: str, nbytes: float, axes: Sequence[str], mesh: MeshShape,
                       cluster: Cluster) -> float:
    """Alpha-beta time of one collective over mesh ``axes``.

    >>> from autoplan._src.cluster import MeshShape, clusters, collective_seconds
    >>> mesh = MeshShape(axis_names=("data", "model"), axis_sizes=(2, 8))
    >>> t_in = collective_seconds("all-reduce", 1e9, ("model",), mesh, clusters["a100-8x"])
    >>> t_across = collective_seconds("all-reduce", 1e9, ("data",), mesh, clusters["a100-8x"])
    >>> t_across > t_in
    True
    """
    n = mesh.axis_size(axes) if kind != "p2p" else 2
    wire = collective_bytes(kind, nbytes, n)
    if wire == 0.0:
        return 0.0
    return cluster.latency + wire / group_bandwidth(cluster, mesh, axes)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Cost:
    """Predicted per-device cost of a step (or of a piece of one).

    Costs of disjoint pieces of work add field by field, so a plan's cost is
    the sum of its operators' costs (``memory_bytes`` is then a sum of
    footprints: the planner reports the liveness peak for whole plans).

    >>> from autoplan import Cost
    >>> a = Cost(compute_seconds=1.0, communication_seconds=0.5, step_seconds=1.5)
    >>> (a + a).step_seconds
    3.0
    """

    step_seconds: float = 0.0
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    communication_bytes: float = 0.0
    memory_bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                       for f in dataclasses.fields(Cost)})

    def energy_joules(self, cluster: Cluster, num_devices: int) -> float:
        """Energy of one step: device power x step time x devices."""
        return cluster.device_power * self.step_seconds * num_devices

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def calibrate(mesh=None, *, nbytes: int = 1 << 22, repeats: int = 3) -> Cluster:
    """Measure the local devices: matmul FLOP/s and all-reduce bandwidth over the mesh.

    Returns a `Cluster` named "calibrated-<platform>".  On fake CPU devices the
    numbers describe overhead, not parallel speed; use presets to plan for
    real hardware.
    """
    import time

    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    flops = 2 * n**3 * repeats / max(time.perf_counter() - start, 1e-9)

    # Device memory bandwidth: one read and one write of a buffer per elementwise pass.
    buffer = jnp.ones((nbytes // 4,), jnp.float32)
    bump = jax.jit(lambda x: x + 1)
    bump(buffer).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        bump(buffer).block_until_ready()
    memory_bandwidth = 2 * nbytes * repeats / max(time.perf_counter() - start, 1e-9)

    bandwidth = 10e9
    if len(devices) > 1:
        mesh = mesh or jax.make_mesh((len(devices),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
        axis = mesh.axis_names[0]
        elems = nbytes // 4
        x = jax.device_put(jnp.ones((mesh.shape[axis], elems), jnp.float32),
                           jax.NamedSharding(mesh, jax.P(axis)))
        allreduce = jax.jit(lambda v: jnp.sum(v, axis=0), out_shardings=jax.NamedSharding(mesh, jax.P()))
        allreduce(x).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            allreduce(x).block_until_ready()
        seconds = (time.perf_counter() - start) / repeats
        size = mesh.shape[axis]
        bandwidth = collective_bytes("all-reduce", nbytes, size) / max(seconds, 1e-9)
    memory = 16e9
    stats = getattr(devices[0], "memory_stats", lambda: None)()
    if stats and "bytes_limit" in stats:
        memory = float(stats["bytes_limit"])
    return Cluster(name=f"calibrated-{devices[0].platform}", device_flops=flops, device_memory=memory,
                   devices_per_node=len(devices), intra_node_bandwidth=bandwidth,
                   inter_node_bandwidth=bandwidth, latency=20e-6, device_power=100.0,
                   memory_bandwidth=memory_bandwidth)
