"""`autoplan.plan`: trace a step, solve the intra-operator ILP, return a `Plan`."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

from autoplan._src import cluster as C
from autoplan._src import graph as G
from autoplan._src import intra
from autoplan._src import plan as P
from autoplan._src import trace as T
from autoplan._src.strategies import base as S


def resolve_mesh(mesh=None, num_devices: int | None = None) -> list[C.MeshShape]:
    """Candidate meshes: the given one, or every (data, model) factorization of ``num_devices``."""
    if mesh is not None:
        if num_devices is not None:
            raise ValueError("pass either mesh= or num_devices=, not both")
        return [C.MeshShape.from_mesh(mesh)]
    if num_devices is None:
        import jax

        num_devices = len(jax.devices())
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    return [C.MeshShape(axis_names=("data", "model"), axis_sizes=(num_devices // m, m))
            for m in range(1, num_devices + 1) if num_devices % m == 0]


def refuse_graph_objects(fn, args: Sequence, static_argnums: Sequence[int] = ()) -> None:
    """Refuse Flax NNX graph objects (Modules, Optimizers, Rngs) among the step's arguments.

    A step written the ``nnx.jit`` way mutates its module and optimizer in
    place; traced as a pure function over their arrays, those updates are
    lost and the step trains nothing.  The error names the argument and the
    pytree path, and shows the split/merge form that works.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:  # no NNX object can exist before flax.nnx is imported
        return
    import jax

    def is_graph_object(x) -> bool:
        return nnx.graph.is_graph_node(x) and not isinstance(x, nnx.Variable)

    names = T._argument_names(fn, len(args))
    for i, arg in enumerate(args):
        if i in static_argnums:
            continue
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(arg, is_leaf=is_graph_object)[0]:
            if not is_graph_object(leaf):
                continue
            path = T._path_string(names[i], keypath)
            raise T.TraceError(
                f"argument {path!r} is a flax.nnx {type(leaf).__name__}, a graph object the step would update "
                "in place. autoplan runs the step as a pure function over arrays (like jax.jit, not nnx.jit), "
                "so in-place updates would be lost and the step would train nothing. Pass the state and "
                "return the new state instead:\n"
                "    graphdef, params = nnx.split(model, nnx.Param)   # once, outside the step\n"
                "    opt_state = tx.init(params)                       # an optax state, not nnx.Optimizer\n"
                "    def step(params, opt_state, batch):\n"
                "        def loss_fn(params):\n"
                "            model = nnx.merge(graphdef, params)       # rebuild the module inside\n"
                "            return loss(model(batch))\n"
                "        loss, grads = jax.value_and_grad(loss_fn)(params)\n"
                "        updates, opt_state = tx.update(grads, opt_state, params)\n"
                "        return optax.apply_updates(params, updates), opt_state, loss\n"
                "and after training write the result back with nnx.update(model, params). A model with other "
                "state (e.g. BatchStat) splits as graphdef, params, rest = nnx.split(model, nnx.Param, ...): "
                "pass rest too and nnx.merge(graphdef, params, rest).")


def evaluate(problem: intra.Problem, op_strategy: np.ndarray, peak_memory: float, *,
             share_reshards: bool = False) -> tuple[C.Cost, tuple[P.CollectiveUse, ...]]:
    """The cost model's verdict on one strategy per operator (the ILP objective, itemized).

    With ``share_reshards`` a tensor resharded to the same layout for several
    consumers is paid once, as XLA's common-subexpression elimination runs it
    (the ILP, which prices each consumer edge on its own, over-counts those):
    the plan's reported cost uses it, the ILP objective is the default.
    """
    graph, ctx = problem.graph, problem.ctx
    strategies = [problem.strategies[i][s] for i, s in enumerate(op_strategy)]
    compute = comm = comm_bytes = 0.0
    resharded: set[tuple[int, S.Spec]] = set()
    uses: list[P.CollectiveUse] = []
    groups: dict[tuple, float] = {}  # combined gradient collectives: latency once per (kind, axes)
    for op in graph.ops:
        strategy = strategies[op.id]
        compute += strategy.compute_seconds
        where = f"{op.layer or '<top>'} {op.role}"
        combined = intra.combined_latency(strategy, ctx) if op.id in problem.combined_ops else {}
        for col in strategy.collectives:
            seconds = col.seconds
            if (col.kind, tuple(col.axes)) in combined:
                seconds -= combined[(col.kind, tuple(col.axes))]
            comm += seconds
            comm_bytes += col.wire_bytes
            uses.append(P.CollectiveUse(where=where, op=op.primitive, kind=col.kind, axes=col.axes,
                                        nbytes=col.nbytes, wire_bytes=col.wire_bytes, seconds=seconds))
        groups.update(combined)
        for _, tensor, producer, src, dst in _reshards(graph, op, strategies):
            if share_reshards and (tensor.id, dst) in resharded:
                continue
            resharded.add((tensor.id, dst))
            for col in S.reshard_collectives(src, dst, tensor.shape, tensor.dtype, ctx):
                seconds, wire = col.seconds * op.repeat, col.wire_bytes * op.repeat  # read inside op's loops
                comm += seconds
                comm_bytes += wire
                uses.append(P.CollectiveUse(where=where, op=f"reshard {producer.primitive} -> {op.primitive}",
                                            kind=col.kind, axes=col.axes, nbytes=col.nbytes,
                                            wire_bytes=wire, seconds=seconds))
    for (kind, axes), latency in sorted(groups.items()):
        comm += latency
        uses.append(P.CollectiveUse(where="<combined>", op=f"latency of the combined gradient {kind}", kind=kind,
                                    axes=axes, nbytes=0.0, wire_bytes=0.0, seconds=latency))
    cost = C.Cost(step_seconds=compute + comm, compute_seconds=compute, communication_seconds=comm,
                  communication_bytes=comm_bytes, memory_bytes=peak_memory)
    return cost, tuple(uses)


def _reshards(graph: G.Graph, op: G.Op, strategies: Sequence[S.Strategy]):
    """(operand index, tensor, producer, src spec, dst spec) of each operand ``op`` reads in a new layout."""
    for k, t in enumerate(op.inputs):
        if t == G.LITERAL:
            continue
        tensor = graph.tensors[t]
        producer = graph.ops[tensor.producer]
        src = strategies[producer.id].output_specs[tensor.output_index]
        dst = strategies[op.id].input_specs[k]
        if src is not None and dst is not None and src != dst:
            yield k, tensor, producer, src, dst


def plan_anchors(graph: G.Graph, strategies: Sequence[S.Strategy]) -> tuple[P.Anchor, ...]:
    """The intermediates a plan pins: dot/conv/gather results, and both ends of every reshard."""
    label = lambda op: f"{op.layer or '<top>'} {op.role} {op.primitive}"  # noqa: E731
    outputs: dict[tuple[int, int], P.Anchor] = {}
    operands: list[P.Anchor] = []
    for op in graph.ops:
        if op.role not in (G.FORWARD, G.BACKWARD, G.OPTIMIZER):
            continue
        if op.primitive in P.ANCHOR_PRIMITIVES:
            outputs[(op.id, 0)] = P.Anchor(op=op.id, key=op.key, output=0, label=label(op),
                                           shape=op.output_shapes[0], spec=strategies[op.id].output_specs[0])
        for k, tensor, producer, src, dst in _reshards(graph, op, strategies):
            if not tensor.shape:
                continue
            operands.append(P.Anchor(op=op.id, key=op.key, output=0, operand=k, label=label(op), shape=tensor.shape,
                                     spec=dst))
            if producer.role in (G.FORWARD, G.BACKWARD, G.OPTIMIZER):
                outputs[(producer.id, tensor.output_index)] = P.Anchor(
                    op=producer.id, key=producer.key, output=tensor.output_index, label=label(producer),
                    shape=tensor.shape, spec=src)
    return tuple(sorted(outputs.values(), key=lambda a: (a.op, a.output))) + tuple(operands)


def build_plan(name: str, graph: G.Graph, problem: intra.Problem, solution: intra.Solution,
               memory_budget: float | None, extra_solver: Mapping | None = None) -> P.Plan:
    ctx = problem.ctx
    strategies = [problem.strategies[i][s] for i, s in enumerate(solution.op_strategy)]
    cost, uses = evaluate(problem, solution.op_strategy, solution.peak_memory, share_reshards=True)
    inputs = tuple(P.LeafSharding(path=graph.input_paths[i], shape=graph.ops[op].output_shapes[0],
                                  dtype=graph.ops[op].output_dtypes[0], spec=strategies[op].output_specs[0])
                   for i, op in enumerate(graph.input_ops))
    outputs = tuple(P.LeafSharding(path=graph.output_paths[i], shape=graph.ops[op].input_shapes[0],
                                   dtype=graph.tensors[graph.ops[op].inputs[0]].dtype,
                                   spec=strategies[op].input_specs[0])
                    for i, op in enumerate(graph.output_ops))
    anchors = plan_anchors(graph, strategies)
    solver = {"status": solution.status, "solve_seconds": solution.solve_seconds, "num_vars": solution.num_vars,
              "num_edges": solution.num_edges, "objective_seconds": solution.objective_seconds,
              "build_seconds": problem.build_seconds, **(extra_solver or {})}
    return P.Plan(name=name, mesh=ctx.mesh, cluster=ctx.cluster, inputs=inputs, outputs=outputs,
                  aliases=dict(graph.aliases), anchors=anchors, op_strategies=tuple(s.name for s in strategies),
                  collectives=uses, cost=cost, memory_budget=memory_budget, solver=solver,
                  fingerprint=P.graph_fingerprint(graph), input_tree=graph.input_tree,
                  output_tree=graph.output_tree)


def plan_graph(graph: G.Graph, mesh: C.MeshShape, cluster: C.Cluster, *, memory_budget: float | None,
               time_limit: float = 60.0, name: str = "autoplan",
               pinned: Mapping[int, Sequence[S.Spec]] | None = None, merge_followers: bool = True,
               tie_layers: bool = True, trace_seconds: float = 0.0) -> P.Plan:
    """Solve one graph on one mesh (the shared back end of `plan` and the baselines)."""
    start = time.perf_counter()
    ctx = S.Context(mesh=mesh, cluster=cluster)
    options = intra.SolveOptions(memory_budget=memory_budget, time_limit=time_limit, pinned=dict(pinned or {}),
                                 merge_followers=merge_followers, tie_layers=tie_layers)
    problem = intra.build_problem(graph, ctx, options)
    solution = intra.solve(problem, options)
    total = trace_seconds + time.perf_counter() - start
    return build_plan(name, graph, problem, solution, memory_budget,
                      {"total_seconds": total, "trace_seconds": trace_seconds})


class _Auto:
    """The planner chooses this leaf's layout (the default for every leaf)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "autoplan.AUTO"


AUTO = _Auto()


def _is_sharding_leaf(x) -> bool:
    import jax

    return x is None or isinstance(x, (_Auto, jax.sharding.PartitionSpec, jax.sharding.NamedSharding))


def pinned_inputs(graph: G.Graph, in_shardings, mesh: C.MeshShape) -> dict[int, list[S.Spec]]:
    """Input op id -> [spec] for every leaf that ``in_shardings`` (a prefix of the dynamic arguments) fixes."""
    import jax

    if in_shardings is None:
        return {}
    args_tree = jax.tree_util.tree_unflatten(graph.input_tree, list(range(graph.input_tree.num_leaves)))
    if not isinstance(in_shardings, (tuple, list)) or _is_sharding_leaf(in_shardings):
        in_shardings = (in_shardings,) * len(args_tree)
    if len(in_shardings) != len(args_tree):
        raise ValueError(f"in_shardings has {len(in_shardings)} entries but the step has {len(args_tree)} "
                         "non-static arguments; give one (prefix) entry per argument")
    pinned = {}
    for prefix, subtree in zip(in_shardings, args_tree):
        prefix_leaves, prefix_tree = jax.tree_util.tree_flatten(prefix, is_leaf=_is_sharding_leaf)
        try:
            groups = prefix_tree.flatten_up_to(subtree)
        except (ValueError, TypeError) as err:
            raise ValueError(f"in_shardings is not a pytree prefix of the step's arguments: {err}") from None
        for sharding, group in zip(prefix_leaves, groups):
            if sharding is None or isinstance(sharding, _Auto):
                continue
            for leaf in jax.tree_util.tree_leaves(group):
                op = graph.ops[graph.input_ops[leaf]]
                spec = S.from_partition_spec(sharding, op.output_shapes[0], mesh,
                                             f"in_shardings for {graph.input_paths[leaf]!r}")
                if spec is not None:
                    pinned[op.id] = [spec]
    return pinned


def plan(fn, *args, mesh=None, num_devices: int | None = None, cluster: C.Cluster | str | None = None,
         memory_budget: float | None = None, time_limit: float = 60.0, static_argnums: Sequence[int] = (),
         in_shardings=None, stages: int | None = None, microbatches: int | None = None,
         schedule: str | None = None, trip_count: int | None = None) -> P.Plan:
    """Plan ``fn(*args)`` on a mesh: how to split every input, output and key intermediate.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; ``mesh`` a
    `jax.sharding.Mesh` or `AbstractMesh` (or pass ``num_devices`` and
    autoplan picks the (data, model) shape).  ``memory_budget`` defaults to
    the cluster's device memory; ``cluster`` to the preset of the devices
    this process runs on (`cluster.default_cluster`; "cpu" on a CPU), which
    the plan records in ``cluster_origin`` and its summary shows.
    ``in_shardings``, a pytree prefix of the non-static arguments like
    ``jax.jit``'s, fixes the layout of the leaves it names (`PartitionSpec`
    or `NamedSharding`; ``autoplan.AUTO`` or None leaves them to the planner).
    Any of ``stages``, ``microbatches`` (the batch is the last argument) or
    ``schedule`` ("gpipe", "1f1b", "interleaved") plans a pipeline with the
    stage DP of `autoplan._src.inter`, pinning what is given.  ``trip_count``
    prices every while loop whose trip count JAX cannot see (`trace.trip_count_hint`).

    >>> import jax, jax.numpy as jnp, autoplan
    >>> w = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    >>> x = jax.ShapeDtypeStruct((4096, 1024), jnp.float32)
    >>> p = autoplan.plan(lambda w, x: (x @ w).sum(), w, x, num_devices=8, cluster="a100-8x")
    >>> p.mesh.size
    8
    """
    with T.trip_count_hint(trip_count):
        refuse_graph_objects(fn, args, static_argnums)
        cluster, cluster_origin = C.resolve_cluster(cluster)
        meshes = resolve_mesh(mesh, num_devices)
        budget = cluster.device_memory if memory_budget is None else float(memory_budget)
        if budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {memory_budget!r}")
        if stages is not None or microbatches is not None or schedule is not None:
            from autoplan._src import inter

            if mesh is not None and num_devices is not None:
                raise ValueError("pass either mesh= or num_devices=, not both")
            return inter.plan_pipeline(fn, *args, mesh=mesh, num_devices=num_devices, cluster=cluster,
                                       memory_budget=budget, stages=stages, microbatches=microbatches,
                                       schedule=schedule, time_limit=time_limit, static_argnums=static_argnums)
        start = time.perf_counter()
        graph = T.trace(fn, *args, static_argnums=static_argnums)
        trace_seconds = time.perf_counter() - start
        best, errors = None, []
        for candidate in meshes:
            try:
                result = plan_graph(graph, candidate, cluster, memory_budget=budget, time_limit=time_limit,
                                    trace_seconds=trace_seconds,
                                    pinned=pinned_inputs(graph, in_shardings, candidate))
            except intra.PlanningError as err:
                errors.append(err)
                continue
            if best is None or result.cost.step_seconds < best.cost.step_seconds:
                best = result
        if best is None:
            raise errors[0] if len(errors) == 1 else intra.PlanningError(
                "no mesh shape admits a plan: " + "; ".join(str(e) for e in errors))
        best = no_worse_than_baselines(best, fn, args, static_argnums, budget, in_shardings)
        return dataclasses.replace(best, cluster_origin=cluster_origin)


def no_worse_than_baselines(best: P.Plan, fn, args, static_argnums, budget: float, in_shardings=None) -> P.Plan:
    """If the ILP stopped at its time limit, never return a plan predicted slower than a manual one.

    Data parallel, FSDP and Megatron x DP are points of the same search space, pinned; a time-limited
    solve can stop above them (a Hugging Face Llama at benchmark size: 60.7 ms vs data parallel's
    40.4 ms).  The cheapest that fits replaces the ILP's answer, and the plan's solver record says so.
    Not where the user pinned ``in_shardings``: the baselines would override the pins.
    """
    import warnings

    from autoplan._src import baselines

    if in_shardings is not None or best.solver.get("status") == "optimal":
        return best
    names = ["data_parallel", "fsdp"] + (["megatron_dp"] if len(best.mesh.axis_names) > 1 else [])
    for name in names:
        try:
            rival = getattr(baselines, name)(fn, *args, mesh=best.mesh, cluster=best.cluster,
                                             static_argnums=static_argnums)
        except Exception:  # noqa: BLE001 - a rival that does not apply to this step is skipped
            continue
        if rival.cost.step_seconds < best.cost.step_seconds and rival.cost.memory_bytes <= budget:
            warnings.warn(f"the ILP stopped at its time limit with a plan predicted at {best.cost.step_seconds:.3g} s; "
                          f"{name} is predicted at {rival.cost.step_seconds:.3g} s and is used instead "
                          "(raise time_limit= to search longer)", intra.PlanningTimeoutWarning, stacklevel=3)
            best = dataclasses.replace(rival, name=best.name,
                                       solver={**rival.solver, "status": best.solver.get("status", "feasible"),
                                               "replaced_time_limited_ilp": best.solver, "taken_from": name})
    return best
