"""What XLA actually compiled, priced with the cluster's alpha-beta model.

The planner predicts a plan's cost from the jaxpr; this module is the
yardstick: it reads the optimized, SPMD-partitioned HLO of a compiled program
(``jax.jit(f).lower(*args).compile()``), finds every collective in it, and
prices the program with the same `Cluster` and the same collective formulas
(`autoplan._src.cluster.collective_seconds`) that the planner uses.

Conventions (they match `autoplan._src.cluster`):

* Shapes are per device, as the partitioned HLO prints them.
* ``HloCollective.nbytes`` is the size of the *full* buffer in the sense of
  ``cluster.collective_bytes``: the gathered result of an all-gather, the
  un-scattered input of a reduce-scatter (result bytes x group size), the
  buffer of an all-reduce, the per-device buffer of an all-to-all, and the
  buffer one device sends in a collective-permute (priced as ``"p2p"``).
* A combined (tuple-shaped) collective gives one `HloCollective` per tuple
  element, all with the same ``name``; its alpha (latency) is charged once,
  on the summed bytes, because XLA launches it once.
* Asynchronous pairs are counted at their ``-start`` half; ``-done`` halves
  are skipped.  Collectives wrapped by ``async-start`` live in their own
  called computation and are counted there, once.
* Collectives inside while-loop bodies are counted once per iteration:
  ``HloCollective.repeats`` is the product of the ``known_trip_count`` of the
  loops around it (1 where XLA printed none), and `communication_seconds`
  and ``CompiledReport.communication_bytes`` multiply by it.  XLA's own
  ``cost_analysis()`` counts a while body once; `kernels` does not.
* Device ids in the HLO (``replica_groups``, ``source_target_pairs``) are
  logical ids: the position of the device in the compiled device assignment,
  which for ``jax.jit`` over a mesh is ``mesh.devices.flat`` order, whatever
  the physical device ids are.  So by default id == row-major mesh position;
  ``device_positions`` can map other ids.  With one replica (every
  ``jax.jit`` program) partition ids and global device ids coincide, so ``channel_id`` and ``use_global_device_ids`` need no reading;
  ``replica_groups`` may be explicit (``{{0,1},{2,3}}``), iota
  (``[2,4]<=[8]``, ``[4,2]<=[2,4]T(1,0)``) or XLA's mesh-axes form
  (``mesh['axis_0'=2,'axis_1'=4] {'axis_1'}``, with optional
  ``device_ids=(...)`` and sub-axes ``'axis_0':(2)2``); absent or ``{}``
  means all devices.
* The mesh axes of a group are the axes along which its members' mesh
  coordinates differ.  When the group is smaller than those axes together
  (a sub-axis group, e.g. 2 devices of a size-4 axis), the collective is
  priced with its true group size over the bandwidth of those axes.
* Not counted: ``ragged-all-to-all``, ``collective-broadcast`` and
  host transfers (``send``/``recv``); autoplan's plans do not emit them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from autoplan._src import cluster as C

__all__ = ["HloCollective", "HloKernel", "CompiledReport", "collectives", "communication_seconds", "compiled_report",
           "kernels", "roofline_seconds", "sliced_all_reduces", "with_reduce_scatters"]

# Opcode as printed -> kind reported.  ``-done`` halves are deliberately absent.
_OPCODES = {
    "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce",
    "all-gather": "all-gather",
    "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "reduce-scatter-start": "reduce-scatter",
    "all-to-all": "all-to-all",
    "all-to-all-start": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute",
}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Bits per element of HLO primitive types; others are read from the digits in the name.
_BITS = {"pred": 8, "token": 0, "c64": 64, "c128": 128, "tuple": 0, "opaque": 0}


def _cluster_kind(kind: str) -> str:
    return "p2p" if kind == "collective-permute" else kind


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HloCollective:
    """One collective (one tuple element of one) in optimized HLO.

    ``shape`` and ``dtype`` ("f32", "bf16", ... as HLO spells them) are the
    per-device array this record describes; ``nbytes`` follows the
    conventions of `autoplan._src.cluster` (see the module docstring);
    ``index`` is the tuple element of a combined collective (None when the
    instruction is not tuple-shaped); ``computation`` is the HLO computation
    it is written in (the entry, or a loop body, ...).
    """

    kind: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    group_size: int
    axes: tuple[str, ...]
    index: int | None = None
    computation: str = ""
    repeats: int = 1  # known trip counts of the while loops around it

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends for this element (``cluster.collective_bytes``)."""
        kind = _cluster_kind(self.kind)
        n = 2 if kind == "p2p" and self.group_size > 1 else self.group_size
        return C.collective_bytes(kind, self.nbytes, n)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["axes"] = list(self.axes)
        return d


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CompiledReport:
    """Per-device cost of a compiled program under a cluster model.

    ``flops`` and ``bytes_accessed`` come from XLA's ``cost_analysis()``,
    which reports the per-device (partitioned) program.  ``memory_bytes`` is
    XLA's buffer-assignment peak (``memory_analysis().peak_memory_in_bytes``,
    live arguments, outputs and temporaries at the worst point); where a JAX
    version lacks it, or reports less than the temporaries alone (XLA:CPU
    gives arguments + outputs for some programs: 1.9 GiB for a GPT step whose
    temporaries take 9.4 GiB), ``argument + output + temp - alias``, which is
    an upper bound.  Generated code is reported apart and not counted.
    ``step_seconds = compute_seconds + communication_seconds``, no overlap.
    ``compute_seconds`` is the per-kernel roofline of the fused program
    (`roofline_seconds` over `kernels`: each kernel takes the longer of its
    FLOPs at the matmul rate and its bytes at ``memory_bandwidth``, as in
    XLA's GPU performance model), loop bodies times their trip counts.
    ``flops`` and ``bytes_accessed`` are XLA's totals, a while body once.
    """

    cluster: str
    flops: float
    bytes_accessed: float
    memory_bytes: float
    argument_bytes: float
    output_bytes: float
    temp_bytes: float
    alias_bytes: float
    generated_code_bytes: float
    collectives: tuple[HloCollective, ...]
    communication_bytes: float
    communication_seconds: float
    compute_seconds: float
    step_seconds: float

    def cost(self) -> C.Cost:
        """The same numbers as a `Cost`, to compare with ``plan.cost``."""
        return C.Cost(step_seconds=self.step_seconds, compute_seconds=self.compute_seconds,
                      communication_seconds=self.communication_seconds,
                      communication_bytes=self.communication_bytes, memory_bytes=self.memory_bytes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["collectives"] = [c.to_dict() for c in self.collectives]
        return d


# ----------------------------------------------------------------------------- text scanning

_COMMENT = re.compile(r"/\*.*?\*/")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=%]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_OPCODE = re.compile(r"\s*(?P<op>[a-z][a-z0-9\-]*)\(")
_INTS = re.compile(r"-?\d+")
_COLLECTIVE_CALL = re.compile(r"(?<![%\w.\-])(?:" + "|".join(sorted(_OPCODES, key=len, reverse=True)) + r")\(")
_CLOSE = {"(": ")", "[": "]", "{": "}"}


def _match_close(text: str, start: int) -> int:
    """Index just past the bracket that closes ``text[start]``."""
    opening = text[start]
    closing = _CLOSE[opening]
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == opening:
            depth += 1
        elif ch == closing:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {opening!r} in HLO text: {text[start:start + 80]!r}")


def _parse_shape(text: str, i: int = 0):
    """Parse an HLO shape at ``text[i]``: (dtype, dims) for an array, a list for a tuple."""
    while text[i] == " ":
        i += 1
    if text[i] == "(":
        elements = []
        i += 1
        while True:
            while text[i] in " ,":
                i += 1
            if text[i] == ")":
                return elements, i + 1
            element, i = _parse_shape(text, i)
            elements.append(element)
    m = _ARRAY.match(text, i)
    if not m:
        raise ValueError(f"cannot read an HLO shape at {text[i:i + 60]!r}")
    dims = tuple(_dim(d) for d in m.group("dims").split(",") if d.strip())
    i = m.end()
    if i < len(text) and text[i] == "{":  # layout
        i = _match_close(text, i)
    return (m.group("dtype"), dims), i


def _dim(text: str) -> int:
    """``64``, or the bound of a dynamic ``<=64``; an unbounded ``?`` counts as 0."""
    m = _INTS.search(text)
    return int(m.group()) if m else 0


def _flatten(shape) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(shape, list):
        return [leaf for element in shape for leaf in _flatten(element)]
    return [shape]


def _bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    m = re.search(r"\d+", dtype)
    if not m:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return int(m.group())


def _array_bytes(dtype: str, dims: Sequence[int]) -> int:
    return math.prod(dims) * _bits(dtype) // 8


def _attribute(attrs: str, key: str) -> str | None:
    """Raw text of VALUE in ``key=VALUE`` (bracketed, or up to the next comma)."""
    m = re.search(rf"(?:^|[\s,]){re.escape(key)}=", attrs)
    if not m:
        return None
    i = m.end()
    if i < len(attrs) and attrs[i] in _CLOSE:
        return attrs[i:_match_close(attrs, i)]
    end = attrs.find(",", i)
    return attrs[i:len(attrs) if end < 0 else end].strip()


def _nested_ints(text: str) -> list[list[int]]:
    """``{{0,1},{2,3}}`` -> [[0, 1], [2, 3]]."""
    return [[int(x) for x in _INTS.findall(group)] for group in re.findall(r"\{([^{}]*)\}", text[1:-1])]


def _iota(dims: Sequence[int], reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    array = np.arange(math.prod(reshape)).reshape(reshape)
    if perm is not None:
        array = array.transpose(perm)
    return array.reshape(dims)


_IOTA_GROUPS = re.compile(r"\[(?P<dims>[\d,]+)\]<=\[(?P<reshape>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?")
_TILE = re.compile(r"\[(?P<reshape>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?$")


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in text.split(",") if x]


def _device_array(text: str, count: int) -> np.ndarray:
    """A mesh's ``device_ids=(...)``: an iota tile (``[2,4]T(1,0)``) or an explicit list."""
    text = text.strip()
    m = _IOTA_GROUPS.fullmatch(text)
    if m:
        return _iota([count], _ints(m["reshape"]), _ints(m["perm"]))
    m = _TILE.match(text)
    if m:
        return _iota([count], _ints(m["reshape"]), _ints(m["perm"]))
    ids = [int(x) for x in _INTS.findall(text)]
    if len(ids) != count:
        raise ValueError(f"cannot read mesh device_ids=({text})")
    return np.array(ids)


_MESH_AXIS = re.compile(r"'?(?P<name>[^'=,\s]+)'?=(?P<size>\d+)")
_AXIS_REF = re.compile(r"'?(?P<name>[^',:\s{}]+)'?(?::\((?P<pre>\d+)\)(?P<size>\d+))?")


def _mesh_groups(text: str) -> np.ndarray:
    """Groups of XLA's mesh-axes form: ``mesh['a'=2,'b'=4], device_ids=(...) {'b'}``."""
    m = re.match(r"mesh\[(?P<axes>[^\]]*)\]", text)
    if not m:
        raise ValueError(f"cannot read replica_groups={text!r}")
    axes = [(a["name"], int(a["size"])) for a in _MESH_AXIS.finditer(m["axes"])]
    names = [n for n, _ in axes]
    sizes = [s for _, s in axes]
    count = math.prod(sizes)
    rest = text[m.end():]
    devices = np.arange(count)
    d = re.match(r"\s*,\s*device_ids=", rest)
    if d:
        start = d.end()
        end = _match_close(rest, start)
        devices = _device_array(rest[start + 1:end - 1], count)
        rest = rest[end:]
    brace = rest.find("{")
    refs = [r for r in _AXIS_REF.finditer(rest[brace + 1:_match_close(rest, brace) - 1]) if r["name"]]
    by_dim: dict[int, list[tuple[int | None, int]]] = {}
    for r in refs:
        dim = names.index(r["name"])
        by_dim.setdefault(dim, []).append((int(r["pre"]), int(r["size"])) if r["pre"] else (None, sizes[dim]))
    # Reshape every mesh dim that sub-axes split, then group over the referenced (sub-)axes.
    new_sizes: list[int] = []
    grouped: list[int] = []
    for dim, size in enumerate(sizes):
        parts = by_dim.get(dim)
        if not parts:
            new_sizes.append(size)
            continue
        if any(pre is None for pre, _ in parts):
            grouped.append(len(new_sizes))
            new_sizes.append(size)
            continue
        prefix = 1
        for pre, sub in sorted(parts):
            if pre != prefix:
                new_sizes.append(pre // prefix)
                prefix = pre
            grouped.append(len(new_sizes))
            new_sizes.append(sub)
            prefix *= sub
        if prefix != size:
            new_sizes.append(size // prefix)
    group_size = math.prod(new_sizes[g] for g in grouped)
    order = [i for i in range(len(new_sizes)) if i not in grouped] + grouped
    return devices.reshape(new_sizes).transpose(order).reshape(-1, group_size)


def _replica_groups(attrs: str, num_devices: int) -> np.ndarray | list[list[int]]:
    """Device-id groups of ``replica_groups=``: explicit, iota or mesh-axes form; absent or ``{}``: all."""
    m = re.search(r"(?:^|[\s,])replica_groups=", attrs)
    if m is None:
        return [list(range(num_devices))]
    i = m.end()
    if attrs.startswith("mesh[", i):
        end = _match_close(attrs, i + len("mesh"))
        d = re.match(r"\s*,\s*device_ids=", attrs[end:])
        if d:
            end = _match_close(attrs, end + d.end())
        end = _match_close(attrs, attrs.index("{", end))
        return _mesh_groups(attrs[i:end])
    if attrs.startswith("{", i):
        groups = _nested_ints(attrs[i:_match_close(attrs, i)])
        return groups or [list(range(num_devices))]
    iota = _IOTA_GROUPS.match(attrs, i)
    if iota:
        dims = _ints(iota["dims"])
        return _iota(dims, _ints(iota["reshape"]), _ints(iota["perm"])).reshape(dims[0], -1)
    raise ValueError(f"cannot read replica_groups={attrs[i:i + 80]!r}")


def _module_devices(text: str) -> int | None:
    """Devices the module runs on (``num_partitions x replica_count`` of its header), if it says."""
    header = text.split("\n", 1)[0]
    partitions = re.search(r"num_partitions=(\d+)", header)
    replicas = re.search(r"replica_count=(\d+)", header)
    if not partitions and not replicas:
        return None
    return (int(partitions.group(1)) if partitions else 1) * (int(replicas.group(1)) if replicas else 1)


# ----------------------------------------------------------------------------- mesh axes of a group


def _positions(ids, device_positions) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if device_positions is None:
        return ids
    return np.vectorize(lambda i: device_positions[int(i)], otypes=[np.int64])(ids)


def _group_axes(groups, mesh: C.MeshShape, device_positions) -> tuple[tuple[str, ...], int]:
    """Mesh axes along which the groups' members differ, and the group size."""
    sizes = {len(g) for g in groups}
    group_size = max(sizes) if sizes else 1
    if group_size <= 1:
        return (), 1
    varying = np.zeros(len(mesh.axis_sizes), dtype=bool)
    for group in groups:
        pos = _positions(list(group), device_positions)
        if pos.min() < 0 or pos.max() >= mesh.size:
            raise ValueError(f"device {int(pos.max())} of an HLO replica group is outside the mesh "
                             f"{mesh.as_dict()} ({mesh.size} devices): pass the mesh the program was compiled for")
        coords = np.stack(np.unravel_index(pos, mesh.axis_sizes))
        varying |= np.any(coords != coords[:, :1], axis=1)
    return tuple(a for a, v in zip(mesh.axis_names, varying) if v), group_size


# ----------------------------------------------------------------------------- public API


def _hlo_text(compiled_or_text) -> str:
    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    if not isinstance(text, str) or "HloModule" not in text[:200]:
        raise ValueError("expected optimized HLO text (compiled.as_text() of jax.jit(f).lower(...).compile()), "
                         "not StableHLO from Lowered.as_text()")
    return text


def collectives(compiled_or_text, mesh, *, device_positions: Mapping[int, int] | Sequence[int] | None = None,
                ) -> list[HloCollective]:
    """Every collective in optimized HLO, one record per (tuple element of a) collective, in text order.

    ``compiled_or_text`` is a ``jax.stages.Compiled`` or the text of its
    ``as_text()``; ``mesh`` a jax ``Mesh``/``AbstractMesh``, a `MeshShape` or
    ``{axis: size}``; ``device_positions`` maps HLO device ids to row-major
    mesh positions (default: identity, right for ``jax.jit``).

    >>> text = '''HloModule m, num_partitions=4
    ... ENTRY %main (p: f32[8]) -> f32[8] {
    ...   %p = f32[8]{0} parameter(0)
    ...   ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups={{0,1},{2,3}}, to_apply=%add
    ... }'''
    >>> [(c.kind, c.nbytes, c.axes) for c in collectives(text, {"data": 2, "model": 2})]
    [('all-reduce', 32, ('model',))]
    """
    text = _hlo_text(compiled_or_text)
    return _with_repeats(_scan_collectives(text, mesh, device_positions), _computation_repeats(*_computations(text)))


def _with_repeats(colls: list[HloCollective], repeats: Mapping[str, int]) -> list[HloCollective]:
    """Each collective with the trip count of the loops around its computation."""
    return [dataclasses.replace(c, repeats=repeats[c.computation]) if repeats.get(c.computation, 1) != 1 else c
            for c in colls]


def _scan_collectives(text: str, mesh, device_positions) -> list[HloCollective]:
    mesh = C.MeshShape.from_mesh(mesh)
    num_devices = _module_devices(text) or mesh.size
    out: list[HloCollective] = []
    computation = ""
    for raw in text.splitlines():
        if raw and not raw[0].isspace():
            if raw.rstrip().endswith("{"):
                computation = raw.split()[1 if raw.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _INSTRUCTION.match(raw)
        if not m:
            continue
        line = _STRING.sub('""', _COMMENT.sub("", m["rest"]))
        if not _COLLECTIVE_CALL.search(line):
            continue
        try:
            shape, i = _parse_shape(line)
        except (ValueError, IndexError) as e:
            raise ValueError(f"cannot read the shape of HLO instruction {m['name']!r}: {line[:120]!r}") from e
        op = _OPCODE.match(line, i)
        if not op or op["op"] not in _OPCODES:
            continue
        kind = _OPCODES[op["op"]]
        attrs = line[_match_close(line, op.end() - 1):]
        if op["op"].endswith("-start") and isinstance(shape, list) and (
                kind != "all-reduce" or (len(shape) == 2 and isinstance(shape[0], list))):
            # (operands, results[, contexts]): the results.  An all-reduce-start is either
            # that pair (GPU: ``((f32[n]), f32[n])``) or, in older XLA, the results alone.
            shape = shape[1]
        is_tuple = isinstance(shape, list)
        leaves = _flatten(shape)
        if kind == "collective-permute":
            found = _attribute(attrs, "source_target_pairs")
            pairs = [p for p in (_nested_ints(found) if found else []) if len(p) == 2 and p[0] != p[1]]
            axes, group_size = _group_axes(pairs, mesh, device_positions)
            group_size = 2 if pairs else 1
        else:
            axes, group_size = _group_axes(_replica_groups(attrs, num_devices), mesh, device_positions)
        for index, (dtype, dims) in enumerate(leaves):
            nbytes = _array_bytes(dtype, dims)
            if kind == "reduce-scatter":
                nbytes *= group_size
            out.append(HloCollective(kind=kind, name=m["name"], dtype=dtype, shape=dims, nbytes=nbytes,
                                     group_size=group_size, axes=axes, index=index if is_tuple else None,
                                     computation=computation))
    return out


def _instruction_seconds(elements: Sequence[HloCollective], mesh: C.MeshShape, cluster: C.Cluster) -> float:
    """Alpha-beta seconds of one (possibly combined) collective instruction."""
    first = elements[0]
    if first.group_size <= 1 or not first.axes:
        return 0.0
    kind = _cluster_kind(first.kind)
    nbytes = sum(e.nbytes for e in elements)
    if kind == "p2p" or mesh.axis_size(first.axes) == first.group_size:
        return C.collective_seconds(kind, nbytes, first.axes, mesh, cluster)
    # A group over part of its axes: its own size, the bandwidth of the axes it spans.
    wire = C.collective_bytes(kind, nbytes, first.group_size)
    return cluster.latency + wire / C.group_bandwidth(cluster, mesh, first.axes) if wire else 0.0


def communication_seconds(colls: Sequence[HloCollective], mesh, cluster) -> float:
    """Sum of alpha-beta seconds, one alpha per instruction (tuple elements share theirs)."""
    mesh = C.MeshShape.from_mesh(mesh)
    cluster = C.get_cluster(cluster)
    by_instruction: dict[tuple[str, str], list[HloCollective]] = {}
    for c in colls:
        by_instruction.setdefault((c.computation, c.name), []).append(c)
    return sum(_instruction_seconds(elements, mesh, cluster) * elements[0].repeats
               for elements in by_instruction.values())


def _total_wire_bytes(colls: Sequence[HloCollective]) -> float:
    return float(sum(c.wire_bytes * c.repeats for c in colls))


def _cost_analysis(compiled) -> dict[str, float]:
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {}
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = next((a for a in analysis if a), {})
    return dict(analysis or {})


def _memory_analysis(compiled) -> dict[str, float]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        stats = None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes", "peak_memory_in_bytes")
    return {f: float(getattr(stats, f, 0) or 0) for f in fields}


_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64", "s8": "int8",
               "u8": "uint8", "f8e4m3fn": "float8_e4m3fn", "f8e5m2": "float8_e5m2"}
_MATMUL = re.compile(r"=\s*[a-z0-9]+\[[^\]]*\][^=]*?\s(?:dot|convolution)\((?P<operands>[^)]*)\)(?P<attrs>[^\n]*)")


def matmul_rate(text: str, cluster: C.Cluster) -> float:
    """FLOP/s at which ``cluster`` runs the program's matrix products (the slowest of its dots and convolutions).

    Reads each ``dot``/``convolution`` instruction's operand types and
    ``operand_precision``, priced by `Cluster.flops_for` as the planner prices
    the same ops, so an fp32 program on an A100 preset is charged TF32, not bf16.
    A program with no matrix product runs at ``device_flops``.  Operand types
    come from the instruction where printed, else from its result (XLA:CPU
    computes bf16 dots in f32 and prints neither; `compiled_report` takes
    ``matmul_dtypes`` for such programs).

    >>> import autoplan
    >>> text = "%d = f32[8,8]{1,0} dot(f32[8,4]{1,0} %a, f32[4,8]{1,0} %b), lhs_contracting_dims={1}"
    >>> matmul_rate(text, autoplan.clusters["a100-8x"]) / 1e12
    156.0
    """
    rates = []
    for match in _MATMUL.finditer(text):
        dtypes = [_HLO_DTYPES.get(d, d) for d in re.findall(r"([a-z0-9]+)\[", match.group("operands"))] \
            or [_HLO_DTYPES.get(d, d) for d in re.findall(r"=\s*([a-z0-9]+)\[", match.group(0))[:1]]
        precision = "highest" if "operand_precision={highest" in match.group("attrs") else None
        rates.append(cluster.flops_for(dtypes, precision))
    return min(rates) if rates else float(cluster.device_flops)


def compiled_report(compiled, mesh, cluster: C.Cluster | str | None = None, *,
                    device_positions: Mapping[int, int] | Sequence[int] | None = None,
                    matmul_dtypes: Sequence[str] | None = None) -> CompiledReport:
    """Price a compiled program: XLA's flops and memory, its collectives under ``cluster``.

    ``compiled`` is a ``jax.stages.Compiled`` (``jax.jit(f).lower(*args).compile()``);
    ``mesh`` the mesh it was compiled for; ``cluster`` a `Cluster` or preset
    name (default "cpu").  All numbers are per device.  FLOPs run at the
    rate of the program's matrix products (`matmul_rate`), or of
    ``matmul_dtypes`` where given.
    """
    mesh = C.MeshShape.from_mesh(mesh)
    cluster = C.get_cluster(cluster)
    text = _hlo_text(compiled)  # printing and parsing a large module are slow: once each
    computations, entry = _computations(text)
    colls = tuple(_with_repeats(_scan_collectives(text, mesh, device_positions),
                                _computation_repeats(computations, entry)))
    costs = _cost_analysis(compiled)
    memory = _memory_analysis(compiled)
    flops = float(costs.get("flops", 0.0))
    upper = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] + memory["temp_size_in_bytes"]
             - memory["alias_size_in_bytes"])
    peak = memory["peak_memory_in_bytes"]
    if peak < memory["temp_size_in_bytes"]:  # XLA:CPU reports arguments + outputs alone: not a peak
        peak = 0.0
    bytes_accessed = float(costs.get("bytes accessed", 0.0))
    rate = cluster.flops_for(matmul_dtypes) if matmul_dtypes else matmul_rate(text, cluster)
    compute = roofline_seconds(_walk_kernels(computations, entry, 1, frozenset()), cluster, rate)
    comm = communication_seconds(colls, mesh, cluster)
    return CompiledReport(
        cluster=cluster.name, flops=flops, bytes_accessed=bytes_accessed,
        memory_bytes=peak or upper,
        argument_bytes=memory["argument_size_in_bytes"], output_bytes=memory["output_size_in_bytes"],
        temp_bytes=memory["temp_size_in_bytes"], alias_bytes=memory["alias_size_in_bytes"],
        generated_code_bytes=memory["generated_code_size_in_bytes"],
        collectives=colls, communication_bytes=_total_wire_bytes(colls),
        communication_seconds=comm, compute_seconds=compute, step_seconds=compute + comm)


# ----------------------------------------------------------------------------- reduce-scatters

_REF = re.compile(r"%([\w.\-]+)")
_GTE = re.compile(r"get-tuple-element\(%(?P<src>[\w.\-]+)\),\s*index=(?P<index>\d+)")


def sliced_all_reduces(compiled_or_text, colls: Sequence[HloCollective]) -> set[tuple[str, str, int | None]]:
    """All-reduce elements whose every user keeps only this device's 1/n slice (``partition-id`` offsets).

    That is a reduce-scatter written as all-reduce + dynamic-slice: XLA's GPU
    pipeline rewrites it into a reduce-scatter (ReduceScatterCreator), the CPU
    pipeline leaves it as an all-reduce (2x the wire bytes).  Returns
    (computation, instruction, tuple index) keys of ``colls`` (from `collectives`).
    """
    text = _hlo_text(compiled_or_text)
    lines: dict[str, str] = {}
    operands: dict[str, set[str]] = {}
    users: dict[str, list[str]] = {}
    gtes: dict[tuple[str, int], list[str]] = {}
    from_pid: set[str] = set()  # partition-id and scalars computed from it (slice offsets)
    for raw in text.splitlines():
        m = _INSTRUCTION.match(raw)
        if not m:
            continue
        name, rest = m["name"], m["rest"]
        lines[name] = rest
        refs = set(_REF.findall(rest.split(", metadata=")[0]))
        operands[name] = refs
        for ref in refs:
            users.setdefault(ref, []).append(name)
        g = _GTE.search(rest)
        if g:
            gtes.setdefault((g["src"], int(g["index"])), []).append(name)
        if " partition-id()" in rest or (re.match(r"[a-z0-9]+\[\]", rest) and refs & from_pid):
            from_pid.add(name)
    from_pid |= _loop_carried(text, from_pid, gtes)
    out = set()
    for c in colls:
        if c.kind != "all-reduce" or c.group_size <= 1:
            continue
        values = gtes.get((c.name, c.index), []) if c.index is not None else [c.name]
        consumers = [u for v in values for u in users.get(v, [])]
        if not consumers:
            continue
        elements = math.prod(c.shape)
        ok = True
        for u in consumers:
            rest = lines.get(u, "")
            try:
                shape, _ = _parse_shape(rest)
            except (ValueError, IndexError):
                ok = False
                break
            if isinstance(shape, list) or not (operands.get(u, set()) & from_pid or "dynamic-slice(" in rest) \
                    or math.prod(shape[1]) * c.group_size != elements:
                ok = False
                break
        if ok:
            out.add((c.computation, c.name, c.index))
    return out


def _loop_carried(text: str, values: set[str], gtes: Mapping[tuple[str, int], list[str]]) -> set[str]:
    """The names a while body reads ``values`` by: XLA hoists ``partition-id`` out of a loop and hands the
    offsets it computes to the body in the loop's tuple, where the body's slices read them."""
    comps, _ = _computations(text)
    defined = {i.name: i for instrs in comps.values() for i in instrs}
    found: set[str] = set()
    for instrs in comps.values():
        for loop in instrs:
            init = defined.get(loop.operands[0]) if loop.opcode == "while" and loop.operands else None
            if init is None or init.opcode != "tuple":
                continue
            body = comps.get(next(iter(_called(loop.attrs, "body")), ""), [])
            param = next((i.name for i in body if i.opcode == "parameter"), None)
            for index, operand in enumerate(init.operands):
                if operand in values:
                    found.update(gtes.get((param, index), []))
    return found


def with_reduce_scatters(report: CompiledReport, sliced: set, mesh, cluster) -> CompiledReport:
    """``report`` with the ``sliced`` all-reduce elements priced as the reduce-scatters a GPU build runs.

    ``sliced`` comes from `sliced_all_reduces`.  Compute and memory are
    unchanged; each re-priced element keeps its own alpha-beta latency.
    """
    mesh = C.MeshShape.from_mesh(mesh)
    cluster = C.get_cluster(cluster)
    colls = tuple(dataclasses.replace(c, kind="reduce-scatter", name=c.name + "#rs")
                  if (c.computation, c.name, c.index) in sliced else c for c in report.collectives)
    comm = communication_seconds(colls, mesh, cluster)
    return dataclasses.replace(report, collectives=colls, communication_bytes=_total_wire_bytes(colls),
                               communication_seconds=comm, step_seconds=report.compute_seconds + comm)


# ----------------------------------------------------------------------------- per-kernel roofline

@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HloKernel:
    """One kernel of a compiled program: what it computes and moves, and how many times it runs.

    ``flops`` counts dot and convolution products (2 per multiply-add) as
    ``matmul_flops`` and one per element of every other arithmetic
    instruction, as XLA's ``HloCostAnalysis`` does; ``bytes`` is what the
    kernel reads and writes in device memory (operands + results, a slice of
    an operand where the kernel only slices it, through bitcasts or not, the
    update of an in-place ``dynamic-update-slice``).  ``repeats`` is the
    product of the ``known_trip_count`` of the while loops around it.
    """

    name: str
    opcode: str
    flops: float
    matmul_flops: float
    bytes: float
    repeats: int = 1


_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
              "replica-id", "opt-barrier", "add-dependency", "domain", "copy-done", "send-done", "recv-done"}
_NO_FLOPS = {"copy", "transpose", "reshape", "broadcast", "slice", "dynamic-slice", "dynamic-update-slice",
             "concatenate", "pad", "iota", "convert", "reverse", "gather", "scatter", "select", "bitcast-convert",
             "copy-start", "sort", "rng", "rng-bit-generator", "custom-call", "fusion", "call", "while",
             "conditional", "reduce-precision", "compare", "and", "or", "not", "xor", "clamp"} | _NO_KERNEL
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "sqrt",
                   "rsqrt", "cbrt", "sine", "cosine", "tan", "atan2", "power", "erf"}
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True, slots=True)
class _Instr:
    name: str
    shape: object
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    param: int = -1
    trip_count: int = 1  # a while loop's known_trip_count (1 where XLA printed none)


def _computations(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """Every computation of an HLO module, instructions in order, and the entry's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for raw in text.splitlines():
        if raw and not raw[0].isspace():
            if raw.rstrip().endswith("{"):
                name = raw.split()[1 if raw.startswith("ENTRY") else 0].lstrip("%")
                entry = name if raw.startswith("ENTRY") else entry
                current = comps.setdefault(name, [])
            continue
        m = _INSTRUCTION.match(raw)
        if not m or current is None:
            continue
        line = _STRING.sub('""', _COMMENT.sub("", m["rest"]))
        try:
            shape, i = _parse_shape(line)
        except (ValueError, IndexError):
            continue
        op = _OPCODE.match(line, i)
        if not op:
            continue
        close = _match_close(line, op.end() - 1)
        inside = line[op.end():close - 1]
        param = int(inside) if op["op"] == "parameter" and inside.strip().isdigit() else -1
        trip = _TRIP_COUNT.search(m["rest"])  # in backend_config, a string the scan above blanked
        current.append(_Instr(m["name"], shape, op["op"], tuple(_REF.findall(inside)), line[close:], param,
                              int(trip.group(1)) if trip else 1))
    return comps, entry


def _shape_bytes(shape) -> int:
    return sum(_array_bytes(dtype, dims) for dtype, dims in _flatten(shape))


def _elements(shape) -> int:
    return sum(math.prod(dims) for _, dims in _flatten(shape))


def _called(attrs: str, key: str) -> list[str]:
    found = _attribute(attrs, key)
    if not found:
        return []
    return [name.lstrip("%") for name in re.findall(r"%?([\w.\-]+)", found)]


def _matmul_flops(instr: _Instr, shapes: Mapping[str, object]) -> float:
    out = _elements(instr.shape)
    if instr.opcode == "dot":
        lhs = _flatten(shapes.get(instr.operands[0], ("f32", ())))[0][1]
        contracting = [int(d) for d in _INTS.findall(_attribute(instr.attrs, "lhs_contracting_dims") or "")]
        return 2.0 * out * math.prod(lhs[d] for d in contracting if d < len(lhs))
    return _convolution_flops(instr, shapes)


def _convolution_flops(instr: _Instr, shapes: Mapping[str, object]) -> float:
    """2 x the multiply-adds that touch the input, not the padding: what XLA's cost analysis counts."""
    lhs = _flatten(shapes.get(instr.operands[0], ("f32", ())))[0][1]
    rhs = _flatten(shapes.get(instr.operands[1], ("f32", ())))[0][1]
    out = _flatten(instr.shape)[0][1]
    labels = re.match(r"(\w+)_(\w+)->(\w+)", _attribute(instr.attrs, "dim_labels") or "")
    if not labels or len(labels[1]) != len(lhs) or len(labels[2]) != len(rhs) or len(labels[3]) != len(out):
        return 2.0 * math.prod(out) * math.prod(rhs)
    lhs_labels, rhs_labels, out_labels = labels.groups()
    window = _attribute(instr.attrs, "window") or ""
    spatial = [c for c in rhs_labels if c.isdigit()]
    field = {key: (re.search(rf"{key}=(\S+)", window) or [None, ""])[1].rstrip("}").split("x")
             for key in ("pad", "stride", "lhs_dilate", "rhs_dilate")}
    taps = 1.0
    for i, dim in enumerate(spatial):
        def entry(key, default):
            values = [v for v in field[key] if v]
            return values[i] if i < len(values) else default
        pad_low = int(entry("pad", "0_0").split("_")[0])
        stride, lhs_dilate, rhs_dilate = int(entry("stride", 1)), int(entry("lhs_dilate", 1)), int(entry("rhs_dilate", 1))
        size, kernel, outputs = lhs[lhs_labels.index(dim)], rhs[rhs_labels.index(dim)], out[out_labels.index(dim)]
        extent = (size - 1) * lhs_dilate + 1
        taps *= sum(1 for o in range(outputs) for k in range(kernel)
                    if 0 <= (p := o * stride - pad_low + k * rhs_dilate) < extent and p % lhs_dilate == 0)
    features = rhs[rhs_labels.index("i")]
    return 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * features * taps


def _fused_flops(comps, name: str, seen: frozenset = frozenset()) -> tuple[float, float]:
    """(all flops, matmul flops) of a fused or called computation, nested fusions included."""
    if name in seen or name not in comps:
        return 0.0, 0.0
    instrs = comps[name]
    shapes = {i.name: i.shape for i in instrs}
    flops = matmul = 0.0
    for instr in instrs:
        if instr.opcode in ("fusion", "call"):
            for sub in _called(instr.attrs, "calls") or _called(instr.attrs, "to_apply"):
                f, m = _fused_flops(comps, sub, seen | {name})
                flops, matmul = flops + f, matmul + m
        else:
            f, m = _instruction_flops(instr, shapes)
            flops, matmul = flops + f, matmul + m
    return flops, matmul


def _instruction_flops(instr: _Instr, shapes: Mapping[str, object]) -> tuple[float, float]:
    """(flops, matmul flops) of one unfused instruction, counted as XLA's ``HloCostAnalysis`` does."""
    if instr.opcode in ("dot", "convolution"):
        f = _matmul_flops(instr, shapes)
        return f, f
    if instr.opcode == "reduce":
        inputs = sum(_elements(shapes.get(o, ("f32", ()))) for o in instr.operands[:len(instr.operands) // 2])
        return float(max(inputs - _elements(instr.shape), 0)), 0.0
    if instr.opcode in _NO_FLOPS or instr.opcode in _TRANSCENDENTAL:
        return 0.0, 0.0
    return float(_elements(instr.shape)), 0.0


def _fusion_bytes(comps, instr: _Instr, shapes: Mapping[str, object]) -> float:
    """Bytes a fusion moves: operands it slices count as the slice, an in-place update as the update."""
    called = _called(instr.attrs, "calls")
    body = comps.get(called[0], []) if called else []
    params = {i.param: i for i in body if i.opcode == "parameter"}
    users: dict[str, list[_Instr]] = {}
    for i in body:
        for ref in i.operands:
            users.setdefault(ref, []).append(i)
    root = body[-1] if body else None
    total = float(_shape_bytes(instr.shape))
    if root is not None and root.opcode == "dynamic-update-slice":
        update = next((i for i in body if i.name == root.operands[1]), None)
        total = float(_shape_bytes(update.shape)) if update is not None else total
    for position, operand in enumerate(instr.operands):
        param = params.get(position)
        full = float(_shape_bytes(shapes.get(operand, ("f32", ()))))
        uses = users.get(param.name, []) if param is not None else []
        sliced = _slices_through_bitcasts(param.name, users) if param is not None else None
        if sliced:
            full = float(sum(_shape_bytes(u.shape) for u in sliced))
        elif root is not None and root.opcode == "dynamic-update-slice" and root.operands[0] == param.name \
                and all(u is root or (u.opcode == "dynamic-slice" and u.operands[1:] == root.operands[2:])
                        for u in uses):
            # Updated in place (XLA shares the buffer when every other read slices the updated window):
            # only the update is written, and the window read.
            full = float(sum(_shape_bytes(u.shape) for u in uses if u is not root))
        total += full
    return total


def _slices_through_bitcasts(name: str, users: Mapping[str, list[_Instr]]) -> list[_Instr] | None:
    """The slices that are all a fusion does with value ``name``, looking through bitcasts (a view: the
    pipeline's update reads each parameter as a slice of a bitcast of its packed row); None if it
    reads it otherwise.  The kernel then reads only those windows."""
    found = []
    for use in users.get(name, []):
        if use.opcode in ("dynamic-slice", "slice") and use.operands[0] == name:
            found.append(use)
        elif use.opcode == "bitcast":
            inner = _slices_through_bitcasts(use.name, users)
            if inner is None:
                return None
            found.extend(inner)
        else:
            return None
    return found or None


def kernels(compiled_or_text) -> list[HloKernel]:
    """The kernels of a compiled program, loop bodies with their trip counts; collectives are left out.

    Every instruction of the entry computation that launches work is a
    kernel: a fusion, a dot, a copy, an elementwise op.  While loops
    contribute their body and condition ``known_trip_count`` times (once
    where XLA printed no count), a conditional its costliest branch, a call
    or async wrapper what it calls.

    >>> text = '''HloModule m
    ... ENTRY %main (a: f32[8,4], b: f32[4,2]) -> f32[8,2] {
    ...   %a = f32[8,4]{1,0} parameter(0)
    ...   %b = f32[4,2]{1,0} parameter(1)
    ...   ROOT %d = f32[8,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
    ... }'''
    >>> [(k.opcode, k.matmul_flops, k.bytes) for k in kernels(text)]
    [('dot', 128.0, 224.0)]
    """
    comps, entry = _computations(_hlo_text(compiled_or_text))
    return _walk_kernels(comps, entry, 1, frozenset())


def _walk_kernels(comps, name: str, repeats: int, seen: frozenset) -> list[HloKernel]:
    if name in seen or name not in comps:
        return []
    seen = seen | {name}
    instrs = comps[name]
    shapes = {i.name: i.shape for i in instrs}
    out: list[HloKernel] = []
    for instr in instrs:
        op = instr.opcode
        if op in _NO_KERNEL or op in _OPCODES or op.endswith("-done"):
            continue
        if op == "while":
            for key in ("body", "condition"):
                for sub in _called(instr.attrs, key):
                    out += _walk_kernels(comps, sub, repeats * instr.trip_count, seen)
        elif op == "conditional":
            branches = [_walk_kernels(comps, sub, repeats, seen)
                        for key in ("branch_computations", "true_computation", "false_computation")
                        for sub in _called(instr.attrs, key)]
            out += max(branches, key=lambda ks: sum(k.bytes + k.flops for k in ks), default=[])
        elif op in ("call", "async-start"):
            for sub in _called(instr.attrs, "calls") or _called(instr.attrs, "to_apply"):
                out += _walk_kernels(comps, sub, repeats, seen)
        else:
            out.append(_kernel(comps, instr, shapes, repeats))
    return out


def _computation_repeats(comps, entry: str) -> dict[str, int]:
    """How many times each computation runs per step: the trip counts of the while loops that call it."""
    repeats: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        if name not in comps or repeats.get(name, 0) >= times:
            return
        repeats[name] = times
        for instr in comps[name]:
            inner = times * instr.trip_count if instr.opcode == "while" else times
            for key in ("body", "condition", "calls", "to_apply", "branch_computations", "true_computation",
                        "false_computation"):
                for sub in _called(instr.attrs, key):
                    visit(sub, inner)

    visit(entry, 1)
    return repeats


def _kernel(comps, instr: _Instr, shapes: Mapping[str, object], repeats: int) -> HloKernel:
    op = instr.opcode
    operand_bytes = [float(_shape_bytes(shapes.get(o, ("f32", ())))) for o in instr.operands]
    out_bytes = float(_shape_bytes(instr.shape))
    if op == "fusion":
        nbytes = _fusion_bytes(comps, instr, shapes)
        called = _called(instr.attrs, "calls")
        flops, matmul = _fused_flops(comps, called[0]) if called else (0.0, 0.0)
    else:
        flops, matmul = _instruction_flops(instr, shapes)
        if op in ("dynamic-slice", "slice"):
            nbytes = 2 * out_bytes
        elif op == "dynamic-update-slice":
            nbytes = 2 * (operand_bytes[1] if len(operand_bytes) > 1 else out_bytes)
        else:
            nbytes = out_bytes + sum(operand_bytes)
    return HloKernel(name=instr.name, opcode=op, flops=flops, matmul_flops=matmul, bytes=nbytes, repeats=repeats)


def roofline_seconds(kernel_list: Sequence[HloKernel], cluster: C.Cluster, matmul_rate: float) -> float:
    """Sum over kernels of max(time to compute, time to move its bytes), times its repeats.

    The per-kernel roofline of XLA's GPU performance model: a kernel is
    bound by its FLOPs or by its memory traffic, not by their sum.  Matrix
    products run at ``matmul_rate``, other arithmetic at ``device_flops``.
    """
    total = 0.0
    for k in kernel_list:
        compute = k.matmul_flops / matmul_rate + (k.flops - k.matmul_flops) / cluster.device_flops
        total += k.repeats * max(compute, k.bytes / cluster.memory_bandwidth)
    return total


# ----------------------------------------------------------------------------- a loop of branches


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TickLoop:
    """One while loop whose body switches between branches (a run of a pipeline's ticks: `lax.switch`
    on the task each tick), priced per device: each branch's seconds (kernels' roofline + its
    collectives) and the rest of one iteration (the point-to-point sends and the stash updates).  A
    loop XLA inlined (one trip) has its switch outside any loop: ``iteration_seconds`` is then 0 and
    the rest of its tick is in the program's ``outside_seconds``."""

    branch_seconds: tuple[float, ...]
    iteration_seconds: float
    trip_count: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LoopBranches:
    """A program built around tick loops (`TickLoop`, in the order XLA prints them) and what it runs
    outside them, priced per device under a cluster."""

    loops: tuple[TickLoop, ...]
    outside_seconds: float


def _reachable(comps, name: str) -> set[str]:
    found, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current in found or current not in comps:
            continue
        found.add(current)
        for instr in comps[current]:
            for key in ("body", "condition", "calls", "to_apply", "branch_computations", "true_computation",
                        "false_computation"):
                stack += _called(instr.attrs, key)
    return found


def loop_branches(compiled_or_text, mesh, cluster) -> LoopBranches:
    """`LoopBranches` of a compiled program: every conditional not inside another one's branches is a
    tick switch, in a while loop's body or inlined where XLA removed a one-trip loop."""
    text = _hlo_text(compiled_or_text)
    mesh, cluster = C.MeshShape.from_mesh(mesh), C.get_cluster(cluster)
    comps, entry = _computations(text)
    rate = matmul_rate(text, cluster)
    colls = _scan_collectives(text, mesh, None)
    from_entry = _reachable(comps, entry)
    reachable = [name for name in comps if name in from_entry]
    switches = [(name, i) for name in reachable for i in comps[name] if i.opcode == "conditional"]
    branches = {i.name: _called(i.attrs, "branch_computations") for _, i in switches}
    below = {b: _reachable(comps, b) for found in branches.values() for b in found}
    in_branches = set().union(*below.values())  # a nested switch lies inside a tick switch's branches
    ticks = [(name, i) for name, i in switches if name not in in_branches]
    if not ticks:
        raise ValueError("expected a tick switch (a conditional, in a while loop or inlined); found none")
    loop_of = {_called(i.attrs, "body")[0]: i for name in reachable for i in comps[name] if i.opcode == "while"}

    def seconds(root: str, skip: set[str], names: set[str]) -> float:
        compute = roofline_seconds(_walk_kernels(comps, root, 1, frozenset(skip)), cluster, rate)
        return compute + communication_seconds([c for c in colls if c.computation in names], mesh, cluster)

    in_loops: set[str] = set()
    loops = []
    for name, switch in ticks:
        branch_seconds = tuple(seconds(b, set(), below[b]) for b in branches[switch.name])
        loop = loop_of.get(name)
        if loop is None:  # a one-trip loop XLA inlined
            loops.append(TickLoop(branch_seconds=branch_seconds, iteration_seconds=0.0, trip_count=1))
            continue
        inside = set().union(*(_reachable(comps, c) for key in ("body", "condition") for c in _called(loop.attrs, key)))
        in_loops |= inside
        loops.append(TickLoop(branch_seconds=branch_seconds, trip_count=loop.trip_count,
                              iteration_seconds=seconds(name, set(branches[switch.name]), inside - in_branches)))
    outside = set(reachable) - in_loops - in_branches
    return LoopBranches(loops=tuple(loops), outside_seconds=seconds(entry, in_loops | in_branches, outside))
