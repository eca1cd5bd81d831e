"""Intra-operator pass: pick one sharding strategy per operator with an ILP.

The problem follows Alpa: a one-hot choice per operator, a resharding cost per
edge (linearized with edge variables whose rows and columns sum to the two
choices), a per-device memory constraint at the liveness peaks, and
parameters tied to their updated outputs so the step can donate them.

Two reductions keep the ILP small enough to solve in seconds:

* *followers*: light operators (elementwise, broadcast, reduce) take the
  layout of their largest operand from the same layer and share its variable
  (layout operators such as reshape and transpose keep their own);
* *identical layers*: layers whose sub-graphs (forward, backward, optimizer
  update, parameters) are structurally equal share variables, so a 48-layer
  model costs about as much to plan as a 2-layer one.  The objective still
  counts every operator and edge of every layer.

Latency is charged as XLA runs collectives: the gradient reductions of the
backward pass are independent of one another, so XLA's combiner fuses them
into one tuple-shaped collective per kind and mesh axes.  Their fixed latency
is a fixed charge in the ILP (one indicator per kind and axes), not a cost
per tensor; only the bandwidth term is per tensor.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from autoplan._src import graph as G
from autoplan._src import milp
from autoplan._src.strategies import base as S
from autoplan._src.strategies import control
from autoplan._src.strategies.base import ELEMENTWISE

# Operators that follow an operand's layout rather than getting their own choice.  Layout
# operators (reshape, transpose, squeeze, expand_dims) keep a choice of their own: made to follow
# their operand, they could not change layout where XLA's propagation does, and a Hugging Face
# GPT-2 block with FSDP's inputs pinned was planned at 320.7 us of communication instead of 184.9
# (the optimum with no follower merged; 194.9 with these four free).
FOLLOWERS = frozenset(
    set(ELEMENTWISE)
    | {"broadcast_in_dim", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "cumsum", "argmax", "argmin"})


class PlanningError(ValueError):
    """No plan satisfies the request (e.g. the memory budget is too small)."""


class PlanningTimeoutWarning(UserWarning):
    """The ILP hit its time limit; the best plan found so far is returned."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SolveOptions:
    memory_budget: float | None = None  # bytes per device; None: no memory constraint
    time_limit: float = 60.0
    merge_followers: bool = True
    tie_layers: bool = True
    # Op id -> allowed specs of its first output (inputs) or operand (outputs): baselines pin layouts.
    pinned: Mapping[int, Sequence[S.Spec]] = dataclasses.field(default_factory=dict)
    memory_points: int = 8
    # Forward and backward ops run inside a region manual over these mesh axes (a microbatch loop data
    # parallel over them): they, and the inputs only they read, may not split over them.
    replica_axes: tuple[str, ...] = ()
    solver: str = "highs"  # or "cp-sat": see milp.py
    num_workers: int = 1  # CP-SAT's workers; one keeps plans deterministic
    solver_params: Mapping[str, object] | None = None  # scipy.optimize.milp options or CP-SAT parameters


@dataclasses.dataclass(kw_only=True, slots=True, eq=False)
class Problem:
    """The ILP in variable space, built from a graph and its strategies."""

    graph: G.Graph
    ctx: S.Context
    strategies: list[list[S.Strategy]]  # per op
    op_var: np.ndarray  # op id -> variable id
    op_map: list[np.ndarray]  # op id -> strategy index of the op for each choice of its variable
    num_choices: list[int]  # per variable
    node_cost: list[np.ndarray]  # per variable, seconds
    edge_cost: dict[tuple[int, int], np.ndarray]  # (var a, var b) -> seconds matrix
    allowed: list[np.ndarray | None]  # per variable: boolean mask of allowed choices (pins)
    # Collectives XLA combines: ops whose reductions pay latency once per (kind, axes) group,
    # and per variable the groups each choice uses (node_cost excludes those latencies).
    combined_ops: frozenset[int] = frozenset()
    var_groups: list[dict[tuple, np.ndarray]] = dataclasses.field(default_factory=list)
    group_latency: dict[tuple, float] = dataclasses.field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def num_vars(self) -> int:
        return len(self.num_choices)


def _op_strategies(graph: G.Graph, ctx: S.Context) -> list[list[S.Strategy]]:
    """Strategies per operator; an operator inside loops pays its compute and collectives per trip."""
    cache: dict[tuple, list[S.Strategy]] = {}
    warned: set[str] = set()
    combined = combined_ops(graph) if any(op.repeat != 1 for op in graph.ops) else frozenset()
    out = []
    for op, traffic in zip(graph.ops, _boundary_traffic(graph)):
        key = (op.signature, traffic, op.repeat, op.id in combined)
        found = cache.get(key)
        if found is None:
            if op.primitive in control.BOUNDARY_PRIMITIVES:  # free: what crosses is priced on the edges
                found = control.boundary(op, ctx)
            else:
                found = S.strategies_for(op, ctx, warned, traffic)
            if op.repeat != 1:
                found = [_repeated(s, op.repeat, ctx, latency_once=op.id in combined) for s in found]
            cache[key] = found
        out.append(found)
    return out


def _with_pinned_layouts(graph: G.Graph, strategies: list[list[S.Strategy]],
                         pinned: Mapping[int, Sequence[S.Spec]]) -> list[list[S.Strategy]]:
    """Give pinned graph leaves their pinned layouts where the rule does not offer them.

    Leaf rules enumerate mesh-ordered specs; a user may pin ``P(("model", "data"))``.
    """
    out = list(strategies)
    updated_by = {graph.input_ops[i]: graph.output_ops[o] for o, i in graph.aliases.items()}
    for op_id, specs in pinned.items():
        op = graph.ops[op_id]
        if op.role not in (G.INPUT, G.OUTPUT):
            continue
        have = {s.input_specs[0] if op.role == G.OUTPUT else s.output_specs[0] for s in out[op_id]}
        extra = [spec for spec in specs if spec not in have]
        # An updated output shares its input's variable: same list, same order.
        for target in (op_id, updated_by.get(op_id)) if op.role == G.INPUT else (op_id,):
            if target is None or not extra:
                continue
            as_output = graph.ops[target].role == G.OUTPUT
            out[target] = out[target] + [
                S.Strategy(name=S.spec_name(spec), output_specs=() if as_output else (spec,),
                           input_specs=(spec,) if as_output else ()) for spec in extra]
    return out


def _without_axes(graph: G.Graph, strategies: list[list[S.Strategy]], axes: set[str], ctx: S.Context
                  ) -> list[list[S.Strategy]]:
    """The strategies of forward and backward ops (and of inputs only they read) that split nothing over
    ``axes`` (`SolveOptions.replica_axes`); replication where none is left."""
    def inside(op: G.Op) -> bool:
        if op.role in (G.FORWARD, G.BACKWARD):
            return True
        readers = [graph.ops[c] for t in op.outputs for c, _ in graph.consumers[t]]
        return op.role == G.INPUT and bool(readers) and all(r.role in (G.FORWARD, G.BACKWARD) for r in readers)

    def free(strategy: S.Strategy) -> bool:
        return not any(set(dim) & axes for spec in strategy.input_specs + strategy.output_specs if spec
                       for dim in spec)

    out = list(strategies)
    for op in graph.ops:
        if inside(op):
            kept = [s for s in out[op.id] if free(s)]
            out[op.id] = kept or [_repeated(S.replicated_strategy(op, ctx), op.repeat, ctx, latency_once=False)]
    return out


def _through(graph: G.Graph, t: int) -> int:
    """The tensor ``t`` stands for once loop boundaries are looked through (a carry or slice is its source)."""
    producer = graph.ops[graph.tensors[t].producer]
    while producer.primitive in control.BOUNDARY_PRIMITIVES and producer.inputs[0] != G.LITERAL:
        t = producer.inputs[0]
        producer = graph.ops[graph.tensors[t].producer]
    return t


def _boundary_traffic(graph: G.Graph) -> tuple[S.OpTraffic, ...]:
    """`S.fused_traffic` with loop boundaries transparent: a value crossing a body boundary is read
    and written as it would be between the same operators of an unrolled loop."""
    if not any(op.primitive in control.BOUNDARY_PRIMITIVES for op in graph.ops):
        return S.fused_traffic(graph)
    traffic = S.phase_traffic(graph)
    ops, out = graph.ops, list(traffic)

    def consumers(t):  # consumers of t, looking through the boundaries it enters
        for c, _ in graph.consumers[t]:
            if ops[c].primitive in control.BOUNDARY_PRIMITIVES:
                yield from consumers(ops[c].outputs[0])
            else:
                yield ops[c]

    for op in ops:
        if op.primitive in control.BOUNDARY_PRIMITIVES:
            continue
        reads = tuple(read if t == G.LITERAL or _through(graph, t) == t else not (
            op.primitive in S.FUSIBLE_CONSUMERS and S.fusible_producer(ops[graph.tensors[_through(graph, t)].producer]))
                      for t, read in zip(op.inputs, traffic[op.id].inputs))
        writes = tuple(write if not any(ops[c].primitive in control.BOUNDARY_PRIMITIVES
                                        for c, _ in graph.consumers[t]) else
                       op.primitive not in S.FUSIBLE_PRODUCERS or any(
                           c.primitive not in S.FUSIBLE_CONSUMERS or c.role != op.role or c.primitive == "output"
                           for c in consumers(t))
                       for t, write in zip(op.outputs, traffic[op.id].outputs))
        out[op.id] = S.OpTraffic(inputs=reads, outputs=writes)
    next_iteration = {leaving: entering for entering, leaving in graph.ties}

    def kernel_consumers(t):  # a carry feeds the next iteration's body, as in the unrolled loop
        for c, _ in graph.consumers[t]:
            if c in next_iteration:
                yield from consumers(ops[next_iteration[c]].outputs[0])
            elif ops[c].primitive in control.BOUNDARY_PRIMITIVES:
                yield from kernel_consumers(ops[c].outputs[0])
            else:
                yield ops[c]

    return S.with_fusion_kernels(graph, out, kernel_consumers)


def _repeated(strategy: S.Strategy, times: int, ctx: S.Context, *, latency_once: bool) -> S.Strategy:
    """``strategy`` run ``times`` times (an operator in a loop body): compute and collectives scale.

    With ``latency_once`` (weight-gradient reductions, `combined_ops`) the
    combinable collectives pay their latency once: they are independent across
    iterations, and XLA's while-loop all-reduce code motion moves them out of
    the loop into the one combined collective an unrolled model gets.
    """
    def scaled(c: S.Collective) -> S.Collective:
        fixed = min(ctx.cluster.latency, c.seconds) if latency_once and c.kind in COMBINED_KINDS else 0.0
        return dataclasses.replace(c, seconds=(c.seconds - fixed) * times + fixed, wire_bytes=c.wire_bytes * times)

    return dataclasses.replace(strategy, compute_seconds=strategy.compute_seconds * times,
                               collectives=tuple(scaled(c) for c in strategy.collectives))


def _follow_map(op: G.Op, k: int, prod_strats: list[S.Strategy], out_index: int,
                own: list[S.Strategy]) -> np.ndarray | None:
    """For each producer strategy, the cheapest own strategy taking operand k as produced.

    None (do not merge) if some producer layout has no own strategy, or leaves
    a choice of result layout: a broadcast's new dims, a reshape's split dims.
    Merging such an op would fix that choice by its own cost alone, before the
    consumers are seen (a causal mask broadcast to (batch, heads, q, k) split
    over heads where every consumer wants batch).
    """
    best: dict[S.Spec, int] = {}
    results: dict[S.Spec, set] = defaultdict(set)
    for j, s in enumerate(own):
        spec = s.input_specs[k]
        if spec is None:
            continue
        results[spec].add(s.output_specs)
        if spec not in best or s.seconds < own[best[spec]].seconds:
            best[spec] = j
    result = np.empty(len(prod_strats), dtype=np.int64)
    for i, ps in enumerate(prod_strats):
        spec = ps.output_specs[out_index]
        j = best.get(spec)
        if j is None or len(results[spec]) > 1:
            return None
        result[i] = j
    return result


def _layer_signatures(graph: G.Graph) -> dict[str, tuple]:
    members: dict[str, list[int]] = defaultdict(list)
    for op in graph.ops:
        members[op.layer].append(op.id)
    sigs = {}
    for layer, ids in members.items():
        local = {op_id: i for i, op_id in enumerate(ids)}
        items = []
        for op_id in ids:
            op = graph.ops[op_id]
            links = []
            for t in op.inputs:
                if t == G.LITERAL:
                    links.append(None)
                    continue
                tensor = graph.tensors[t]
                links.append((local.get(tensor.producer, -1), tensor.output_index))
            items.append((op.signature, op.role, tuple(links)))
        sigs[layer] = (tuple(items), tuple(ids))
    return sigs


COMBINED_KINDS = frozenset({"all-reduce", "reduce-scatter"})


def combined_ops(graph: G.Graph) -> frozenset[int]:
    """Backward ops whose results never feed another backward dot or convolution: weight gradients.

    Their reductions are mutually independent, which is what lets XLA's
    all-reduce / reduce-scatter combiners fuse them into one collective.  An
    activation gradient (which feeds the next layer's backward matmuls) is on
    the critical chain and its reductions stay separate.
    """
    heavy = {"dot_general", "conv_general_dilated"}
    feeds_heavy = np.zeros(len(graph.ops), dtype=bool)
    for op in reversed(graph.ops):
        for t in op.outputs:
            for consumer, _ in graph.consumers[t]:
                c = graph.ops[consumer]
                if feeds_heavy[consumer] or (c.role == G.BACKWARD and c.primitive in heavy):
                    feeds_heavy[op.id] = True
                    break
            if feeds_heavy[op.id]:
                break
    return frozenset(op.id for op in graph.ops if op.role == G.BACKWARD and not feeds_heavy[op.id])


def combined_latency(strategy: S.Strategy, ctx: S.Context) -> dict[tuple, float]:
    """The latency of each combinable collective of ``strategy``, keyed by (kind, axes)."""
    groups: dict[tuple, float] = {}
    for col in strategy.collectives:
        if col.kind in COMBINED_KINDS and col.seconds > 0:
            groups[(col.kind, tuple(col.axes))] = ctx.cluster.latency
    return groups


def build_problem(graph: G.Graph, ctx: S.Context, options: SolveOptions = SolveOptions()) -> Problem:
    start = time.perf_counter()
    ops = graph.ops
    strategies = _with_pinned_layouts(graph, _op_strategies(graph, ctx), options.pinned)
    if options.replica_axes:
        strategies = _without_axes(graph, strategies, set(options.replica_axes), ctx)
    n_ops = len(ops)
    root = np.arange(n_ops)  # op -> op whose variable it shares
    maps: list[np.ndarray | None] = [None] * n_ops  # op strategy index per root choice

    # 1. Followers share their operand's producer variable.
    if options.merge_followers:
        for op in ops:
            if op.primitive not in FOLLOWERS or op.id in options.pinned:
                continue
            candidates = []
            for k, t in enumerate(op.inputs):
                if t == G.LITERAL:
                    continue
                tensor = graph.tensors[t]
                producer = ops[tensor.producer]
                if producer.layer != op.layer or producer.role == G.OUTPUT:
                    continue
                candidates.append((-tensor.size, k, tensor))
            for _, k, tensor in sorted(candidates, key=lambda c: (c[0], c[1])):
                p = tensor.producer
                fmap = _follow_map(op, k, strategies[p], tensor.output_index, strategies[op.id])
                if fmap is None:
                    continue
                r = root[p]
                base = maps[p] if maps[p] is not None else np.arange(len(strategies[p]))
                root[op.id] = r
                maps[op.id] = fmap[base]
                break

    # 2. Updated outputs share the variable of the input they update (same spec list, same order),
    #    and a loop carry leaves its body in the layout it entered with (`G.Graph.ties`).
    equal = [(graph.input_ops[i], graph.output_ops[o]) for o, i in graph.aliases.items()] + list(graph.ties)
    for first, second in equal:
        root[second] = root[first]
        maps[second] = maps[first]

    # 3. Structurally identical layers share variables position by position.
    if options.tie_layers:
        groups: dict[tuple, list[tuple[int, ...]]] = defaultdict(list)
        for layer, (sig, ids) in _layer_signatures(graph).items():
            if layer:
                groups[sig].append(ids)
        for members in groups.values():
            first = members[0]
            for ids in members[1:]:
                for op_id, target in zip(ids, first):
                    # Followers and aliases already point at a root of their own layer.
                    if root[op_id] != op_id or root[target] != target:
                        continue
                    if op_id in options.pinned or target in options.pinned:
                        continue
                    root[op_id] = target
                    maps[op_id] = None

    # Resolve roots transitively (followers of tied roots, tied alias roots...).
    for op_id in range(n_ops):
        r = root[op_id]
        m = maps[op_id]
        while root[r] != r:
            rm = maps[r]
            m = m[rm] if (m is not None and rm is not None) else (rm if m is None else m)
            r = root[r]
        root[op_id] = r
        maps[op_id] = m

    var_of_root: dict[int, int] = {}
    op_var = np.empty(n_ops, dtype=np.int64)
    num_choices: list[int] = []
    for op_id in range(n_ops):
        r = int(root[op_id])
        if r not in var_of_root:
            var_of_root[r] = len(num_choices)
            num_choices.append(len(strategies[r]))
        op_var[op_id] = var_of_root[r]
    op_map = [maps[i] if maps[i] is not None else np.arange(num_choices[op_var[i]]) for i in range(n_ops)]

    # Node costs; combinable collectives leave their latency to one indicator per group.
    combined = combined_ops(graph)
    cost_cache: dict[tuple, tuple[np.ndarray, dict]] = {}
    node_cost = [np.zeros(n) for n in num_choices]
    var_groups: list[dict[tuple, np.ndarray]] = [{} for _ in num_choices]
    group_latency: dict[tuple, float] = {}
    for op_id in range(n_ops):
        key = (id(strategies[op_id]), op_id in combined)
        cached = cost_cache.get(key)
        if cached is None:
            vec = np.array([s.seconds for s in strategies[op_id]])
            uses: dict[tuple, np.ndarray] = {}
            if op_id in combined:
                for j, strategy in enumerate(strategies[op_id]):
                    for group, latency in combined_latency(strategy, ctx).items():
                        vec[j] -= latency
                        uses.setdefault(group, np.zeros(len(vec), bool))[j] = True
                        group_latency[group] = latency
            cached = cost_cache[key] = (vec, uses)
        vec, uses = cached
        v = op_var[op_id]
        node_cost[v] += vec[op_map[op_id]]
        for group, mask in uses.items():
            group_latency.setdefault(group, ctx.cluster.latency)
            used = mask[op_map[op_id]]
            var_groups[v][group] = var_groups[v][group] | used if group in var_groups[v] else used

    # Edge costs.
    matrix_cache: dict[tuple, np.ndarray] = {}
    edge_cost: dict[tuple[int, int], np.ndarray] = {}
    for op in ops:
        vb = op_var[op.id]
        for k, t in enumerate(op.inputs):
            if t == G.LITERAL:
                continue
            tensor = graph.tensors[t]
            a = tensor.producer
            key = (id(strategies[a]), tensor.output_index, id(strategies[op.id]), k, tensor.shape, tensor.dtype)
            mat = matrix_cache.get(key)
            if mat is None:
                src = [s.output_specs[tensor.output_index] for s in strategies[a]]
                dst = [s.input_specs[k] for s in strategies[op.id]]
                mat = matrix_cache[key] = S.reshard_matrix(src, dst, tensor.shape, tensor.dtype, ctx)
            if not mat.any():
                continue
            va = op_var[a]
            sub = mat[np.ix_(op_map[a], op_map[op.id])]
            if op.repeat != 1:  # resharded where it is read: inside the consumer's loops
                sub = sub * op.repeat
            if va == vb:
                node_cost[va] += np.diagonal(sub)
            elif (va, vb) in edge_cost:
                edge_cost[(va, vb)] += sub
            elif (vb, va) in edge_cost:
                edge_cost[(vb, va)] += sub.T
            else:
                edge_cost[(va, vb)] = sub.copy()

    allowed: list[np.ndarray | None] = [None] * len(num_choices)
    for op_id, specs in options.pinned.items():
        op = ops[op_id]
        strategies_op = strategies[op_id]
        specs = set(specs)
        if op.role == G.OUTPUT:
            ok = np.array([s.input_specs[0] in specs for s in strategies_op])
        else:
            ok = np.array([s.output_specs[0] in specs for s in strategies_op])
        mask = ok[op_map[op_id]]
        v = op_var[op_id]
        allowed[v] = mask if allowed[v] is None else (allowed[v] & mask)
    for v, mask in enumerate(allowed):
        if mask is not None and not mask.any():
            names = [ops[i].path or ops[i].label for i in np.nonzero(op_var == v)[0][:3]]
            raise PlanningError(f"pinned layouts for {names} leave no valid strategy (shape not divisible?)")

    return Problem(graph=graph, ctx=ctx, strategies=strategies, op_var=op_var, op_map=op_map,
                   num_choices=num_choices, node_cost=node_cost, edge_cost=edge_cost, allowed=allowed,
                   combined_ops=combined, var_groups=var_groups, group_latency=group_latency,
                   build_seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------
# Memory: per-device bytes of live tensors at a point of the schedule.


def _tensor_bytes_vectors(problem: Problem) -> list[np.ndarray | None]:
    """Per tensor: per-device bytes for each choice of its producer's variable."""
    graph, ctx = problem.graph, problem.ctx
    cache: dict[tuple, np.ndarray] = {}
    out: list[np.ndarray | None] = []
    for tensor in graph.tensors:
        producer = tensor.producer
        strategies = problem.strategies[producer]
        key = (id(strategies), tensor.output_index, tensor.nbytes)
        vec = cache.get(key)
        if vec is None:
            vec = cache[key] = np.array([tensor.nbytes / ctx.shards(s.output_specs[tensor.output_index])
                                         for s in strategies])
        out.append(vec[problem.op_map[producer]])
    return out


def live_intervals(graph: G.Graph) -> list[tuple[int, int]]:
    """(first, last) op index at which each tensor occupies memory.

    Values XLA keeps inside a fusion (`S.fused_traffic`) never occupy device
    memory: their interval is empty (first > last).
    """
    end = len(graph.ops)
    written = [traffic.outputs for traffic in S.fused_traffic(graph)]
    intervals = []
    for tensor in graph.tensors:
        if not written[tensor.producer][tensor.output_index]:
            intervals.append((end + 1, end))
            continue
        first = 0 if graph.ops[tensor.producer].role in (G.INPUT, G.CONSTANT) else tensor.producer
        last = graph.last_use[tensor.id]
        if graph.consumers[tensor.id] and any(graph.ops[c].role == G.OUTPUT for c, _ in graph.consumers[tensor.id]):
            last = end
        intervals.append((first, last))
    return intervals


def memory_profile(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Per-device live bytes at every op index under a choice per variable."""
    graph = problem.graph
    vectors = _tensor_bytes_vectors(problem)
    delta = np.zeros(len(graph.ops) + 2)
    for tensor, (first, last) in zip(graph.tensors, live_intervals(graph)):
        nbytes = vectors[tensor.id][choice[problem.op_var[tensor.producer]]]
        delta[first] += nbytes
        delta[last + 1] -= nbytes
    return np.cumsum(delta)[: len(graph.ops) + 1]


def _memory_terms(problem: Problem, point: int, vectors, intervals) -> dict[int, np.ndarray]:
    terms: dict[int, np.ndarray] = {}
    for tensor, (first, last) in zip(problem.graph.tensors, intervals):
        if first <= point <= last:
            v = problem.op_var[tensor.producer]
            vec = vectors[tensor.id]
            terms[v] = terms[v] + vec if v in terms else vec.copy()
    return terms


def _candidate_points(problem: Problem, count: int, intervals) -> list[int]:
    """Points where the replicated and the fully sharded live bytes peak."""
    graph = problem.graph
    n = len(graph.ops) + 1
    points = []
    for mode in (0, 1):
        delta = np.zeros(n + 1)
        for tensor, (first, last) in zip(graph.tensors, intervals):
            b = tensor.nbytes if mode == 0 else tensor.nbytes / problem.ctx.mesh.size
            delta[first] += b
            delta[last + 1] -= b
        profile = np.cumsum(delta)[:n]
        points.extend(int(i) for i in np.argsort(-profile, kind="stable")[:count])
    return sorted(set(points))


# ---------------------------------------------------------------------------
# Solving.


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Solution:
    choice: np.ndarray  # per variable
    op_strategy: np.ndarray  # per op: index into problem.strategies[op]
    objective_seconds: float
    peak_memory: float
    status: str  # "optimal" | "feasible"
    solve_seconds: float
    num_vars: int
    num_edges: int


def objective_of(problem: Problem, choice: np.ndarray) -> float:
    total = sum(float(c[choice[v]]) for v, c in enumerate(problem.node_cost))
    total += sum(float(m[choice[a], choice[b]]) for (a, b), m in problem.edge_cost.items())
    return total + sum(problem.group_latency[g] for g in used_groups(problem, choice))


def used_groups(problem: Problem, choice: np.ndarray) -> set[tuple]:
    """The combined-collective groups (kind, axes) that a choice per variable uses."""
    return {g for v, groups in enumerate(problem.var_groups) for g, mask in groups.items() if mask[choice[v]]}


def _full_node_cost(problem: Problem, v: int) -> np.ndarray:
    """Node cost of variable ``v`` charging every group latency it might have to pay alone."""
    cost = problem.node_cost[v].copy()
    for group, mask in (problem.var_groups[v] if problem.var_groups else {}).items():
        cost += mask * problem.group_latency[group]
    return cost


def _neighbors(problem: Problem) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Per variable: (neighbour, cost matrix with this variable's choices as rows)."""
    neighbors: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (a, b), m in problem.edge_cost.items():
        neighbors[a].append((b, m))
        neighbors[b].append((a, m.T))
    return neighbors


def _group_cost(problem: Problem, v: int, group_count: dict[tuple, int]) -> np.ndarray:
    """Per choice of ``v``: latency of the combined groups it would be the only user of."""
    cost = np.zeros(problem.num_choices[v])
    for group, mask in (problem.var_groups[v] if problem.var_groups else {}).items():
        if group_count.get(group, 0) == 0:
            cost += mask * problem.group_latency[group]
    return cost


def _count_groups(problem: Problem, choice: np.ndarray, skip: int = -1) -> dict[tuple, int]:
    counts: dict[tuple, int] = defaultdict(int)
    for v, groups in enumerate(problem.var_groups):
        if v == skip or choice[v] < 0:
            continue
        for group, mask in groups.items():
            counts[group] += int(mask[choice[v]])
    return counts


def greedy_choice(problem: Problem) -> np.ndarray:
    """Warm start: the better of two greedy passes, one paying each combined latency when first
    used and one treating it as paid (which favours plans whose gradients share one collective)."""
    starts = [_greedy(problem, groups_paid=False)]
    if problem.group_latency:
        starts.append(_greedy(problem, groups_paid=True))
    starts.append(improve_locally(problem, _least_split(problem)))
    return min(starts, key=lambda choice: objective_of(problem, choice))


def _first_ops(problem: Problem) -> np.ndarray:
    """Per variable, the first op (in graph order) that takes it."""
    first_op = np.full(problem.num_vars, np.iinfo(np.int64).max)
    np.minimum.at(first_op, problem.op_var, np.arange(len(problem.op_var)))
    return first_op


def _least_split(problem: Problem) -> np.ndarray:
    """Every variable at its allowed choice that splits least (replicated where it may be).

    Greedy in graph order can commit early ops to splits that every later op then pays to
    undo; on a small model (a tiny Hugging Face T5) that start was 10x the optimum and
    CP-SAT spent a minute climbing down from it.
    """
    choice = np.zeros(problem.num_vars, dtype=np.int64)
    for v, op_id in enumerate(_first_ops(problem)):
        strategies = problem.strategies[op_id]
        splits = np.array([sum(len(axes) for spec in strategies[i].output_specs + strategies[i].input_specs
                               if spec is not None for axes in spec) for i in problem.op_map[op_id]], dtype=float)
        if problem.allowed[v] is not None:
            splits[~problem.allowed[v]] = np.inf
        choice[v] = int(np.argmin(splits + 1e-9 * problem.node_cost[v]))
    return choice


def _greedy(problem: Problem, *, groups_paid: bool) -> np.ndarray:
    """Each variable, in graph order, takes its cheapest choice given earlier ones; then ICM."""
    order = np.argsort(_first_ops(problem), kind="stable")
    neighbors = _neighbors(problem)
    choice = np.full(problem.num_vars, -1, dtype=np.int64)
    group_count: dict[tuple, int] = defaultdict(int)
    if groups_paid:
        group_count.update({group: 1 for group in problem.group_latency})
    for v in order:
        cost = problem.node_cost[v] + _group_cost(problem, v, group_count)
        for u, m in neighbors[v]:
            if choice[u] >= 0:
                cost += m[:, choice[u]]
        if problem.allowed[v] is not None:
            cost[~problem.allowed[v]] = np.inf
        choice[v] = int(np.argmin(cost))
        for group, mask in (problem.var_groups[v] if problem.var_groups else {}).items():
            group_count[group] += int(mask[choice[v]])
    return improve_locally(problem, choice, neighbors)


def improve_locally(problem: Problem, choice: np.ndarray, neighbors=None, rounds: int = 20) -> np.ndarray:
    """Iterated conditional modes: re-pick each variable given its neighbours until nothing improves."""
    if neighbors is None:
        neighbors = _neighbors(problem)
    choice = choice.copy()
    for _ in range(rounds):
        changed = False
        for v in range(problem.num_vars):
            cost = problem.node_cost[v].copy()
            if problem.var_groups and problem.var_groups[v]:
                cost += _group_cost(problem, v, _count_groups(problem, choice, skip=v))
            for u, m in neighbors[v]:
                cost += m[:, choice[u]]
            if problem.allowed[v] is not None:
                cost[~problem.allowed[v]] = np.inf
            best = int(np.argmin(cost))
            if cost[best] < cost[choice[v]] - 1e-15:
                choice[v] = best
                changed = True
        if not changed:
            break
    return choice


def prune_dominated(problem: Problem, vectors) -> list[np.ndarray | None]:
    """Dead-end elimination: drop choices that another choice of the same variable beats
    whatever the neighbours pick, using no more memory for any tensor.

    Choice i of variable v is dominated by j when
    ``c[j] - c[i] + sum over edges of max_k (M[j, k] - M[i, k]) <= 0``; at least
    one optimal plan survives, so the ILP's optimum is unchanged.
    """
    n_vars = problem.num_vars
    allowed = [np.ones(n, bool) if a is None else a.copy() for n, a in zip(problem.num_choices, problem.allowed)]
    neighbors = _neighbors(problem)
    produced: dict[int, list[np.ndarray]] = defaultdict(list)
    for tensor in problem.graph.tensors:
        produced[int(problem.op_var[tensor.producer])].append(vectors[tensor.id])
    mem_ok = {}
    for v in range(n_vars):
        if problem.num_choices[v] <= 1:
            continue
        mats = produced.get(v)
        if mats:
            table = np.stack(mats)  # tensors x choices
            mem_ok[v] = np.all(table[:, None, :] <= table[:, :, None] * (1 + 1e-12), axis=0)  # [i, j]: j <= i
        else:
            mem_ok[v] = np.ones((problem.num_choices[v],) * 2, bool)
    changed, rounds = True, 0
    while changed and rounds < 10:
        changed, rounds = False, rounds + 1
        for v in range(n_vars):
            live = np.nonzero(allowed[v])[0]
            if len(live) <= 1:
                continue
            c = problem.node_cost[v][live]
            full = _full_node_cost(problem, v)[live]
            gain = full[None, :] - c[:, None]  # [i, j] = c[j] (paying its group latencies alone) - c[i]
            for u, m in neighbors[v]:
                sub = m[np.ix_(live, np.nonzero(allowed[u])[0])]
                gain = gain + np.max(sub[None, :, :] - sub[:, None, :], axis=2)
            tol = 1e-12 * (1 + np.abs(c).max())
            dominated = (gain <= tol) & mem_ok[v][np.ix_(live, live)]
            np.fill_diagonal(dominated, False)
            # Equal choices dominate each other: keep the first of each such group.
            mutual = dominated & dominated.T
            dominated &= ~mutual | (np.arange(len(live))[:, None] > np.arange(len(live))[None, :])
            drop = dominated.any(axis=1)
            # Never drop every choice (tolerance can make near-equal choices beat each other in a cycle).
            if drop.any() and not drop.all():
                allowed[v][live[drop]] = False
                changed = True
    return [a if not a.all() else None for a in allowed]


def solve(problem: Problem, options: SolveOptions = SolveOptions()) -> Solution:
    start = time.perf_counter()
    vectors = _tensor_bytes_vectors(problem)
    problem = dataclasses.replace(problem, allowed=prune_dominated(problem, vectors))
    intervals = live_intervals(problem.graph)
    budget = options.memory_budget
    points = _candidate_points(problem, options.memory_points, intervals) if budget is not None else []
    hint = greedy_choice(problem)
    status = "optimal"
    for _ in range(8):
        choice, status = _solve_once(problem, options, points, vectors, intervals, hint, minimize_memory=False)
        if choice is None:
            need = minimum_memory(problem, options, vectors, intervals)
            raise PlanningError(
                f"no plan fits the memory budget of {_gib(budget)} per device: the plan using the least "
                f"memory needs {_gib(need)} per device. Raise memory_budget, use more devices, or shrink "
                "the batch.")
        if budget is None:
            break
        profile = memory_profile(problem, choice)
        worst = int(np.argmax(profile))
        if profile[worst] <= budget * (1 + 1e-9) or worst in points:
            break
        points = sorted(set(points) | {worst})
        hint = choice
    profile = memory_profile(problem, choice)
    op_strategy = np.array([problem.op_map[i][choice[problem.op_var[i]]] for i in range(len(problem.op_var))])
    return Solution(choice=choice, op_strategy=op_strategy, objective_seconds=objective_of(problem, choice),
                    peak_memory=float(profile.max()), status=status, solve_seconds=time.perf_counter() - start,
                    num_vars=problem.num_vars, num_edges=len(problem.edge_cost))


def _gib(nbytes: float | None) -> str:
    if nbytes is None:
        return "unbounded"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


def _solve_once(problem: Problem, options: SolveOptions, points, vectors, intervals, hint, *,
                minimize_memory: bool):
    rows = milp.Rows()
    offsets = np.concatenate([[0], np.cumsum(problem.num_choices)]).astype(np.int64)
    scale = 0.0 if minimize_memory else 1e6  # the objective in microseconds
    tie_break = _input_bytes_tie_break(problem, vectors) if not minimize_memory else None
    for v, c in enumerate(problem.node_cost):
        allowed = problem.allowed[v] if problem.allowed[v] is not None else np.ones(len(c), bool)
        cost = scale * (c - c.min()) + (tie_break[v] if tie_break is not None else 0.0)
        x = rows.add_variables(len(c), integral=True, cost=cost, upper=allowed.astype(float),
                               start=np.arange(len(c)) == hint[v])
        assert x[0] == offsets[v]
        rows.add_row(x, np.ones(len(c)), lower=1.0, upper=1.0)
    for (a, b), m in problem.edge_cost.items():
        _add_edge(rows, problem, a, b, m, offsets, hint, scale)
    # Fixed charge: a group's latency is paid once if any choice uses it.
    hinted_groups = used_groups(problem, hint)
    group_var = {g: int(rows.add_variables(1, integral=False, cost=scale * latency, start=g in hinted_groups)[0])
                 for g, latency in problem.group_latency.items()}
    for v, groups in enumerate(problem.var_groups):
        for g, mask in groups.items():
            chosen = offsets[v] + np.nonzero(mask)[0]
            rows.add_row(np.append(chosen, group_var[g]), np.append(np.ones(len(chosen)), -1.0), upper=0.0)
    # Memory rows in units of a ten-millionth of the budget (CP-SAT rounds each coefficient up).
    mem_unit = max(1.0, (options.memory_budget or 1.0) / 1e7)
    if minimize_memory:
        peak = int(rows.add_variables(1, integral=False, cost=1.0, upper=math.inf,
                                      start=memory_profile(problem, hint).max() / mem_unit)[0])
    for point in points:
        terms = _memory_terms(problem, point, vectors, intervals)
        index = np.concatenate([offsets[v] + np.arange(len(vec)) for v, vec in terms.items()])
        coefficients = np.concatenate(list(terms.values())) / mem_unit
        if minimize_memory:
            rows.add_row(np.append(index, peak), np.append(coefficients, -1.0), upper=0.0)
        else:
            rows.add_row(index, coefficients, upper=math.floor(options.memory_budget / mem_unit)
                         if options.memory_budget is not None else math.inf)
    result = milp.solve(rows.build(), solver=options.solver, time_limit=options.time_limit,
                        num_workers=options.num_workers, params=options.solver_params)
    if result.values is None:
        if result.status == "unknown" and not minimize_memory:
            # Out of time before any solution: fall back on the warm start if it fits.
            fits = options.memory_budget is None or memory_profile(problem, hint).max() <= options.memory_budget
            if fits:
                warnings.warn(f"autoplan: the ILP hit its {options.time_limit:g} s time limit before improving on "
                              "the heuristic plan; returning that plan. Raise time_limit for a better one.",
                              PlanningTimeoutWarning, stacklevel=4)
                return hint, "feasible"
            raise PlanningError(f"the ILP found no plan within its {options.time_limit:g} s time limit; "
                                "raise time_limit")
        return None, "infeasible"
    if result.status == "feasible" and not minimize_memory:
        warnings.warn(f"autoplan: the ILP hit its {options.time_limit:.0f} s time limit; returning the best plan "
                      f"found (within {100 * result.gap:.1f}% of the bound). Raise time_limit for a better plan.",
                      PlanningTimeoutWarning, stacklevel=4)
    choice = np.array([int(np.argmax(result.values[offsets[v]:offsets[v + 1]]))
                       for v in range(len(problem.num_choices))], dtype=np.int64)
    if minimize_memory:
        return choice, float(result.values[peak]) * mem_unit
    return choice, result.status


def _input_bytes_tie_break(problem: Problem, vectors) -> list[np.ndarray]:
    """Per variable, 1e-6 us per KiB of the step's inputs it holds per device (about 500x less than
    reading those bytes once at 2 TB/s, so it only decides between plans priced alike).

    Among plans the cost model prices alike, the solver then takes the one holding the least of
    the inputs per device: a batch split over the devices rather than fed whole to each and sliced
    (the model prices the slice as free, but not the host feeding every device the whole batch).
    """
    tie_break = [np.zeros(n) for n in problem.num_choices]
    for op_id in problem.graph.input_ops:
        v = problem.op_var[op_id]
        for t in problem.graph.ops[op_id].outputs:
            if vectors[t] is not None:  # per choice of the variable
                tie_break[v] += 1e-6 * vectors[t] / 1024
    return tie_break


def _add_edge(rows: milp.Rows, problem: Problem, a: int, b: int, m: np.ndarray, offsets, hint, scale) -> None:
    """Alpa's linearized edge: a variable per (row class, column class), summing to the two choices.

    Only allowed choices take part; choices with equal rows (columns) of the cost matrix form one
    class, so an edge costs (row classes x column classes) variables, not (choices^2).
    """
    live_a = np.nonzero(problem.allowed[a])[0] if problem.allowed[a] is not None else np.arange(m.shape[0])
    live_b = np.nonzero(problem.allowed[b])[0] if problem.allowed[b] is not None else np.arange(m.shape[1])
    sub = m[np.ix_(live_a, live_b)]
    classes, row_class = np.unique(sub, axis=0, return_inverse=True)
    classes, col_class = np.unique(classes, axis=1, return_inverse=True)
    row_class, col_class = row_class.reshape(-1), col_class.reshape(-1)
    if not classes.any():
        return
    num_rows, num_cols = classes.shape
    hint_row = row_class[np.searchsorted(live_a, hint[a])] if hint[a] in live_a else -1
    hint_col = col_class[np.searchsorted(live_b, hint[b])] if hint[b] in live_b else -1
    start = np.zeros((num_rows, num_cols))
    if hint_row >= 0 and hint_col >= 0:
        start[hint_row, hint_col] = 1.0  # a complete warm start CP-SAT can load without searching
    edge = rows.add_variables(num_rows * num_cols, integral=False, cost=scale * classes.reshape(-1),
                              start=start.reshape(-1)).reshape(num_rows, num_cols)
    for r in range(num_rows):
        chosen = offsets[a] + live_a[row_class == r]
        rows.add_row(np.concatenate([edge[r], chosen]), np.concatenate([np.ones(num_cols), -np.ones(len(chosen))]),
                     lower=0.0, upper=0.0)
    for c in range(num_cols):
        chosen = offsets[b] + live_b[col_class == c]
        rows.add_row(np.concatenate([edge[:, c], chosen]), np.concatenate([np.ones(num_rows), -np.ones(len(chosen))]),
                     lower=0.0, upper=0.0)


def minimum_memory(problem: Problem, options: SolveOptions, vectors=None, intervals=None) -> float:
    """Smallest per-device peak any plan reaches (at the candidate points, refined until exact)."""
    vectors = vectors or _tensor_bytes_vectors(problem)
    intervals = intervals or live_intervals(problem.graph)
    points = _candidate_points(problem, options.memory_points, intervals)
    hint = greedy_choice(problem)
    for _ in range(8):
        choice, _ = _solve_once(problem, dataclasses.replace(options, memory_budget=None), points, vectors,
                                intervals, hint, minimize_memory=True)
        profile = memory_profile(problem, choice)
        worst = int(np.argmax(profile))
        if worst in points:
            break
        points = sorted(set(points) | {worst})
        hint = choice
    return float(memory_profile(problem, choice).max())
