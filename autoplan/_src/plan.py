"""`Plan`: the planner's result, as data a person can read and a program can run.

A plan holds the mesh, a spec for every input and output leaf (by pytree
path), the specs of anchor intermediates (dot/conv/gather results, which the
emitter pins with sharding constraints), the chosen strategy of every
operator, the collectives the plan performs and the predicted `Cost`.  Plans
are frozen, compare by content, and round-trip through versioned JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from autoplan._src import cluster as C
from autoplan._src import graph as G
from autoplan._src.strategies import base as S
from autoplan._src.strategies.control import USER_PINNED

PLAN_FORMAT_VERSION = 2
# Older formats this version still reads (format 1: anchors without keys).
READABLE_VERSIONS = (1, 2)
ANCHOR_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated", "gather"})


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LeafSharding:
    """The layout of one input or output leaf."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: S.Spec
    stage: int | None = None  # in a pipeline: the stage row whose devices alone hold it; None: every device

    @property
    def partition_spec(self) -> jax.sharding.PartitionSpec:
        return S.to_partition_spec(self.spec)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * G.itemsize(self.dtype)

    def device_bytes(self, mesh: C.MeshShape) -> float:
        return self.nbytes / int(np.prod([mesh.axis_size(axes) for axes in self.spec]))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Anchor:
    """An intermediate tensor whose layout the plan fixes: result or operand of the operator ``key``.

    With ``operand`` None it is result ``output`` of the op; otherwise it is
    the op's ``operand``-th operand as the op reads it, which is where the
    plan reshards a tensor between its producer and this consumer.  Pinning
    both ends of such an edge makes XLA run the reshard the plan priced,
    instead of picking its own (say, all-reducing a weight gradient the plan
    computes from gathered activations).
    """

    op: int
    output: int
    label: str
    shape: tuple[int, ...]
    spec: S.Spec
    operand: int | None = None
    # The operator's stable identity (`autoplan._src.walk`), what the emitter looks up;
    # empty in plans saved in format 1, which name the operator by graph position only.
    key: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CollectiveUse:
    """One collective in the plan: where it happens and what it moves."""

    where: str  # layer and role, e.g. "block3 backward"
    op: str  # primitive, or "reshard <producer> -> <consumer>"
    kind: str
    axes: tuple[str, ...]
    nbytes: float
    wire_bytes: float
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Plan:
    """How to run a step on a mesh, and what it is predicted to cost.

    ``input_shardings`` / ``output_shardings`` are pytrees shaped like the
    step's arguments and results holding `jax.sharding.PartitionSpec`s.

    >>> import jax, jax.numpy as jnp, autoplan
    >>> mesh = jax.sharding.AbstractMesh((4,), ("model",))
    >>> w = jax.ShapeDtypeStruct((256, 1024), jnp.float32)
    >>> x = jax.ShapeDtypeStruct((8, 256), jnp.float32)
    >>> p = autoplan.plan(lambda w, x: jnp.tanh(x @ w).sum(), w, x, mesh=mesh, cluster="a100-8x")
    >>> p.cost.step_seconds > 0
    True
    """

    name: str
    mesh: C.MeshShape
    cluster: C.Cluster
    inputs: tuple[LeafSharding, ...]
    outputs: tuple[LeafSharding, ...]
    aliases: Mapping[int, int]
    anchors: tuple[Anchor, ...]
    op_strategies: tuple[str, ...]
    collectives: tuple[CollectiveUse, ...]
    cost: C.Cost
    memory_budget: float | None
    solver: Mapping[str, Any]
    fingerprint: str
    # Pipeline (inter-operator pass): `inter.Stage` per stage, the schedule's name, microbatches per step,
    # the mesh axes each stage runs data parallel over (manual: one gradient all-reduce per step), and
    # runner-up `inter.PipelineChoice`s.  Empty / None / 1 for a plan without pipelining.
    stages: tuple = ()
    cluster_origin: str = ""  # how the cluster was chosen when the caller did not name it
    schedule: str | None = None
    microbatches: int = 1
    data_axes: tuple[str, ...] = ()
    # A scanned stack of layers cut into this many chunks along its stacked axis (`stacked.Unstacked`):
    # the leaves are those of the chunked step (a stacked leaf's chunks end in /0, /1, ...); 0: not cut.
    stack_chunks: int = 0
    alternatives: tuple = dataclasses.field(default=(), compare=False)
    input_tree: Any = dataclasses.field(default=None, compare=False)
    output_tree: Any = dataclasses.field(default=None, compare=False)

    # -- pytrees of PartitionSpecs ------------------------------------------------
    @property
    def input_specs(self) -> dict[str, jax.sharding.PartitionSpec]:
        return {leaf.path: leaf.partition_spec for leaf in self.inputs}

    @property
    def output_specs(self) -> dict[str, jax.sharding.PartitionSpec]:
        return {leaf.path: leaf.partition_spec for leaf in self.outputs}

    @property
    def input_shardings(self):
        """PartitionSpecs shaped like the step's arguments (a path -> spec dict for a loaded plan)."""
        specs = [leaf.partition_spec for leaf in self.inputs]
        if self.input_tree is None:
            return self.input_specs
        return jax.tree_util.tree_unflatten(self.input_tree, specs)

    @property
    def output_shardings(self):
        specs = [leaf.partition_spec for leaf in self.outputs]
        if self.output_tree is None:
            return self.output_specs
        return jax.tree_util.tree_unflatten(self.output_tree, specs)

    @property
    def user_pinned(self) -> tuple[tuple[int, str], ...]:
        """(operator index, strategy) of every layout the user fixed in the step (``with_sharding_constraint``,
        ``reshard``): hard constraints the plan kept."""
        return tuple((i, name) for i, name in enumerate(self.op_strategies) if name.startswith(USER_PINNED))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def fits(self) -> bool:
        limit = self.memory_budget if self.memory_budget is not None else self.cluster.device_memory
        return self.cost.memory_bytes <= limit

    @property
    def bubble_fraction(self) -> float:
        """Idle share of a pipelined step: 1 - sum_i B t_i / (S T); 0 without stages."""
        if not self.stages or self.cost.step_seconds <= 0:
            return 0.0
        busy = sum(self.microbatches * s.seconds for s in self.stages)
        return 1.0 - busy / (len(self.stages) * self.cost.step_seconds)

    @property
    def energy_joules(self) -> float:
        return self.cost.energy_joules(self.cluster, self.num_devices)

    def __eq__(self, other):
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self):
        return hash(self.to_json())

    # -- reading ---------------------------------------------------------------------
    def explain(self, path: str) -> str:
        """Why a leaf is laid out as it is: its spec, bytes, and the collectives around it."""
        matches = [leaf for leaf in self.inputs + self.outputs if leaf.path == path]
        if not matches:
            matches = [leaf for leaf in self.inputs + self.outputs if leaf.path.endswith(path)]
        if not matches:
            raise KeyError(f"no input or output leaf matches {path!r}; e.g. {[x.path for x in self.inputs[:4]]}")
        leaf = matches[0]
        layer = next((c for c in leaf.path.split("/") if re.fullmatch(r".*\d+", c)), None)
        lines = [f"{leaf.path}: shape {leaf.shape} {leaf.dtype} -> {_pspec_str(leaf.spec)}",
                 f"  per device: {_bytes(leaf.device_bytes(self.mesh))} of {_bytes(leaf.nbytes)}"]
        split = [f"dim {d} over {'x'.join(axes)} ({self.mesh.axis_size(axes)})"
                 for d, axes in enumerate(leaf.spec) if axes]
        lines.append("  split: " + (", ".join(split) if split else "replicated on every device"))
        related = [c for c in self.collectives if layer and c.where.split(" ")[0] == layer]
        if related:
            lines.append(f"  collectives in layer {layer}:")
            for c in sorted(related, key=lambda c: -c.seconds)[:8]:
                lines.append(f"    {c.kind:<14} over {','.join(c.axes):<10} {_bytes(c.nbytes):>10}  "
                             f"{c.seconds * 1e3:8.3f} ms  ({c.where}: {c.op})")
        return "\n".join(lines)

    def summary(self, max_rows: int = 40) -> str:
        """A readable report: mesh, totals, parameter table, collectives."""
        mesh = " x ".join(f"{n}={s}" for n, s in zip(self.mesh.axis_names, self.mesh.axis_sizes))
        c = self.cost
        budget = self.memory_budget if self.memory_budget is not None else self.cluster.device_memory
        lines = [
            f"Plan {self.name!r}: mesh {mesh} ({self.num_devices} devices), cluster {self.cluster.name}"
            + (f" ({self.cluster_origin})" if self.cluster_origin else ""),
            f"  step {_ms(c.step_seconds)}  = compute {_ms(c.compute_seconds)} + communication "
            f"{_ms(c.communication_seconds)} ({_bytes(c.communication_bytes)} sent per device)",
            f"  peak memory {_bytes(c.memory_bytes)} per device (budget {_bytes(budget)}, "
            f"{'fits' if self.fits else 'DOES NOT FIT'}); energy {self.energy_joules:.3g} J per step",
        ]
        if self.solver:
            s = self.solver
            lines.append(f"  solver: {s.get('status', '?')} in {s.get('solve_seconds', 0):.2f} s, "
                         f"{s.get('num_vars', 0)} variables, {s.get('num_edges', 0)} edges "
                         f"(planned in {s.get('total_seconds', 0):.2f} s)")
        if self.user_pinned:
            lines.append(f"  user-pinned layouts (kept as written in the step): "
                         f"{', '.join(name.split(' ', 1)[1] for _, name in self.user_pinned)}")
        lines += _pipeline_lines(self)
        lines.append("")
        lines.append("Inputs (rows that differ only in the layer number are merged):")
        lines += _leaf_table(self.inputs, self.mesh, max_rows)
        lines.append("")
        lines.append("Collectives (summed per kind and mesh axes):")
        totals: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        for col in self.collectives:
            t = totals[(col.kind, col.axes)]
            t[0] += 1
            t[1] += col.wire_bytes
            t[2] += col.seconds
        if not totals:
            lines.append("  none: every device computes independently")
        for (kind, axes), (n, wire, secs) in sorted(totals.items(), key=lambda kv: -kv[1][2]):
            lines.append(f"  {kind:<15} over {','.join(axes):<12} x{n:<5} {_bytes(wire):>11} sent  {_ms(secs):>11}")
        top = sorted(self.collectives, key=lambda c: -c.seconds)[:10]
        if top:
            lines.append("  largest:")
            for col in top:
                lines.append(f"    {col.kind:<15} {_bytes(col.nbytes):>10} {_ms(col.seconds):>11}  "
                             f"{col.where}: {col.op}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        c = self.cost
        return (f"Plan({self.name!r}, mesh={self.mesh.as_dict()}, step={_ms(c.step_seconds)}, "
                f"comm={_bytes(c.communication_bytes)}, memory={_bytes(c.memory_bytes)})")

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(self.summary())}</pre>"

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        leaf = lambda x: {"path": x.path, "shape": list(x.shape), "dtype": x.dtype,  # noqa: E731
                          "spec": [list(a) for a in x.spec]} | ({} if x.stage is None else {"stage": x.stage})
        return {
            "format": "autoplan.plan", "version": PLAN_FORMAT_VERSION, "name": self.name,
            "mesh": {"axis_names": list(self.mesh.axis_names), "axis_sizes": list(self.mesh.axis_sizes)},
            "cluster": self.cluster.to_dict(),
            "inputs": [leaf(x) for x in self.inputs], "outputs": [leaf(x) for x in self.outputs],
            "aliases": {str(k): v for k, v in sorted(self.aliases.items())},
            "anchors": [{"op": a.op, "key": a.key, "output": a.output, "label": a.label, "shape": list(a.shape),
                         "spec": [list(s) for s in a.spec]} | ({} if a.operand is None else {"operand": a.operand})
                        for a in self.anchors],
            "op_strategies": list(self.op_strategies),
            "collectives": [dataclasses.asdict(c) | {"axes": list(c.axes)} for c in self.collectives],
            "cost": self.cost.to_dict(), "memory_budget": self.memory_budget,
            "solver": {k: v for k, v in self.solver.items() if k not in ("total_seconds", "solve_seconds",
                                                                         "build_seconds", "trace_seconds")},
            "fingerprint": self.fingerprint,
        } | ({"cluster_origin": self.cluster_origin} if self.cluster_origin else {}) | _pipeline_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        if data.get("format") != "autoplan.plan":
            raise ValueError("not an autoplan plan file (missing format: autoplan.plan)")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"plan file version {data.get('version')} is not supported (this autoplan reads "
                             f"versions {READABLE_VERSIONS}); re-plan with this autoplan")
        try:
            mesh = C.MeshShape(axis_names=tuple(data["mesh"]["axis_names"]),
                               axis_sizes=tuple(data["mesh"]["axis_sizes"]))
            leaf = lambda x: LeafSharding(path=x["path"], shape=tuple(x["shape"]), dtype=x["dtype"],  # noqa: E731
                                          spec=tuple(tuple(a) for a in x["spec"]), stage=x.get("stage"))
            for x in data["inputs"] + data["outputs"]:
                for axes in x["spec"]:
                    for a in axes:
                        if a not in mesh.axis_names:
                            raise ValueError(f"leaf {x['path']!r} names mesh axis {a!r}, not in {mesh.axis_names}")
            return cls(
                name=data["name"], mesh=mesh, cluster=C.Cluster.from_dict(data["cluster"]),
                inputs=tuple(leaf(x) for x in data["inputs"]), outputs=tuple(leaf(x) for x in data["outputs"]),
                aliases={int(k): int(v) for k, v in data["aliases"].items()},
                anchors=tuple(Anchor(op=a["op"], key=a.get("key", ""), output=a["output"], label=a["label"],
                                     shape=tuple(a["shape"]), spec=tuple(tuple(s) for s in a["spec"]),
                                     operand=a.get("operand"))
                              for a in data["anchors"]),
                op_strategies=tuple(data["op_strategies"]),
                collectives=tuple(CollectiveUse(**(c | {"axes": tuple(c["axes"])})) for c in data["collectives"]),
                cost=C.Cost(**data["cost"]), memory_budget=data["memory_budget"], solver=dict(data["solver"]),
                fingerprint=data["fingerprint"], cluster_origin=data.get("cluster_origin", ""),
                **_pipeline_fields(data))
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed plan file: {type(err).__name__}: {err}") from err


def load_plan(path: str) -> Plan:
    """Read a plan saved with `Plan.save`, checking its format and version.

    >>> import autoplan, tempfile, os, jax, jax.numpy as jnp
    >>> p = autoplan.plan(lambda x: x * 2, jax.ShapeDtypeStruct((8,), jnp.float32),
    ...                   mesh=jax.sharding.AbstractMesh((2,), ("data",)))
    >>> f = os.path.join(tempfile.mkdtemp(), "plan.json"); p.save(f)
    >>> autoplan.load_plan(f) == p
    True
    """
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON plan file ({err})") from err
    return Plan.from_dict(data)


def graph_fingerprint(graph: G.Graph) -> str:
    """A hash of the graph's structure: operators, shapes, dtypes and leaf paths."""
    h = hashlib.sha256()
    for op in graph.ops:
        h.update(f"{op.primitive}{op.input_shapes}{op.output_shapes}{op.output_dtypes}{op.path}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# Pipeline entries (the inter-operator pass): summary lines and JSON, only when a plan has them.


def _pipeline_lines(plan: Plan) -> list[str]:
    if not plan.stages and plan.microbatches == 1:
        return []
    lines = [f"  pipeline: {len(plan.stages)} stage(s), schedule {plan.schedule}, {plan.microbatches} microbatches, "
             f"bubble {100 * plan.bubble_fraction:.1f}%"]
    if plan.data_axes:
        lines.append(f"    data parallel over {' x '.join(plan.data_axes)}: each replica runs its share of every "
                     "microbatch; gradients are all-reduced once per step")
    elif len(plan.stages) <= 1 and plan.microbatches > 1:
        lines.append("    the microbatch loop is left to XLA: the plan's layouts inside it, gradients reduced "
                     "inside it, every microbatch (priced so)")
    if plan.stack_chunks:
        lines.append(f"    the scanned stack is cut into {plan.stack_chunks} chunks along its stacked axis (leaves "
                     "ending /0, /1, ...: its chunks); a stacked argument whose chunks fill each stage row alike "
                     "lives as one P('stage', ...) array between steps")
    for k, s in enumerate(plan.stages):
        mesh = " x ".join(f"{n}={v}" for n, v in zip(s.mesh.axis_names, s.mesh.axis_sizes))
        ranges = " + ".join(f"{i}..{j - 1}" for i, j in s.ranges)
        lines.append(f"    stage {k}: layers {ranges} ({', '.join(s.layers)}) on {s.devices} devices "
                     f"({mesh}): {_ms(s.seconds)} per microbatch, {_bytes(s.memory_bytes)} with {s.in_flight} "
                     "microbatches in flight")
    owned = [leaf for leaf in plan.inputs if leaf.stage is not None]
    if owned:
        rows = ", ".join(f"stage {k} {_bytes(sum(leaf.nbytes for leaf in owned if leaf.stage == k))}"
                         for k in range(len(plan.stages)))
        batch = plan.inputs[-1].path.split("/")[0]  # the last argument: the batch, split by examples
        shared = [leaf.path for leaf in plan.inputs if leaf.stage is None and leaf.path.split("/")[0] != batch]
        lines.append(f"    state kept per stage row (parameters, optimizer state): {rows}; on every row: "
                     f"{', '.join(shared[:4]) + (' ...' if len(shared) > 4 else '') if shared else 'nothing'}")
    for alt in plan.alternatives[:5]:
        lines.append(f"    runner-up: {alt.describe()}")
    return lines


def _pipeline_dict(plan: Plan) -> dict:
    if not plan.stages and plan.microbatches == 1:
        return {}
    return {"stages": [s.to_dict() for s in plan.stages], "schedule": plan.schedule,
            "microbatches": plan.microbatches} | ({"data_axes": list(plan.data_axes)} if plan.data_axes else {}) \
        | ({"stack_chunks": plan.stack_chunks} if plan.stack_chunks else {})


def _pipeline_fields(data: Mapping) -> dict:
    if "stages" not in data:
        return {}
    from autoplan._src import inter

    return {"stages": tuple(inter.Stage.from_dict(s) for s in data["stages"]), "schedule": data["schedule"],
            "microbatches": int(data["microbatches"]), "data_axes": tuple(data.get("data_axes", ())),
            "stack_chunks": int(data.get("stack_chunks", 0))}


# ---------------------------------------------------------------------------
# Formatting helpers.


def _ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _pspec_str(spec: S.Spec) -> str:
    return str(S.to_partition_spec(spec)).replace("PartitionSpec", "P")


def _leaf_table(leaves: Sequence[LeafSharding], mesh: C.MeshShape, max_rows: int) -> list[str]:
    groups: dict[tuple, list[str]] = {}
    order = []
    for leaf in leaves:
        numbers = re.findall(r"(?<=[A-Za-z_])(\d+)(?=/|$)", leaf.path)
        pattern = re.sub(r"(?<=[A-Za-z_])\d+(?=/|$)", "#", leaf.path, count=1) if numbers else leaf.path
        key = (pattern, leaf.shape, leaf.dtype, leaf.spec)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(numbers[0] if numbers else "")
    rows = []
    for key in order:
        pattern, shape, dtype, spec = key
        nums = [n for n in groups[key] if n]
        path = pattern.replace("#", _ranges(nums), 1) if nums else pattern
        rows.append((path, f"{shape} {dtype}", _pspec_str(spec),
                     _bytes(LeafSharding(path="", shape=shape, dtype=dtype, spec=spec).device_bytes(mesh))))
    width = max((len(r[0]) for r in rows), default=10)
    out = [f"  {'path':<{width}}  {'shape':<24} {'spec':<28} per device"]
    for r in rows[:max_rows]:
        out.append(f"  {r[0]:<{width}}  {r[1]:<24} {r[2]:<28} {r[3]}")
    if len(rows) > max_rows:
        out.append(f"  ... {len(rows) - max_rows} more rows (plan.inputs has them all)")
    return out


def _ranges(nums: Sequence[str]) -> str:
    values = sorted(int(n) for n in nums)
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"
