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
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    """Hardware description used by the cost model.

    Bandwidths are bytes per second per device; ``latency`` is the fixed cost
    (alpha) of one collective; ``device_power`` is watts per device, used for
    energy estimates.

    ``device_flops`` is the headline peak (the bf16 figure of the presets);
    ``dtype_flops`` the dense peak per operand dtype, keyed by numpy dtype
    name ("bfloat16", "float32", "float8_e4m3fn", "int8", ...) plus "tf32",
    which prices matrix products (`flops_for`).  Left empty, every dtype
    runs at ``device_flops``.  ``platform`` ("gpu", "tpu" or "cpu") says how
    XLA runs float32 products at each `jax.lax.Precision`.

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
    dtype_flops: Mapping[str, float] = dataclasses.field(default_factory=lambda: FrozenMapping({}))
    platform: str = "gpu"

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
        if self.platform not in PLATFORMS:
            raise ValueError(f"Cluster.platform must be one of {PLATFORMS}, got {self.platform!r}")
        for key, value in dict(self.dtype_flops).items():
            if not (isinstance(key, str) and isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Cluster.dtype_flops maps dtype names to positive FLOP/s, got {key!r}: {value!r}")
        object.__setattr__(self, "dtype_flops", FrozenMapping(self.dtype_flops))

    def flops_for(self, dtypes: Sequence[str], precision=None) -> float:
        """Peak FLOP/s of a matrix product (dot_general, convolution) as XLA runs it.

        ``dtypes`` are the operand dtypes, ``precision`` the op's
        ``precision`` parameter: None, a `jax.lax.Precision` (or a pair, one
        per operand), a `jax.lax.DotAlgorithmPreset`, or their names.  As
        JAX documents (its "Matmul precision" page), the Precision levels affect
        float32 operands only: on GPU, DEFAULT and HIGH run as TF32 where the
        device has it (A100, H100; not V100) and HIGHEST as true float32; on
        TPU, DEFAULT is one bfloat16 pass, HIGH three and HIGHEST six; on
        CPU they change nothing.  bf16/fp16/fp8/int8 operands run at their
        own rate; the accumulator type (``preferred_element_type``) does not
        change it (tensor cores accumulate in float32 at the listed rate).
        A named algorithm runs at the rate of its storage types divided by
        its passes (``BF16_BF16_F32_X3``: a third of bf16).  Mixed operands
        run at the slower rate; a dtype or algorithm the table lacks at the
        slowest listed rate, never at a faster one.

        >>> import autoplan
        >>> a100 = autoplan.clusters["a100-8x"]
        >>> [a100.flops_for(d, p) / 1e12 for d, p in [(("bfloat16", "bfloat16"), None),
        ...     (("float32", "float32"), None), (("float32", "float32"), "highest")]]
        [312.0, 156.0, 19.5]
        """
        if not self.dtype_flops:
            return float(self.device_flops)
        dtypes = [d if isinstance(d, str) else np.dtype(d).name for d in dtypes] or ["float32"]
        if isinstance(precision, (tuple, list)):
            names = [_enum_name(p) for p in precision if p is not None]
            if all(n in _PRECISION_LEVELS for n in names):
                level = max((_PRECISION_LEVELS[n] for n in names), default=0)
                return min(self._operand_rate(d, level) for d in dtypes)
            return self._slowest()  # an unknown mix: never cheaper than known
        name = "DEFAULT" if precision is None else _enum_name(precision)
        if name in _PRECISION_LEVELS:
            return min(self._operand_rate(d, _PRECISION_LEVELS[name]) for d in dtypes)
        return self._algorithm_rate(name, dtypes)

    def _slowest(self) -> float:
        return min(self.dtype_flops.values())

    def _listed(self, key: str) -> float:
        """The table's rate for ``key``; the slowest listed rate when it has none."""
        return self.dtype_flops.get(key) or self._slowest()

    def _operand_rate(self, dtype: str, level: int) -> float:
        if dtype == "float32" and self.platform == "tpu":
            return self._listed("bfloat16") / _TPU_PASSES[level]
        if dtype == "float32" and self.platform == "gpu" and level < 2 and "tf32" in self.dtype_flops:
            return self._listed("tf32")
        return self._listed(dtype)

    def _algorithm_rate(self, name: str, dtypes: Sequence[str]) -> float:
        """Rate of a `jax.lax.DotAlgorithmPreset` by name (LHS_RHS_ACCUM[_X<passes>][_FAST_ACCUM])."""
        parts = name.replace("ANY_F8", "F8").removesuffix("_FAST_ACCUM").split("_")
        passes = 1
        if len(parts) == 4 and parts[3].startswith("X") and parts[3][1:].isdigit():
            passes = int(parts.pop()[1:])
        if len(parts) != 3 or any(p not in _ALGORITHM_TYPES for p in parts[:2]):
            return self._slowest()  # a custom algorithm: never cheaper than known
        rates = []
        for part, dtype in zip(parts[:2], list(dtypes) * 2):
            if part == "F8":
                rates.append(self._listed(dtype))
            elif part == "F32":
                rates.append(self._operand_rate("float32", 2))
            else:
                rates.append(self._listed(_ALGORITHM_TYPES[part]))
        return min(rates) / passes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"dtype_flops": dict(self.dtype_flops)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Cluster:
        return cls(**data)


PLATFORMS = ("gpu", "tpu", "cpu")
# jax.lax.Precision levels by name, with the string aliases jax accepts.
_PRECISION_LEVELS = {"DEFAULT": 0, "FASTEST": 0, "BFLOAT16": 0, "HIGH": 1, "BFLOAT16_3X": 1, "TENSORFLOAT32": 1,
                     "HIGHEST": 2, "FLOAT32": 2}
_TPU_PASSES = (1, 3, 6)  # bfloat16 passes of a float32 product at DEFAULT, HIGH, HIGHEST
# Storage types named in jax.lax.DotAlgorithmPreset names ("F8": the operand's own float8 type).
_ALGORITHM_TYPES = {"F8": "", "F16": "float16", "BF16": "bfloat16", "TF32": "tf32", "F32": "float32",
                    "F64": "float64"}


def _enum_name(value) -> str:
    return str(getattr(value, "name", value)).upper()


class FrozenMapping(Mapping):
    """An immutable, hashable mapping (a Cluster is hashable and cached by value)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping):
        self._data = {k: float(v) for k, v in dict(data).items()}

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items())))

    def __repr__(self) -> str:
        return repr(self._data)


# Dense peak FLOP/s per dtype from the vendors' data sheets (no 2:4 sparsity).
_A100 = {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12, "int8": 624e12}
_H100 = {"bfloat16": 989e12, "float16": 989e12, "float8_e4m3fn": 1979e12, "float8_e5m2": 1979e12,
         "tf32": 494.5e12, "float32": 67e12, "int8": 1979e12}
_V100 = {"float16": 125e12, "float32": 15.7e12}  # no bf16 or TF32: bf16 runs at the slowest (fp32) rate

clusters: dict[str, Cluster] = {
    # 8x A100-80GB per node, NVLink 3 (300 GB/s per direction per GPU), 200 Gb/s HDR IB per GPU.
    "a100-8x": Cluster(
        name="a100-8x", device_flops=312e12, device_memory=80e9, devices_per_node=8,
        intra_node_bandwidth=300e9, inter_node_bandwidth=25e9, latency=10e-6, device_power=400.0,
        memory_bandwidth=2.0e12, dtype_flops=_A100),
    # 8x H100-80GB SXM per node, NVLink 4 (450 GB/s per direction), 400 Gb/s NDR IB per GPU.
    "h100-8x": Cluster(
        name="h100-8x", device_flops=989e12, device_memory=80e9, devices_per_node=8,
        intra_node_bandwidth=450e9, inter_node_bandwidth=50e9, latency=10e-6, device_power=700.0,
        memory_bandwidth=3.35e12, dtype_flops=_H100),
    # AWS p3.16xlarge: 8x V100-16GB, NVLink, 25 Gb/s between nodes (Alpa's testbed).
    "v100-8x": Cluster(
        name="v100-8x", device_flops=125e12, device_memory=16e9, devices_per_node=8,
        intra_node_bandwidth=150e9, inter_node_bandwidth=25e9 / 8 / 8, latency=20e-6, device_power=300.0,
        memory_bandwidth=0.9e12, dtype_flops=_V100),
    # TPU v4: 4 chips per host, ICI between all chips of a slice.
    "tpu-v4": Cluster(
        name="tpu-v4", device_flops=275e12, device_memory=32e9, devices_per_node=4,
        intra_node_bandwidth=135e9, inter_node_bandwidth=135e9, latency=5e-6, device_power=192.0,
        memory_bandwidth=1.2e12, dtype_flops={"bfloat16": 275e12}, platform="tpu"),
    # TPU v5e: 8 chips per host, 16 GB HBM each.
    "tpu-v5e": Cluster(
        name="tpu-v5e", device_flops=197e12, device_memory=16e9, devices_per_node=8,
        intra_node_bandwidth=100e9, inter_node_bandwidth=100e9, latency=5e-6, device_power=170.0,
        memory_bandwidth=0.82e12, dtype_flops={"bfloat16": 197e12, "int8": 394e12}, platform="tpu"),
    # TPU v5p: 4 chips per host, 95 GB HBM at 2.76 TB/s, ICI at twice v4's per-chip rate (4800 Gb/s).
    # Power is not published; 300 W is an estimate.
    "tpu-v5p": Cluster(
        name="tpu-v5p", device_flops=459e12, device_memory=95e9, devices_per_node=4,
        intra_node_bandwidth=270e9, inter_node_bandwidth=270e9, latency=5e-6, device_power=300.0,
        memory_bandwidth=2.76e12, dtype_flops={"bfloat16": 459e12, "int8": 918e12}, platform="tpu"),
    # The local CPU with fake devices: all in one node, memory-copy collectives.  The figures are
    # typical of a laptop core; `calibrate()` measures this machine's (float32 and bfloat16 matmuls).
    "cpu": Cluster(
        name="cpu", device_flops=50e9, device_memory=16e9, devices_per_node=1024,
        intra_node_bandwidth=10e9, inter_node_bandwidth=10e9, latency=20e-6, device_power=100.0,
        memory_bandwidth=20e9, dtype_flops={"float32": 50e9}, platform="cpu"),
}

# Substrings of `jax.Device.device_kind` (lower case) and the preset that describes the device;
# the first match wins ("TPU v5 lite" is a v5e, plain "TPU v5" a v5p).
_DEVICE_PRESETS = (
    ("a100", "a100-8x"), ("h100", "h100-8x"), ("h200", "h100-8x"), ("v100", "v100-8x"),
    ("tpu v4", "tpu-v4"), ("tpu v5 lite", "tpu-v5e"), ("tpu v5e", "tpu-v5e"), ("tpu v5p", "tpu-v5p"),
    ("tpu v5", "tpu-v5p"),
)


def preset_for_device(device_kind: str) -> str:
    """The preset describing a device, from its ``jax.Device.device_kind``; "cpu" if no preset does.

    H200s get "h100-8x" (the same compute; planning within 80 GB of their
    141 GB is conservative).

    >>> from autoplan._src.cluster import preset_for_device
    >>> [preset_for_device(k) for k in ("NVIDIA A100-SXM4-80GB", "NVIDIA H200", "TPU v5 lite", "TPU v5", "cpu")]
    ['a100-8x', 'h100-8x', 'tpu-v5e', 'tpu-v5p', 'cpu']
    """
    kind = device_kind.lower()
    return next((preset for needle, preset in _DEVICE_PRESETS if needle in kind), "cpu")


_WARNED_KINDS: set[str] = set()


def default_cluster() -> tuple[Cluster, str]:
    """The preset of the devices this process runs on, and a note saying how it was chosen.

    A known GPU or TPU gets its preset, anything else "cpu" (with a warning
    when the device is an accelerator without a preset).
    """
    import jax

    device = jax.devices()[0]
    name = preset_for_device(device.device_kind)
    if name == "cpu" and device.platform != "cpu" and device.device_kind not in _WARNED_KINDS:
        _WARNED_KINDS.add(device.device_kind)
        warnings.warn(f"autoplan has no cluster preset for device kind {device.device_kind!r}; planning "
                      "with the 'cpu' preset. Pass cluster= a preset name, an autoplan.Cluster(...) or "
                      "autoplan.calibrate()", stacklevel=3)
    return clusters[name], f"chosen automatically from device kind {device.device_kind!r}"


def resolve_cluster(cluster: Cluster | str | None) -> tuple[Cluster, str]:
    """`get_cluster`, and how the cluster was chosen ("" when the caller named it)."""
    if cluster is None:
        return default_cluster()
    return get_cluster(cluster), ""


def get_cluster(cluster: Cluster | str | None) -> Cluster:
    """Resolve a preset name (or None: the preset of the local devices, `default_cluster`) to a `Cluster`."""
    if cluster is None:
        return default_cluster()[0]
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
    """Measure the local devices: matmul FLOP/s per dtype and all-reduce bandwidth over the mesh.

    Returns a `Cluster` named "calibrated-<platform>" whose ``dtype_flops``
    holds the measured float32 (``precision="highest"``) and bfloat16
    matmul rates, and on GPU the float32 rate at the default precision as
    "tf32" (what XLA runs it as); ``device_flops`` is the fastest of them.
    On fake CPU devices the numbers describe overhead, not parallel speed;
    use presets to plan for real hardware.
    """
    import time

    import jax
    import jax.numpy as jnp

    def timed(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn(*args))
        return max(time.perf_counter() - start, 1e-9) / repeats

    devices = jax.devices()
    platform = devices[0].platform if devices[0].platform in PLATFORMS else "gpu"
    n = 1024
    matmuls = {"float32": (jnp.float32, "highest"), "bfloat16": (jnp.bfloat16, None)}
    if platform == "gpu":
        matmuls["tf32"] = (jnp.float32, None)
    dtype_flops = {}
    for key, (dtype, precision) in matmuls.items():
        a = jnp.ones((n, n), dtype)
        dtype_flops[key] = 2 * n**3 / timed(jax.jit(lambda x, p=precision: jnp.matmul(x, x, precision=p)), a)

    # Device memory bandwidth: one read and one write of a buffer per elementwise pass.
    buffer = jnp.ones((nbytes // 4,), jnp.float32)
    memory_bandwidth = 2 * nbytes / timed(jax.jit(lambda x: x + 1), buffer)

    bandwidth = 10e9
    if len(devices) > 1:
        mesh = mesh or jax.make_mesh((len(devices),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
        axis = mesh.axis_names[0]
        elems = nbytes // 4
        x = jax.device_put(jnp.ones((mesh.shape[axis], elems), jnp.float32),
                           jax.NamedSharding(mesh, jax.P(axis)))
        allreduce = jax.jit(lambda v: jnp.sum(v, axis=0), out_shardings=jax.NamedSharding(mesh, jax.P()))
        bandwidth = collective_bytes("all-reduce", nbytes, mesh.shape[axis]) / timed(allreduce, x)
    memory = 16e9
    stats = getattr(devices[0], "memory_stats", lambda: None)()
    if stats and "bytes_limit" in stats:
        memory = float(stats["bytes_limit"])
    return Cluster(name=f"calibrated-{devices[0].platform}", device_flops=max(dtype_flops.values()),
                   device_memory=memory, devices_per_node=len(devices), intra_node_bandwidth=bandwidth,
                   inter_node_bandwidth=bandwidth, latency=20e-6, device_power=100.0,
                   memory_bandwidth=memory_bandwidth, dtype_flops=dtype_flops, platform=platform)
