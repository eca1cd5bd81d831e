"""The inter-operator pass: cluster a step's ops into layers and slice the layers into pipeline stages.

The stage DP (Alpa, OSDI'22, section 5.2) picks contiguous layer ranges, a
submesh (device count) per range, a logical mesh inside it and the number of
microbatches ``B`` to minimise the pipeline step latency

    T = sum_i t_i + (B - 1) * max_i t_i

where ``t_i`` is the forward plus backward time of one microbatch on stage
``i``.  This is the latency of GPipe and 1F1B with the bubble counted in: the
first microbatch crosses every stage (``sum t_i``), the slowest stage then
runs the other ``B - 1`` microbatches back to back; the idle slots of faster
stages are the bubble.  Memory: stage ``i`` holds its weights and optimizer
state, plus the activations of the microbatches its schedule keeps alive:
``B`` under GPipe, ``min(S - i, B)`` under 1F1B (``S - i`` = the stages from
``i`` to the last, counted from the end as the DP does).

Stage costs come from a callback ``cost(start, end, devices, microbatches)``
returning `StageOption`s (one per logical mesh); `graph_stage_costs` makes one
from a traced `Graph` by solving the intra-operator ILP on the sub-graph of
those layers, solving structurally identical ranges once.  Tests can pass a
synthetic table instead.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from autoplan._src import cluster as C
from autoplan._src import compat
from autoplan._src import graph as G
from autoplan._src import pipeline as PL


class NoPipelineFits(ValueError):
    """No stage partition meets the memory budget: another schedule (fewer microbatches in flight) may."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StageOption:
    """One way to run a layer range on a submesh: its logical mesh, latency and memory.

    ``seconds`` is forward + backward of one microbatch; ``weight_bytes`` is
    what the stage holds regardless of microbatches (weights, gradients,
    optimizer state) and ``activation_bytes`` what one in-flight microbatch adds,
    both per device.
    """

    mesh: C.MeshShape
    seconds: float
    weight_bytes: float
    activation_bytes: float
    gradient_bytes: float = 0.0  # the range's gradients, per device (what microbatches sum into)
    # ``seconds`` holds 1/B of the optimizer update (a one-stage option planned with it, `_looped_option`)
    update_included: bool = False
    detail: Any = dataclasses.field(default=None, compare=False)

    def memory(self, in_flight: int) -> float:
        return self.weight_bytes + in_flight * self.activation_bytes


StageCost = Callable[[int, int, int, int], Sequence[StageOption]]
# Where a pipeline stage's plan lists its once-per-step gradient all-reduce (`GraphStageCosts._stage_option`).
AFTER_TICKS = "<after the pipeline's ticks>"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Stage:
    """One pipeline stage of a plan: layers ``[start, end)``, its submesh and predicted cost.

    Under interleaved 1F1B a stage row runs several chunks: ``chunks`` are their layer ranges (chunk
    ``c`` of row ``s`` is virtual stage ``c * S + s``), ``start``/``end`` span them, and ``seconds`` /
    ``memory_bytes`` are the row's (all its chunks, per microbatch).
    """

    start: int
    end: int
    layers: tuple[str, ...]
    devices: int
    mesh: C.MeshShape
    seconds: float
    memory_bytes: float
    in_flight: int
    chunks: tuple[tuple[int, int], ...] = ()

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The layer ranges the row runs: its chunks, or its one range."""
        return self.chunks or ((self.start, self.end),)

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "layers": list(self.layers), "devices": self.devices,
                "mesh": self.mesh.as_dict(), "seconds": self.seconds, "memory_bytes": self.memory_bytes,
                "in_flight": self.in_flight} | ({"chunks": [list(c) for c in self.chunks]} if self.chunks else {})

    @classmethod
    def from_dict(cls, data) -> Stage:
        mesh = C.MeshShape.from_mesh(data["mesh"])
        return cls(start=data["start"], end=data["end"], layers=tuple(data["layers"]), devices=data["devices"],
                   mesh=mesh, seconds=data["seconds"], memory_bytes=data["memory_bytes"],
                   in_flight=data["in_flight"], chunks=tuple(tuple(c) for c in data.get("chunks", ())))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PipelineChoice:
    """The stage DP's answer: stages, microbatches, schedule and the predicted step latency."""

    stages: tuple[Stage, ...]
    microbatches: int
    schedule: str
    step_seconds: float
    alternatives: tuple[PipelineChoice, ...] = ()

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the step under the T formula: 1 - sum_i B t_i / (S T)."""
        busy = sum(self.microbatches * s.seconds for s in self.stages)
        return 1.0 - busy / (len(self.stages) * self.step_seconds) if self.step_seconds > 0 else 0.0

    def describe(self) -> str:
        parts = ["+".join(f"{i}:{j}" for i, j in s.ranges) + f"@{s.devices}" for s in self.stages]
        return f"{len(self.stages)} stages [{', '.join(parts)}], B={self.microbatches}, {self.step_seconds:.6g} s"


def pipeline_seconds(stage_seconds: Sequence[float], microbatches: int) -> float:
    """Pipeline step latency ``sum t_i + (B - 1) max t_i``.

    >>> pipeline_seconds([1.0, 2.0, 1.0], 4)
    10.0
    """
    return sum(stage_seconds) + (microbatches - 1) * max(stage_seconds)


def in_flight(schedule: str, stages_from_here: int, microbatches: int) -> int:
    """Microbatches whose activations a stage keeps alive; ``stages_from_here`` = S - s for stage s.

    >>> in_flight("gpipe", 2, 8), in_flight("1f1b", 2, 8)
    (8, 2)
    """
    if schedule == "gpipe":
        return microbatches
    if schedule in ("1f1b", "interleaved"):
        return min(stages_from_here, microbatches)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {PL.SCHEDULES}")


def submesh_sizes(num_devices: int, devices_per_node: int) -> list[int]:
    """Alpa's submesh shapes as device counts: 1, 2, 4, ... within a node, then whole nodes.

    >>> submesh_sizes(16, 4)
    [1, 2, 4, 8, 12, 16]
    """
    per_node = min(devices_per_node, num_devices)
    sizes = [1 << k for k in range(per_node.bit_length()) if (1 << k) <= per_node]
    if per_node not in sizes:
        sizes.append(per_node)
    sizes += [n * per_node for n in range(2, num_devices // per_node + 1)]
    return sorted(set(s for s in sizes if s <= num_devices))


def solve_stages(num_layers: int, num_devices: int, cost: StageCost, *, microbatches: Sequence[int],
                 schedule: str = "1f1b", memory_budget: float = math.inf, sizes: Sequence[int] | None = None,
                 num_stages: Sequence[int] | None = None, uniform: bool = False,
                 layer_names: Sequence[str] | None = None, keep: int = 8,
                 equal_share: Sequence[int] | None = None) -> PipelineChoice:
    """Alpa's stage DP: the layer ranges, submeshes, logical meshes and ``B`` of least step latency.

    ``sizes`` are the allowed device counts per stage (default `submesh_sizes`
    with one node of all devices); the stages' counts sum to ``num_devices``.
    ``uniform`` gives every stage the same count (the SPMD runtime needs it).
    ``num_stages`` / ``microbatches`` restrict the search (the user's pins).
    ``equal_share`` (per layer, a count) makes every stage hold the same total of it: a scanned
    stack's chunks, so that each stage row holds the same layers of every stacked leaf.
    The best plan per (stages, B) pair is kept as ``alternatives``, best first.

    >>> table = lambda i, j, d, b: [StageOption(mesh=C.MeshShape(axis_names=("data",), axis_sizes=(d,)),
    ...     seconds=(j - i) / d / b, weight_bytes=0.0, activation_bytes=0.0)]
    >>> solve_stages(4, 2, table, microbatches=[4], sizes=[1, 2]).describe()
    '1 stages [0:4@2], B=4, 2 s'
    >>> solve_stages(4, 2, table, microbatches=[4], sizes=[1, 2], num_stages=[2]).describe()
    '2 stages [0:2@1, 2:4@1], B=4, 2.5 s'
    """
    sizes = list(sizes) if sizes is not None else submesh_sizes(num_devices, num_devices)
    allowed_stages = sorted(set(num_stages)) if num_stages else list(range(1, num_layers + 1))
    if max(allowed_stages) > num_layers:
        raise ValueError(f"{max(allowed_stages)} pipeline stages requested but the model has only {num_layers} "
                         f"layers to slice; ask for at most {num_layers} stages")
    names = list(layer_names) if layer_names is not None else [str(i) for i in range(num_layers)]
    found: list[PipelineChoice] = []
    for b in microbatches:
        options = _OptionTable(cost, b)
        for stages in allowed_stages:
            stage_sizes = sizes
            if uniform:
                if num_devices % stages or num_devices // stages not in sizes:
                    continue
                stage_sizes = [num_devices // stages]
            share = _share_filter(equal_share, stages)
            if share is None:
                continue
            choice = _dp(num_layers, num_devices, stages, b, options, stage_sizes, schedule, memory_budget, names,
                         share)
            if choice is not None:
                found.append(choice)
    if not found:
        raise NoPipelineFits(_no_plan_message(num_layers, num_devices, microbatches, allowed_stages, memory_budget))
    found.sort(key=lambda c: c.step_seconds)
    return dataclasses.replace(found[0], alternatives=tuple(found[1:keep]))


class _OptionTable(dict):
    """(start, end, devices) -> options at B microbatches, costed on first use."""

    def __init__(self, cost: StageCost, b: int):
        super().__init__()
        self.cost, self.b = cost, b

    def __missing__(self, key):
        self[key] = tuple(self.cost(*key, self.b))
        return self[key]


def _share_filter(equal_share: Sequence[int] | None, num_stages: int) -> Callable[[int, int], bool] | None:
    """(start, end) -> whether a stage over those layers holds its equal share; None when the total
    does not divide into ``num_stages`` shares."""
    if equal_share is None:
        return lambda start, end: True
    total = sum(equal_share)
    if total % num_stages:
        return None
    prefix = [0, *itertools.accumulate(equal_share)]
    return lambda start, end: prefix[end] - prefix[start] == total // num_stages


def _reachable(num_layers: int, num_stages: int, sizes: Sequence[int], share=lambda start, end: True):
    """(start, end, devices) that can be one stage of a ``num_stages``-stage plan over all layers."""
    for i in range(num_layers):
        for j in range(i + 1, num_layers + 1):
            if not share(i, j):
                continue
            for k in range(num_stages):  # stages before this one
                after = num_stages - 1 - k
                if (k == 0) == (i == 0) and k <= i and (after == 0) == (j == num_layers) \
                        and after <= num_layers - j:
                    yield from ((i, j, d) for d in sizes)
                    break


def _dp(num_layers: int, num_devices: int, num_stages: int, b: int, options: dict, sizes: Sequence[int],
        schedule: str, budget: float, names: Sequence[str], share=lambda start, end: True) -> PipelineChoice | None:
    """Exactly ``num_stages`` stages over all layers and devices; outer loop over t_max with Alpa's pruning."""
    candidates = sorted({o.seconds for key in _reachable(num_layers, num_stages, sizes, share)
                         for o in options[key]})
    best: tuple[float, Any] | None = None
    for t_max in candidates:
        if best is not None and b * t_max >= best[0]:
            break  # every plan whose slowest stage is >= t_max costs >= B * t_max (Alpa's early stop)
        table = _dp_under(num_layers, num_devices, num_stages, b, options, sizes, schedule, budget, t_max, share)
        entry = table.get((num_stages, 0, num_devices))
        if entry is None:
            continue
        total = entry[0] + (b - 1) * t_max
        if best is None or total < best[0] - 1e-15:
            best = (total, entry)
    if best is None:
        return None
    stages, (_, chain) = [], best[1]
    remaining = num_stages
    while chain is not None:
        (i, j, d, option), chain = chain
        stages.append(Stage(start=i, end=j, layers=tuple(names[i:j]), devices=d, mesh=option.mesh,
                            seconds=option.seconds, memory_bytes=option.memory(in_flight(schedule, remaining, b)),
                            in_flight=in_flight(schedule, remaining, b)))
        remaining -= 1
    step = pipeline_seconds([s.seconds for s in stages], b)
    return PipelineChoice(stages=tuple(stages), microbatches=b, schedule=schedule, step_seconds=step)


def _dp_under(num_layers, num_devices, num_stages, b, options, sizes, schedule, budget, t_max,
              share=lambda start, end: True) -> dict:
    """f[s, l, d]: least sum of t over s stages covering layers l.. on d devices, each t <= t_max."""
    table: dict[tuple[int, int, int], tuple[float, Any]] = {(0, num_layers, 0): (0.0, None)}
    for s in range(1, num_stages + 1):
        keep = min(s, b) if schedule != "gpipe" else b
        for start in range(num_layers - 1, -1, -1):
            if (start == 0) != (s == num_stages) or start < num_stages - s:
                continue  # no plan reaches layer ``start`` with ``s`` stages left
            for d_total in range(1, num_devices + 1):
                best = None
                for end in range(start + 1, num_layers - s + 2):
                    if not share(start, end):
                        continue
                    for d in sizes:
                        rest = table.get((s - 1, end, d_total - d))
                        if d > d_total or rest is None:
                            continue
                        option = _best_option(options[(start, end, d)], t_max, keep, budget)
                        if option is None:
                            continue
                        total = option.seconds + rest[0]
                        if best is None or total < best[0] - 1e-15:
                            best = (total, ((start, end, d, option), rest[1]))
                if best is not None:
                    table[(s, start, d_total)] = best
    return table


def _best_option(opts: Sequence[StageOption], t_max: float, keep: int, budget: float) -> StageOption | None:
    fitting = [o for o in opts if o.seconds <= t_max and o.memory(keep) <= budget]
    return min(fitting, key=lambda o: o.seconds, default=None)


def _no_plan_message(num_layers, num_devices, microbatches, stages, budget) -> str:
    return (f"no pipeline plan fits: {num_layers} layers on {num_devices} devices with {list(stages)} stages and "
            f"B in {list(microbatches)} under a memory budget of {budget / 2**30:.3g} GiB per device; allow more "
            "stages or microbatches, more devices, or a larger memory_budget")


# ---------------------------------------------------------------------------
# Layers of a traced step, and stage costs from the intra-operator ILP.

HEAVY_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})


def layer_units(graph: G.Graph) -> list[tuple[str, ...]]:
    """The step's pipeline layers: its Flax layers in order, those without a matmul or convolution
    (embeddings, a final norm) merged into the next one (the last into the one before), so that
    each layer has real work to balance.

    >>> import jax, autoplan
    >>> from autoplan._src.trace import trace
    >>> spec = autoplan.models.get("gpt-tiny")
    >>> layer_units(trace(spec.train_step, *spec.abstract_state(), spec.abstract_batch()))
    [('wte', 'wpe', 'block0'), ('block1',), ('ln_f', 'head')]
    """
    heavy = {op.layer for op in graph.ops if op.role == G.FORWARD and _is_heavy(op)}
    units: list[list[str]] = []
    pending: list[str] = []
    for layer in graph.layers:
        pending.append(layer)
        if layer in heavy:
            units.append(pending)
            pending = []
    if pending:
        if units:
            units[-1] += pending
        else:
            units.append(pending)
    return [tuple(u) for u in units]


def _is_heavy(op: G.Op) -> bool:
    """A matmul or convolution, or a loop / branch / remat region (one operator in a graph traced with
    ``opaque_structure``) with one inside."""
    def contains(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in HEAVY_PRIMITIVES:
                return True
            if any(contains(compat.open_jaxpr(body)[0]) for body in compat.sub_jaxprs(eqn.params)):
                return True
        return False

    if op.primitive in HEAVY_PRIMITIVES:
        return True
    return compat.is_structured(op.primitive) and \
        any(contains(compat.open_jaxpr(body)[0]) for body in compat.sub_jaxprs(op.params))


def op_units(graph: G.Graph, units: Sequence[Sequence[str]]) -> list[int]:
    """The pipeline layer of every op; ops outside any layer join their first consumer's layer."""
    of_layer = {layer: k for k, unit in enumerate(units) for layer in unit}
    result = [of_layer.get(op.layer, -1) for op in graph.ops]
    for op in reversed(graph.ops):
        if result[op.id] >= 0:
            continue
        consumers = [result[c] for t in op.outputs for c, _ in graph.consumers[t] if result[c] >= 0]
        result[op.id] = min(consumers) if consumers else len(units) - 1
    return result


def sub_graph(graph: G.Graph, keep: set[int], layers: Sequence[str]) -> G.Graph:
    """The ops ``keep`` as a graph of their own: operands from elsewhere become inputs, results used
    elsewhere (activations to the next stage, gradients to the optimizer) become outputs."""
    ops: list[G.Op] = []
    tensors: list[G.Tensor] = []
    new_id: dict[int, int] = {}
    input_ops, output_ops, input_paths, output_paths = [], [], [], []

    def add(op: G.Op, inputs: tuple[int, ...], **changes) -> G.Op:
        outputs = []
        for k, t in enumerate(op.outputs):
            source = graph.tensors[t]
            tensors.append(G.Tensor(id=len(tensors), shape=source.shape, dtype=source.dtype, producer=len(ops),
                                    output_index=k))
            new_id[t] = len(tensors) - 1
            outputs.append(len(tensors) - 1)
        made = dataclasses.replace(op, id=len(ops), inputs=inputs, outputs=tuple(outputs), **changes)
        ops.append(made)
        return made

    for op in graph.ops:
        if op.id not in keep:
            continue
        for t in op.inputs:
            if t == G.LITERAL or t in new_id:
                continue
            tensor = graph.tensors[t]
            producer = graph.ops[tensor.producer]
            path = producer.path if producer.role == G.INPUT else f"boundary/t{t}"
            stub = G.Op(id=0, primitive="input", inputs=(), outputs=(t,), input_shapes=(), input_dtypes=(),
                        output_shapes=(tensor.shape,), output_dtypes=(tensor.dtype,), role=G.INPUT,
                        layer=producer.layer, path=path,
                        signature=("input", (), (), (), (tensor.shape,), (tensor.dtype,)))
            input_ops.append(add(stub, ()).id)
            input_paths.append(path)
        add(op, tuple(t if t == G.LITERAL else new_id[t] for t in op.inputs))
    for t_old, t_new in list(new_id.items()):
        tensor = graph.tensors[t_old]
        if tensor.producer not in keep:
            continue
        if all(c in keep for c, _ in graph.consumers[t_old]) and graph.consumers[t_old]:
            continue
        out = G.Op(id=len(ops), primitive="output", inputs=(t_new,), outputs=(), input_shapes=(tensor.shape,),
                   input_dtypes=(tensor.dtype,), output_shapes=(), output_dtypes=(), role=G.OUTPUT,
                   layer=graph.ops[tensor.producer].layer, path=f"boundary/t{t_old}",
                   signature=("output", (), (tensor.shape,), (tensor.dtype,), (), ()))
        ops.append(out)
        output_ops.append(out.id)
        output_paths.append(out.path)
    return G.Graph(ops=ops, tensors=tensors, input_ops=input_ops, output_ops=output_ops, input_tree=None,
                   output_tree=None, input_paths=input_paths, output_paths=output_paths, aliases={},
                   layers=[layer for layer in graph.layers if layer in set(layers)])


def _structure(graph: G.Graph, ops: Sequence[int]) -> tuple:
    """What makes two layer ranges the same problem: their ops' signatures and how they connect."""
    local = {op_id: k for k, op_id in enumerate(ops)}
    return tuple((graph.ops[i].signature, tuple(None if t == G.LITERAL else local.get(graph.tensors[t].producer, -1)
                                                for t in graph.ops[i].inputs)) for i in ops)


def logical_meshes(devices: int) -> list[C.MeshShape]:
    """Every (data, model) factorization of a submesh's devices.

    >>> [m.axis_sizes for m in logical_meshes(4)]
    [(4, 1), (2, 2), (1, 4)]
    """
    return [C.MeshShape(axis_names=("data", "model"), axis_sizes=(devices // m, m))
            for m in range(1, devices + 1) if devices % m == 0]


def runnable_meshes(devices: int, *, total: int) -> list[C.MeshShape]:
    """The logical meshes a stage of ``devices`` (of ``total``) can run on: every `logical_meshes` one
    for a single stage; data parallel only when there are several.  The pipeline runs stages as
    branches of a ``lax.switch`` (`autoplan._src.staging`): a collective inside a branch that only
    one stage row takes waits for devices running another branch (it deadlocks XLA:CPU), so stages
    run data parallel over manual axes, and tensor parallelism inside a pipeline stage is not offered.

    >>> [m.axis_sizes for m in runnable_meshes(4, total=4)], [m.axis_sizes for m in runnable_meshes(4, total=8)]
    ([(4, 1), (2, 2), (1, 4)], [(4, 1)])
    """
    return logical_meshes(devices) if devices == total else logical_meshes(devices)[:1]


class GraphStageCosts:
    """A `StageCost` from traced graphs: the intra-operator ILP of a layer range's forward and backward
    ops, traced at the microbatch size, on every logical mesh of the submesh.

    ``trace_at(microbatches)`` returns the step's `Graph` with the batch cut into
    that many microbatches (the graph of one microbatch).  Layer ranges whose ops
    are structurally identical (same primitives, shapes and parameters in the
    same order, e.g. blocks 1-2 and blocks 2-3 of a transformer) are solved once.
    ``seconds`` is the ILP's time of one microbatch with the weight-gradient
    reductions divided by ``B`` (they run once per step), plus the point-to-point
    time of receiving the range's inputs from neighbouring stages; it leaves out
    the optimizer update, which runs once per step.  A pipeline stage (fewer
    devices than ``total_devices``) is priced as the runtime runs it
    (`_stage_option`), one stage on every device with B > 1 as its loop runs,
    with its update (`_looped_option`);
    ``weight_bytes`` counts the stage's parameters, gradients and optimizer state
    (every step input of its layers but the batch), split as the ILP splits the
    parameters.
    """

    def __init__(self, trace_at: Callable[[int], G.Graph], cluster: C.Cluster, *, time_limit: float = 30.0,
                 batch_prefix: str = "batch", meshes: Callable[[int], list[C.MeshShape]] | None = None,
                 runtime_trace_at: Callable[[int], G.Graph] | None = None):
        self.trace_at, self.cluster, self.time_limit = trace_at, cluster, time_limit
        # The graph the pipeline runtime cuts: loops, branches and remat as single ops (`trace`'s
        # ``opaque_structure``); what it sends between stages is priced from this cut.
        self.runtime_graph = runtime_trace_at or trace_at
        self.meshes = meshes or logical_meshes
        self.total_devices: int | None = None  # devices of the whole pipeline, when known
        self.batch_prefix = batch_prefix
        self._graphs: dict[int, tuple[G.Graph, list[tuple[str, ...]], list[int]]] = {}
        self._cache: dict[tuple, tuple[StageOption, ...]] = {}
        self.solves = 0

    def units(self, microbatches: int = 1) -> list[tuple[str, ...]]:
        return self._graph(microbatches)[1]

    def _graph(self, b: int):
        if b not in self._graphs:
            graph = self.trace_at(b)
            units = layer_units(graph)
            self._graphs[b] = (graph, units, op_units(graph, units))
        return self._graphs[b]

    def __call__(self, start: int, end: int, devices: int, microbatches: int) -> tuple[StageOption, ...]:
        graph, units, unit_of = self._graph(microbatches)
        keep = {op.id for op in graph.ops if start <= unit_of[op.id] < end and op.role in (G.FORWARD, G.BACKWARD)}
        looped = microbatches > 1 and start == 0 and end == len(units) and devices == (self.total_devices or devices)
        key = (_structure(graph, sorted(keep)), devices, microbatches, looped)
        if key in self._cache:
            return self._cache[key]
        layers = [layer for unit in units[start:end] for layer in unit]
        sub = sub_graph(graph, keep, layers)
        state = sum(graph.tensors[graph.ops[i].outputs[0]].nbytes for i in graph.input_ops  # params, opt state
                    if start <= unit_of[i] < end and not graph.ops[i].path.startswith(self.batch_prefix))
        staged = not looped and self.total_devices is not None and devices < self.total_devices
        options = []
        name = f"layers {start}:{end}"
        for mesh in self.meshes(devices):
            if looped:
                options.append(self._looped_option(sub, mesh, name, microbatches))
            elif staged:
                options.append(self._stage_option(start, end, mesh, name, state, microbatches))
            else:
                options.append(self._option(sub, mesh, name, state, microbatches))
        self._cache[key] = tuple(options)
        return self._cache[key]

    def _option(self, sub: G.Graph, mesh: C.MeshShape, name: str, state: float, microbatches: int) -> StageOption:
        """The `StageOption` of the ILP's plan of ``sub`` on ``mesh`` (the fastest, with no memory budget:
        the DP drops options that do not fit)."""
        plan, sync = self._solve(sub, mesh, name)
        params = [leaf for leaf in plan.inputs if not leaf.path.startswith(("boundary/", self.batch_prefix))]
        param_bytes = sum(leaf.nbytes for leaf in params)
        fraction = sum(leaf.device_bytes(mesh) for leaf in params) / param_bytes if param_bytes else 1.0
        boundary = sum(leaf.device_bytes(mesh) for leaf in plan.inputs if leaf.path.startswith("boundary/"))
        # Weight-gradient reductions run once per step: 1/B of them per microbatch (as Alpa prices them),
        # so B microbatches through the slowest stage pay them once.
        seconds = plan.cost.step_seconds - sync + sync / microbatches + self._receive_seconds(plan, mesh)
        return StageOption(mesh=mesh, seconds=seconds, weight_bytes=(state + param_bytes) * fraction,
                           gradient_bytes=param_bytes * fraction,
                           activation_bytes=max(plan.cost.memory_bytes - param_bytes * fraction, 0.0) + boundary,
                           detail=plan)

    def _looped_option(self, sub: G.Graph, mesh: C.MeshShape, name: str, microbatches: int) -> StageOption:
        """The `StageOption` of one stage on every device looping over B microbatches, planned with its
        update: the faster of the loops `accumulate` runs.

        * left to XLA (no data-parallel axes): the whole step at microbatch size, its forward and
          backward ops B times, its update once; XLA reduces the gradients inside the loop, every
          microbatch (the ILP prices them so);
        * data parallel over some mesh axes (manual, as DDP): each replica loops over its share of
          every microbatch on the other axes, planned there, and the summed gradients are all-reduced
          over the data-parallel axes once, after the loop.

        Planning the update with the loop gives the loop's layouts and the update's in one plan: a
        loop planned alone leaves its gradients in whatever layout its last op likes (split over a
        slow axis, the update must gather them).  ``seconds`` is 1/B of the step, as the DP multiplies
        it by B; the plan (``detail``) carries the step's price and its ``data_axes``.
        """
        params = {path for path in sub.input_paths if not path.startswith(("boundary/", self.batch_prefix))}
        candidates = [self._loop_plan(mesh, name, microbatches, ())]
        sizes = mesh.as_dict()
        split = [axis for axis in mesh.axis_names if sizes[axis] > 1]
        for count in range(1, len(split) + 1):
            for axes in itertools.combinations(split, count):
                plan = self._loop_plan(mesh, name, microbatches, axes, params)
                if plan is not None:
                    candidates.append(plan)
        plan = min(candidates, key=lambda p: p.cost.step_seconds)
        held = sum(leaf.device_bytes(mesh) for leaf in plan.inputs if not leaf.path.startswith(self.batch_prefix))
        gradients = _replica_gradient_bytes(plan, params, mesh, plan.data_axes)
        return StageOption(mesh=mesh, seconds=plan.cost.step_seconds / microbatches,
                           weight_bytes=held + gradients, gradient_bytes=gradients,
                           activation_bytes=max(plan.cost.memory_bytes - held - gradients, 0.0),
                           update_included=True, detail=plan)

    def _loop_plan(self, mesh: C.MeshShape, name: str, microbatches: int, data_axes: tuple[str, ...],
                   params: set[str] = frozenset()):
        """The plan of a B-microbatch loop data parallel over ``data_axes`` (see `_looped_option`), its
        cost the step's; None when the batch does not split over the replicas.  Inside the loop no op
        splits over the data-parallel axes; the update, after it on the whole mesh, may."""
        share = microbatches * mesh.axis_size(data_axes)
        if not self._divides(share):
            return None
        graph = self._graph(share)[0]
        looped = dataclasses.replace(graph, ops=[
            dataclasses.replace(op, repeat=op.repeat * microbatches) if op.role in (G.FORWARD, G.BACKWARD) else op
            for op in graph.ops])
        plan, _ = self._solve(looped, mesh, name, replica_axes=data_axes)
        if not data_axes:
            return plan
        reduce = self._gradient_all_reduce("<after the microbatch loop>",
                                           _replica_gradient_bytes(plan, params, mesh, data_axes), data_axes, mesh)
        cost = dataclasses.replace(
            plan.cost, step_seconds=plan.cost.step_seconds + reduce.seconds,
            communication_seconds=plan.cost.communication_seconds + reduce.seconds,
            communication_bytes=plan.cost.communication_bytes + reduce.wire_bytes)
        return dataclasses.replace(plan, cost=cost, data_axes=tuple(data_axes),
                                   collectives=plan.collectives + (reduce,))

    def _stage_option(self, start: int, end: int, mesh: C.MeshShape, name: str, state: float,
                      microbatches: int) -> StageOption:
        """A pipeline stage's `StageOption` as the runtime runs it: data parallel (manual) over the stage
        mesh's axes that split a microbatch, each replica on its share of every microbatch with nothing
        split inside (the runtime offers no tensor parallelism in a stage; an axis that does not divide
        the microbatch repeats the stage's work), the summed gradients all-reduced over the data axes
        once per step: 1/B of it per microbatch, as Alpa prices them.
        """
        split = [axis for axis in mesh.axis_names if mesh.axis_size(axis) > 1]
        for count in range(len(split), -1, -1):
            data_axes = next((axes for axes in itertools.combinations(split, count)
                              if self._divides(microbatches * mesh.axis_size(axes))), None)
            if data_axes is not None:
                break
        graph, units, unit_of = self._graph(microbatches * mesh.axis_size(data_axes))
        keep = {op.id for op in graph.ops if start <= unit_of[op.id] < end and op.role in (G.FORWARD, G.BACKWARD)}
        sub = sub_graph(graph, keep, [layer for unit in units[start:end] for layer in unit])
        plan, _ = self._solve(sub, mesh, name, replica_axes=tuple(split))
        param_bytes = sum(leaf.nbytes for leaf in plan.inputs
                          if not leaf.path.startswith(("boundary/", self.batch_prefix)))
        reduce = self._gradient_all_reduce(AFTER_TICKS, param_bytes, data_axes, mesh)
        plan = dataclasses.replace(plan, data_axes=data_axes, collectives=plan.collectives + (reduce,))
        boundary = sum(leaf.device_bytes(mesh) for leaf in plan.inputs if leaf.path.startswith("boundary/"))
        seconds = plan.cost.step_seconds + reduce.seconds / microbatches + self._receive_seconds(plan, mesh)
        return StageOption(mesh=mesh, seconds=seconds, weight_bytes=state + param_bytes, gradient_bytes=param_bytes,
                           activation_bytes=max(plan.cost.memory_bytes - param_bytes, 0.0) + boundary, detail=plan)

    def _gradient_all_reduce(self, where: str, nbytes: float, axes: Sequence[str], mesh: C.MeshShape):
        """The `plan.CollectiveUse` of the one all-reduce of summed gradients a data-parallel loop runs."""
        from autoplan._src import plan as P

        return P.CollectiveUse(where=where, op="all-reduce of the summed gradients", kind="all-reduce",
                               axes=tuple(axes), nbytes=nbytes,
                               wire_bytes=C.collective_bytes("all-reduce", nbytes, mesh.axis_size(tuple(axes))),
                               seconds=C.collective_seconds("all-reduce", nbytes, axes, mesh, self.cluster))

    def _divides(self, microbatches: int) -> bool:
        """Whether the batch splits into this many equal parts."""
        try:
            self._graph(microbatches)
        except PL.MicrobatchError:
            return False
        return True

    def _solve(self, sub: G.Graph, mesh: C.MeshShape, name: str, replica_axes: tuple[str, ...] = ()):
        """The ILP's plan of a sub-graph, and the seconds of its weight-gradient collectives."""
        from autoplan._src import api
        from autoplan._src import intra
        from autoplan._src.strategies import base as S

        options = intra.SolveOptions(memory_budget=None, time_limit=self.time_limit, replica_axes=replica_axes)
        problem = intra.build_problem(sub, S.Context(mesh=mesh, cluster=self.cluster), options)
        solution = intra.solve(problem, options)
        self.solves += 1
        sync, groups = 0.0, {}
        for i in intra.combined_ops(sub):  # as `api.evaluate` prices them: latency once per (kind, axes)
            strategy = problem.strategies[i][solution.op_strategy[i]]
            combined = intra.combined_latency(strategy, problem.ctx)
            sync += sum(col.seconds - combined.get((col.kind, tuple(col.axes)), 0.0) for col in strategy.collectives)
            groups.update(combined)
        sync += sum(groups.values())
        return api.build_plan(name, sub, problem, solution, None), sync

    def _receive_seconds(self, plan, mesh: C.MeshShape) -> float:
        """Point-to-point time to receive the stage's activations and cotangents for one microbatch.

        Every value the layer range reads from other layers arrives from a neighbouring stage.  Once the
        pipeline spans nodes (``total_devices`` above a node) some boundary crosses them, and every
        stage is priced at the inter-node link (conservative: the DP cannot see where boundaries fall).
        The runtime packs what a tick sends into one buffer per dtype, so latency is paid per dtype,
        not per value (a scanned stack's chunks read a dozen small loop constants).
        """
        cluster = self.cluster
        spanned = self.total_devices if self.total_devices is not None else mesh.size
        bandwidth = cluster.inter_node_bandwidth if spanned > cluster.devices_per_node or \
            mesh.size >= cluster.devices_per_node else cluster.intra_node_bandwidth
        leaves = [leaf for leaf in plan.inputs if leaf.path.startswith("boundary/") and leaf.shape]
        return (cluster.latency * len({leaf.dtype for leaf in leaves})
                + sum(leaf.device_bytes(mesh) for leaf in leaves) / bandwidth)


# ---------------------------------------------------------------------------
# `autoplan.plan(..., stages=, microbatches=, schedule=)`.


def _stage_mesh(mesh: C.MeshShape | None, stages: int | None) -> tuple[int | None, C.MeshShape | None]:
    """(stage count, the mesh inside one stage) that a pinned ``mesh=`` fixes."""
    if mesh is None:
        return stages, None
    if "stage" not in mesh.axis_names:
        if stages is not None and stages > 1:
            raise ValueError(
                f"mesh= pins {mesh.as_dict()}, which has no 'stage' axis, but stages={stages} forces a pipeline; "
                f"add a leading 'stage' axis of size {stages} (e.g. jax.make_mesh(({stages}, "
                f"{mesh.size // stages}), ('stage', 'data'))), or drop mesh= and pass num_devices={mesh.size}")
        return 1, mesh
    size = mesh.axis_size("stage")
    if stages is not None and stages != size:
        raise ValueError(f"stages={stages} but the pinned mesh's 'stage' axis has size {size}; make them agree")
    inner = [(n, k) for n, k in zip(mesh.axis_names, mesh.axis_sizes) if n != "stage"] or [("data", 1)]
    return size, C.MeshShape(axis_names=tuple(n for n, _ in inner), axis_sizes=tuple(k for _, k in inner))


def plan_pipeline(fn, *args, mesh=None, num_devices: int | None = None, cluster: C.Cluster,
                  memory_budget: float, stages: int | None = None, microbatches: int | None = None,
                  schedule: str | None = None, time_limit: float = 60.0, static_argnums: Sequence[int] = ()):
    """Plan ``fn(*args)`` as a pipeline: the stage DP over the step's layers, stage costs from the ILP.

    The batch is the last argument (every leaf split along its leading axis).
    Stages get equal submeshes (the SPMD runtime's ``stage`` axis); pinned
    ``stages`` / ``microbatches`` / ``schedule`` restrict the search (unpinned,
    the schedule is 1F1B or GPipe, whichever is cheaper as the runtime runs it).  The
    returned `Plan` carries the stages, schedule, microbatches, bubble
    fraction, the pipeline's predicted cost and runner-up plans
    (``plan.alternatives``); its leaf shardings are the intra-operator plan
    of the whole step on one stage's logical mesh.
    """
    import jax

    from autoplan._src import api
    from autoplan._src import plan as P
    from autoplan._src import trace as T

    if static_argnums:
        raise ValueError("pipeline planning (stages=, microbatches=, schedule=) does not take static_argnums yet; "
                         "close over static values instead")
    if schedule is not None and schedule not in PL.SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {PL.SCHEDULES}")
    # Unpinned, the planner weighs 1F1B (fewer residuals in flight) against GPipe (in lock step, a
    # forward tick waits only for forwards); interleaving is the user's to ask for.
    schedules = [schedule] if schedule else ["1f1b", "gpipe"]
    pinned = C.MeshShape.from_mesh(mesh) if mesh is not None else None
    stages, inner = _stage_mesh(pinned, stages)
    total = pinned.size if pinned is not None else (num_devices or len(jax.devices()))
    if stages is not None and (stages < 1 or total % stages):
        raise ValueError(f"stages={stages} does not divide the {total} devices into equal submeshes; "
                         f"pick a divisor of {total}")
    if stages != 1:
        unstacked = _unstacked(fn, args, stages, schedule)
        if unstacked is not None:
            return _plan_unstacked(unstacked, fn, args, mesh=mesh, num_devices=num_devices, cluster=cluster,
                                   memory_budget=memory_budget, stages=stages, microbatches=microbatches,
                                   schedule=schedule, time_limit=time_limit)
    names = T._argument_names(fn, len(args))
    batch_leaves = jax.tree_util.tree_leaves(args[-1])
    if not batch_leaves or not batch_leaves[0].shape:
        raise PL.MicrobatchError(f"the last argument ({names[-1]!r}) is the batch and needs array leaves with a "
                                 "leading batch axis to be cut into microbatches")
    examples = batch_leaves[0].shape[0]
    counts = [microbatches] if microbatches else [b for b in (1, 2, 4, 8, 16) if examples % b == 0]
    for b in counts:
        PL.microbatch_shapes(args, len(args) - 1, b, names)  # a clear error for a batch B does not divide

    def trace_at(b: int, opaque_structure: bool = False) -> G.Graph:
        return T.trace(fn, *PL.microbatch_shapes(args, len(args) - 1, b, names), opaque_structure=opaque_structure)

    meshes = (lambda d: [inner]) if inner is not None else functools.partial(runnable_meshes, total=total)
    cost = GraphStageCosts(trace_at, cluster, time_limit=time_limit, batch_prefix=names[-1], meshes=meshes,
                           runtime_trace_at=functools.partial(trace_at, opaque_structure=True))
    cost.total_devices = total
    units = cost.units(counts[0])
    candidates = [stages] if stages else [s for s in (1, 2, 4, 8, 16, 32) if s <= len(units) and total % s == 0]
    sizes = sorted({total // s for s in candidates})
    layer_names = ["+".join(u) for u in units]
    choices = []
    for name in schedules:
        try:
            # Every (stages, B) pair's best is kept: `_with_runtime_cost` re-ranks them with what the DP
            # leaves out (the update, the accumulation, the runtime's lock step).
            choice = solve_stages(len(units), total, cost, microbatches=counts, schedule=name,
                                  keep=len(counts) * len(candidates),
                                  memory_budget=memory_budget, sizes=sizes, num_stages=candidates, uniform=True,
                                  layer_names=layer_names, equal_share=_stack_share(args, units, name))
        except NoPipelineFits:
            if name == schedules[-1] and not choices:
                raise
            continue  # nothing fits this schedule's memory budget: the next one may
        choices.append(_interleaved(choice, cost, layer_names, memory_budget) if name == "interleaved" else choice)
    choice, runtime, parts = _with_runtime_cost(_pooled(choices), cost)
    return _pipeline_plan(choice, runtime, parts, cost, trace_at(1), cluster, memory_budget, time_limit, api, P)


def _unstacked(fn, args, stages: int | None, schedule: str | None):
    """`stacked.Unstacked` of a step that scans over one stack of layers (an ``nn.scan`` of blocks), so
    that stages can cut the stack; None for a step without one (or already cut)."""
    from autoplan._src import stacked

    if stacked.has_chunks(args):
        return None
    try:
        found = stacked.find_stack(fn, args)
    except ValueError:  # stacks of several lengths: each stays one layer unit
        return None
    if found is None or found["length"] < 2:
        return None
    virtual = 2 if schedule == "interleaved" else 1
    if stages is not None and found["length"] < stages * virtual:
        raise ValueError(f"stages={stages}" + (" with 2 chunks per row (interleaved)" if virtual > 1 else "")
                         + f" needs at least {stages * virtual} layers in the scanned stack, which has "
                         f"{found['length']}; ask for at most {found['length'] // virtual} stages")
    # Seeded with the stack just found, so that cutting these arguments does not trace the step again.
    return stacked.Unstacked(fn, stacked.chunk_count(found["length"], stages, virtual)).knowing(args, found)


def _stack_share(args, units: Sequence[Sequence[str]], schedule: str) -> list[int] | None:
    """Per layer unit, how many chunks of a cut stack it holds (`solve_stages`'s ``equal_share``), so
    that every stage row holds the same layers of each stacked leaf and the leaf lives between steps
    as one ``P("stage", ...)`` array (`stacked.UnstackedProgram`); None for a step without chunks, and
    under interleaving, whose rows hold chunks that are not contiguous anyway."""
    from autoplan._src import stacked
    from autoplan._src import trace as T

    if schedule == "interleaved" or not stacked.has_chunks(args):
        return None
    return [sum(1 for layer in unit if T.is_chunk_layer(layer)) for unit in units]


def _plan_unstacked(unstacked, fn, args, **options):
    """Plan the chunked step; a one-stage answer is re-planned on the step as written (one scan, not
    one per chunk), keeping the pipelines it beat as its alternatives."""
    plan = plan_pipeline(unstacked.chunked_step, *unstacked.split(*args), **options)
    if len(plan.stages) > 1:
        return dataclasses.replace(plan, stack_chunks=unstacked.chunks)
    flat = plan_pipeline(fn, *args, **(options | {"stages": 1, "microbatches": plan.microbatches}))
    return dataclasses.replace(flat, alternatives=plan.alternatives)


def _interleaved(choice: PipelineChoice, cost: GraphStageCosts, layer_names: Sequence[str],
                 budget: float) -> PipelineChoice:
    """The DP's choice and alternatives re-priced as interleaved 1F1B (`interleave`: the DP itself
    ranks contiguous stages); those with too few layers for their chunks or over ``budget`` dropped."""
    priced = [interleave(c, cost, layer_names) for c in (dataclasses.replace(choice, alternatives=()),
                                                         *choice.alternatives)]
    kept = sorted((c for c in priced if c is not None and all(s.memory_bytes <= budget for s in c.stages)),
                  key=lambda c: c.step_seconds)
    if not kept:
        raise ValueError(f"interleaved 1F1B runs 2 chunks per stage row, and the model's {len(layer_names)} layers "
                         f"do not fill {2 * len(choice.stages)} chunks (or they exceed the memory budget); use "
                         "fewer stages, or schedule='1f1b'")
    return dataclasses.replace(kept[0], alternatives=tuple(kept[1:]))


def _runtime_cost(choice: PipelineChoice, cost: GraphStageCosts, splits: dict):
    """`staging.RuntimeCost` of the runtime running ``choice`` (None for one stage): what the stage
    costs leave out.  ``splits`` caches the step's split per B."""
    from autoplan._src import staging

    if len(choice.stages) == 1:
        return None
    b = choice.microbatches
    # The runtime runs each stage data parallel over the axes its plan splits the batch over: every
    # replica runs its share of each microbatch, which is what it sends and stashes.
    replicas = math.prod(choice.stages[0].mesh.axis_size(axis) for axis in _stage_data_axes(choice, cost))
    if b * replicas not in splits:
        graph = cost.runtime_graph(b * replicas)
        splits[b * replicas] = PL.split_at_gradients(graph, PL._batch_leaves(graph, cost.batch_prefix))
    sched = PL.schedule(choice.schedule, stages=len(choice.stages), microbatches=b)
    cut = staging.cut_for_schedule(splits[b * replicas], sched, staging.plan_bounds(choice.stages, choice.schedule))
    return staging.runtime_cost(cut, sched)


def _stage_options(choice: PipelineChoice, cost: GraphStageCosts) -> list[list[StageOption]]:
    """The options (plans on their logical mesh) each chosen stage row runs: one per layer range (its
    chunks under interleaved 1F1B)."""
    return [[next(o for o in cost(i, j, s.devices, choice.microbatches) if o.mesh == s.mesh) for i, j in s.ranges]
            for s in choice.stages]


def _replica_gradient_bytes(plan, params: set[str], mesh: C.MeshShape, data_axes: Sequence[str]) -> float:
    """Per device, the gradients a microbatch loop sums: each parameter's, split as the plan splits the
    parameter but for the loop's data-parallel axes (every replica sums whole ones)."""
    return sum(leaf.nbytes / math.prod(mesh.axis_size(axis) for dim in leaf.spec for axis in dim
                                       if axis not in data_axes)
               for leaf in plan.inputs if leaf.path in params)


def _stage_data_axes(choice: PipelineChoice, cost: GraphStageCosts) -> tuple[str, ...]:
    """The axes every stage row's plan runs data parallel over (`GraphStageCosts._stage_option`): the
    runtime runs the stages data parallel over them."""
    sizes = choice.stages[0].mesh.as_dict()
    per_stage = [set(o.detail.data_axes) for row in _stage_options(choice, cost) for o in row]
    return tuple(axis for axis in sizes if all(axis in found for found in per_stage))


def _pipeline_mesh(choice: PipelineChoice) -> C.MeshShape:
    inner = choice.stages[0].mesh
    return C.MeshShape(axis_names=("stage", *inner.axis_names), axis_sizes=(len(choice.stages), *inner.axis_sizes))


def lockstep_parts(choice: PipelineChoice, chunk_seconds: Sequence[Sequence[float]], p2p_bytes: float,
                   cluster: C.Cluster, *, copy_bytes: float = 0.0) -> dict[str, float]:
    """One step of ``choice`` as the SPMD runtime (`staging`) runs it: the schedule's ticks in lock step,
    each as long as its slowest stage row's task, plus the sends and the copies around each tick.

    ``chunk_seconds[s][c]`` is forward + backward of one microbatch through chunk ``c`` of row ``s``
    (the stage ILP's price).  A forward task costs a third of it and a backward the other two thirds
    (a backward is twice a forward in matmul FLOPs; the runtime keeps the forward's residuals, so
    nothing is recomputed).  ``p2p_bytes`` are sent over the step in one ``ppermute`` per tick and
    direction the runtime moves a buffer (`pipeline.send_directions`), each paying the link's latency.
    Where the stage times are equal and sends free this is Σ t + (B - 1)·max t under GPipe
    ((S + B - 1) ticks of each kind); 1F1B's steady state pairs a forward with a backward in each tick.
    ``copies``: every tick each row moves ``copy_bytes`` (`staging.RuntimeCost.tick_copy_bytes`: the
    residual slot in and out of its switch, the chunk's parameters where a row runs several) at
    memory bandwidth.

    >>> stage = Stage(start=0, end=1, layers=("a",), devices=1, mesh=C.MeshShape(axis_names=("data",),
    ...               axis_sizes=(1,)), seconds=3.0, memory_bytes=0.0, in_flight=1)
    >>> two = PipelineChoice(stages=(stage, stage), microbatches=4, schedule="gpipe", step_seconds=0.0)
    >>> lockstep_parts(two, [[3.0], [3.0]], 0.0, C.get_cluster("a100-8x"))  # 5 forward ticks + 5 backward
    {'ticks': 15.0, 'sends': 0.0, 'copies': 0.0}
    """
    sched = PL.schedule(choice.schedule, stages=len(choice.stages), microbatches=choice.microbatches)
    kinds, virtual, _ = PL.task_tables(sched)
    rows = len(choice.stages)
    task = np.zeros(kinds.shape)
    for tick, row in np.ndindex(kinds.shape):
        if kinds[tick, row]:
            full = chunk_seconds[row][virtual[tick, row] // rows]
            task[tick, row] = full / 3 if kinds[tick, row] == 1 else full * 2 / 3
    sends = 0.0
    moves = int(PL.send_directions(sched).sum())
    if p2p_bytes and moves:
        sends = moves * C.collective_seconds("p2p", p2p_bytes / moves, ("stage",), _pipeline_mesh(choice), cluster)
    copies = sched.num_ticks * copy_bytes / cluster.memory_bandwidth
    return {"ticks": float(task.max(axis=1).sum()), "sends": sends, "copies": copies}


KEPT_ALTERNATIVES = 8  # runner-up plans a pipelined plan lists


def _pooled(choices: Sequence[PipelineChoice]) -> PipelineChoice:
    """The first choice with every other schedule's pipelines among its alternatives (a one-stage plan
    runs no schedule: it is kept once)."""
    more = [c for other in choices[1:] for c in (dataclasses.replace(other, alternatives=()), *other.alternatives)
            if len(c.stages) > 1]
    return dataclasses.replace(choices[0], alternatives=(*choices[0].alternatives, *more))


def _with_runtime_cost(choice: PipelineChoice, cost: GraphStageCosts):
    """The DP's choice and alternatives priced as the runtime runs them (`_step_parts`: ticks in lock
    step, the sends, the all-reduce over the stage axis of the gradients another stage's update
    reads, the update and the gradient accumulation).  Re-ranked; the best is returned with its
    `_runtime_cost` and its `_step_parts`, and `KEPT_ALTERNATIVES` runner-ups."""
    splits: dict = {}
    priced = []
    for c in (dataclasses.replace(choice, alternatives=()), *choice.alternatives):
        runtime = _runtime_cost(c, cost, splits)
        parts = _step_parts(c, runtime, cost)
        seconds = sum(parts["pipeline_seconds"].values())
        priced.append((dataclasses.replace(c, step_seconds=seconds), runtime, parts))
    priced.sort(key=lambda entry: entry[0].step_seconds)
    best, runtime, parts = priced[0]
    return dataclasses.replace(best, alternatives=tuple(c for c, _, _ in priced[1:KEPT_ALTERNATIVES])), runtime, parts


def _pipeline_plan(choice: PipelineChoice, runtime, parts: dict, cost: GraphStageCosts,
                   graph: G.Graph, cluster: C.Cluster, budget: float, time_limit: float, api, P):
    first = choice.stages[0]
    options = _stage_options(choice, cost)
    loop_plan = options[0][0].detail if runtime is None and options[0][0].update_included else None
    if loop_plan is not None:
        # One stage looping over microbatches runs the plan the stage DP priced: the whole step at
        # microbatch size (`GraphStageCosts._looped_option`), the batch leaves at full size.
        shapes = [graph.tensors[graph.ops[i].outputs[0]].shape for i in graph.input_ops]
        base = dataclasses.replace(loop_plan, name="autoplan", inputs=tuple(
            dataclasses.replace(leaf, shape=shape) for leaf, shape in zip(loop_plan.inputs, shapes)))
    else:
        base = api.plan_graph(graph, first.mesh, cluster, memory_budget=None, time_limit=time_limit, name="autoplan")
    mesh = first.mesh if len(choice.stages) == 1 else _pipeline_mesh(choice)
    busy = sum(s.seconds for s in choice.stages)
    if loop_plan is not None:  # its plan prices all B microbatches
        comm_share = loop_plan.cost.communication_seconds / loop_plan.cost.step_seconds
    else:
        comm_share = sum(o.detail.cost.communication_seconds for row in options for o in row) / busy if busy else 0.0
    step = choice.step_seconds
    memory, sent = choice.stages[0].memory_bytes, 0.0
    # Pipeline stages and a one-stage loop run data parallel over the axes their stage plans say.
    data_axes = _stage_data_axes(choice, cost) if runtime is not None else loop_plan.data_axes if loop_plan else ()
    # The batch is split as the runtime splits it: over the data-parallel axes, by examples.
    base = dataclasses.replace(base, inputs=tuple(
        dataclasses.replace(leaf, spec=(data_axes, *((),) * (len(leaf.shape) - 1)))
        if leaf.path.startswith(cost.batch_prefix) and leaf.shape else leaf for leaf in base.inputs))
    if runtime is not None:
        _warn_redundant_axes(first.mesh, data_axes)
        # A stage row keeps its own parameters and optimizer state, their packed copy the pipeline reads,
        # the values it received for every microbatch and the residuals of those in flight (the stash),
        # and one microbatch's working activations.
        memory = max(sum(o.weight_bytes for o in row) for row in options) + runtime.packed_bytes \
            + max(o.activation_bytes for row in options for o in row) + runtime.stash_bytes
        sent = runtime.p2p_bytes + C.collective_bytes("all-reduce", runtime.exchanged_bytes, len(choice.stages)) \
            + max(sum(use.wire_bytes for o in row for use in o.detail.collectives if use.where == AFTER_TICKS)
                  for row in options)
        base = dataclasses.replace(base, inputs=_with_homes(base.inputs, runtime.leaf_homes),
                                   outputs=_with_homes(base.outputs, runtime.output_homes))
    pipeline_cost = C.Cost(step_seconds=step, compute_seconds=step * (1 - comm_share),
                           communication_seconds=step * comm_share,
                           communication_bytes=loop_plan.cost.communication_bytes if loop_plan is not None else
                           choice.microbatches * max(sum(o.detail.cost.communication_bytes for o in row)
                                                     for row in options) + sent,
                           memory_bytes=memory)
    return dataclasses.replace(
        base, mesh=mesh, cost=pipeline_cost, memory_budget=budget, stages=choice.stages, schedule=choice.schedule,
        microbatches=choice.microbatches, data_axes=data_axes, alternatives=choice.alternatives,
        solver={**base.solver, "stage_solves": cost.solves, **parts})


def _step_parts(choice: PipelineChoice, runtime, cost: GraphStageCosts) -> dict:
    """The step's predicted seconds by part, for the plan's solver record: a pipeline's `lockstep_parts`
    and exchange, or one stage's microbatches (the DP's price); for both the update and the
    accumulation of the gradients (`update_parts`)."""
    options = _stage_options(choice, cost)
    extra = update_parts(choice, options, cost.cluster)
    if runtime is None:
        return {"pipeline_seconds": {"stage": choice.step_seconds, **extra}}
    parts = lockstep_parts(choice, [[o.seconds for o in row] for row in options], runtime.p2p_bytes, cost.cluster,
                           copy_bytes=runtime.tick_copy_bytes)
    exchange = C.collective_seconds("all-reduce", runtime.exchanged_bytes, ("stage",), _pipeline_mesh(choice),
                                    cost.cluster) if runtime.exchanged_bytes else 0.0
    return {"pipeline_seconds": {**parts, "exchange": exchange, **extra}, "p2p_bytes": runtime.p2p_bytes}


def update_parts(choice: PipelineChoice, options: Sequence[Sequence[StageOption]], cluster: C.Cluster
                 ) -> dict[str, float]:
    """What the stage DP leaves out of a step, priced at device memory bandwidth (both are
    memory-bound elementwise work):

    * ``update``: the optimizer, once per step, on each stage row's own state (rows in parallel): it
      reads and writes the row's parameters and optimizer state and reads its gradients, about twice
      the `StageOption.weight_bytes` of the row (none for an option whose plan includes the update,
      a one-stage loop's);
    * ``accumulate``: summing the microbatches' gradients.  One stage (a ``lax.scan`` over B > 1
      microbatches) reads and writes the sums once per microbatch; a pipeline does so on every tick
      of its schedule (the runtime's tick loop adds each task's contribution, zeros on forward and idle
      ticks, into the chunk's sums: a write of the contribution, reads of it and of the sums, a write
      of the sums).

    >>> mesh = C.MeshShape(axis_names=("data",), axis_sizes=(1,))
    >>> option = StageOption(mesh=mesh, seconds=1.0, weight_bytes=5e9, activation_bytes=0.0, gradient_bytes=1e9)
    >>> stage = Stage(start=0, end=1, layers=("a",), devices=1, mesh=mesh, seconds=1.0, memory_bytes=0.0, in_flight=1)
    >>> one = PipelineChoice(stages=(stage,), microbatches=4, schedule="1f1b", step_seconds=4.0)
    >>> update_parts(one, [[option]], C.get_cluster("a100-8x"))  # 10 GB, then 4 x 2 GB, at 2 TB/s
    {'update': 0.005, 'accumulate': 0.004}
    """
    bandwidth = cluster.memory_bandwidth
    update = max(2 * sum(o.weight_bytes for o in row if not o.update_included) for row in options) / bandwidth
    b = choice.microbatches
    if len(choice.stages) == 1:
        accumulate = (b * 2 * sum(o.gradient_bytes for o in options[0]) if b > 1 else 0.0) / bandwidth
    else:
        sched = PL.schedule(choice.schedule, stages=len(choice.stages), microbatches=b)
        accumulate = sched.num_ticks * 4 * max(o.gradient_bytes for row in options for o in row) / bandwidth
    return {"update": update, "accumulate": accumulate}


def _warn_redundant_axes(stage_mesh: C.MeshShape, data_axes: Sequence[str]) -> None:
    """Stages run data parallel over ``data_axes`` only (see `runnable_meshes`): say so when another
    axis of the stage mesh is larger than 1, since its devices repeat their stage's work."""
    idle = {axis: size for axis, size in stage_mesh.as_dict().items() if size > 1 and axis not in data_axes}
    if idle:
        how = f"data parallel over {' x '.join(data_axes)} only" if data_axes else \
            "unsplit: a microbatch's examples do not divide over the stage mesh's axes"
        warnings.warn(f"autoplan: pipeline stages run {how}; the devices along {idle} repeat their stage's work "
                      "(tensor parallelism inside a pipeline stage is not supported). Use fewer devices per stage, "
                      "a larger batch, or let the planner choose the mesh", stacklevel=2)


def _with_homes(leaves, homes):
    """Leaf layouts with the stage row that alone holds each (None: the whole mesh, or the batch)."""
    return tuple(dataclasses.replace(leaf, stage=home if home is not None and home >= 0 else None)
                 for leaf, home in zip(leaves, homes))


def evaluate_layout(cost: StageCost, bounds: Sequence[tuple[int, int]], devices: Sequence[int], microbatches: int,
                    *, schedule: str = "1f1b", layer_names: Sequence[str] | None = None) -> PipelineChoice:
    """The cost model's verdict on a given layout (a hand pipeline): each stage's fastest logical mesh.

    >>> table = lambda i, j, d, b: [StageOption(mesh=C.MeshShape(axis_names=("data",), axis_sizes=(d,)),
    ...     seconds=(j - i) / d / b, weight_bytes=0.0, activation_bytes=0.0)]
    >>> evaluate_layout(table, [(0, 2), (2, 4)], [1, 1], 4).step_seconds
    2.5
    """
    names = list(layer_names) if layer_names is not None else [str(i) for i in range(bounds[-1][1])]
    stages = []
    for k, ((i, j), d) in enumerate(zip(bounds, devices)):
        keep = in_flight(schedule, len(bounds) - k, microbatches)
        option = min(cost(i, j, d, microbatches), key=lambda o: o.seconds)
        stages.append(Stage(start=i, end=j, layers=tuple(names[i:j]), devices=d, mesh=option.mesh,
                            seconds=option.seconds, memory_bytes=option.memory(keep), in_flight=keep))
    return PipelineChoice(stages=tuple(stages), microbatches=microbatches, schedule=schedule,
                          step_seconds=pipeline_seconds([s.seconds for s in stages], microbatches))


def interleave(choice: PipelineChoice, cost: StageCost, layer_names: Sequence[str], *, virtual: int = 2
               ) -> PipelineChoice | None:
    """``choice`` run as interleaved 1F1B: each of its ``S`` stage rows runs ``virtual`` chunks of equal
    layers (`pipeline.even_bounds` over ``S * virtual``; row ``s`` gets chunks ``s, s + S, ...``), on the
    row's submesh and logical mesh.  A row's time per microbatch is the sum of its chunks'; the step is
    ``B t_max / (1 - bubble)`` with the published interleaved bubble ``(S - 1) / (v B + S - 1)``, i.e.
    ``(B + (S - 1) / v) t_max``.  None when the model has fewer than ``S * virtual`` layers.

    >>> mesh = C.MeshShape(axis_names=("data",), axis_sizes=(1,))
    >>> table = lambda i, j, d, b: [StageOption(mesh=mesh, seconds=float(j - i), weight_bytes=0.0,
    ...                                         activation_bytes=1.0)]
    >>> two = evaluate_layout(table, [(0, 4), (4, 8)], [1, 1], 4)
    >>> chosen = interleave(two, table, [str(i) for i in range(8)])
    >>> [s.chunks for s in chosen.stages], chosen.step_seconds
    ([((0, 2), (4, 6)), ((2, 4), (6, 8))], 18.0)
    """
    stages_count, b = len(choice.stages), choice.microbatches
    num_layers = choice.stages[-1].end
    if stages_count == 1 or num_layers < stages_count * virtual:
        return None if stages_count > 1 else choice
    bounds = PL.even_bounds(num_layers, stages_count * virtual)
    sched = PL.schedule("interleaved", stages=stages_count, microbatches=b, virtual=virtual)
    stages = []
    for row, stage in enumerate(choice.stages):
        chunks = tuple(bounds[row::stages_count])
        options = [next(o for o in cost(i, j, stage.devices, b) if o.mesh == stage.mesh) for i, j in chunks]
        keep = sched.in_flight(row)
        stages.append(dataclasses.replace(
            stage, start=chunks[0][0], end=chunks[-1][1], chunks=chunks,
            layers=tuple(name for i, j in chunks for name in layer_names[i:j]),
            seconds=sum(o.seconds for o in options), in_flight=keep,
            memory_bytes=sum(o.weight_bytes for o in options) + keep * max(o.activation_bytes for o in options)))
    slowest = max(s.seconds for s in stages)
    bubble = PL.bubble_formula("interleaved", stages_count, b, virtual)
    return PipelineChoice(stages=tuple(stages), microbatches=b, schedule="interleaved",
                          step_seconds=b * slowest / (1 - bubble))
