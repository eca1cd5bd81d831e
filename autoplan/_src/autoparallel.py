"""`autoplan.autoparallel`: ``jax.jit`` that plans its own shardings.

On the first call for each abstract signature (pytree structure, shapes,
dtypes, static arguments) the step is traced, planned and emitted; later calls
with the same signature reuse the compiled program.  Inputs are moved to the
planned layouts before the call, so arrays may arrive from anywhere on the
mesh's devices (host numpy, one device, another layout).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from autoplan._src import api
from autoplan._src import cluster as C
from autoplan._src import emit as E
from autoplan._src import plan as P
from autoplan._src import trace as T

# A planner maps (fn, *args, mesh=, cluster=, static_argnums=) to a Plan: `autoplan.plan`
# or any of `autoplan.baselines`.
Planner = Callable[..., P.Plan]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Signature:
    tree: Any
    leaves: tuple[tuple[tuple[int, ...], str], ...]
    static: tuple


class AutoParallel:
    """A step function planned and compiled per input signature; see `autoparallel`."""

    def __init__(self, fun: Callable, *, mesh=None, cluster: C.Cluster | str | None = None,
                 memory_budget: float | None = None, static_argnums: Sequence[int] | int = (),
                 donate: bool = True, time_limit: float = 60.0, planner: Planner | None = None,
                 plan: P.Plan | None = None, stages: int | None = None, microbatches: int | None = None,
                 schedule: str | None = None, in_shardings=None, trip_count: int | None = None):
        functools.update_wrapper(self, fun)
        T.check_trip_count(trip_count)
        self._trip_count = trip_count
        self._in_shardings = in_shardings
        self._pipeline = {k: v for k, v in dict(stages=stages, microbatches=microbatches, schedule=schedule).items()
                          if v is not None}
        self._fun = fun
        self._mesh = mesh
        # None: the local devices' preset, looked up at the first call (not here, so that decorating
        # does not start a JAX backend before jax.distributed.initialize or device-count flags).
        self._cluster = None if cluster is None else C.get_cluster(cluster)
        self._memory_budget = memory_budget
        self._static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self._donate = donate
        self._time_limit = time_limit
        self._planner = planner
        self._fixed_plan = plan
        self._programs: dict[_Signature, E.Program] = {}
        self._tree = None
        self._last: E.Program | None = None
        self.num_plans = 0  # how many times this step has been planned (one per new signature)

    # -- the jax.jit-like surface ---------------------------------------------------
    def __call__(self, *args):
        program, dynamic = self._program(args)
        placed = _place(dynamic, program, self._argument_paths(len(args)))
        return program(*placed)

    def lower(self, *args):
        """Lower for these arguments (arrays or ShapeDtypeStructs): ``.compile()`` gives XLA's Compiled."""
        program, dynamic = self._program(args)
        return program.lower(*dynamic)

    def trace(self, *args):
        """``jax.jit(...).trace`` of the emitted program for these arguments."""
        program, dynamic = self._program(args)
        return program.trace(*dynamic)

    @property
    def plan(self) -> P.Plan:
        """The plan of the most recent call's signature."""
        if self._last is None:
            raise AttributeError(f"{self.__name__} has not been called or lowered yet, so it has no plan; "
                                 "call it (or .lower(...)) with example arguments first")
        return self._last.plan

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The device mesh of the most recent call's program."""
        if self._last is None:
            raise AttributeError(f"{self.__name__} has not been called yet")
        return self._last.mesh

    def clear_cache(self) -> None:
        """Forget every plan, e.g. before calling with a differently structured state on purpose."""
        self._programs.clear()
        self._tree = None
        self._last = None

    # -- planning and caching -------------------------------------------------------
    def _argument_paths(self, num_args: int) -> list[str]:
        names = T._argument_names(self._fun, num_args)
        return [names[i] for i in range(num_args) if i not in self._static_argnums]

    def _program(self, args) -> tuple[E.Program, tuple]:
        dynamic = tuple(a for i, a in enumerate(args) if i not in self._static_argnums)
        static = tuple(args[i] for i in self._static_argnums if i < len(args))
        leaves, tree = jax.tree_util.tree_flatten(dynamic)
        if self._tree is not None and tree != self._tree:
            raise T.TraceError(_structure_change(self._tree, tree, self._argument_paths(len(args))))
        signature = _Signature(tree=tree, leaves=tuple(_leaf_signature(x) for x in leaves), static=static)
        program = self._programs.get(signature)
        if program is None:
            with T.trip_count_hint(self._trip_count):
                program = self._build(args)
            self._programs[signature] = program
            self._tree = tree
        self._last = program
        return program, dynamic

    def _build(self, args) -> E.Program:
        api.refuse_graph_objects(self._fun, args, self._static_argnums)
        graph = T.trace(self._fun, *args, static_argnums=self._static_argnums)
        if self._pipeline and self._fixed_plan is None and self._planner is None:
            return self._build_pipelined(args, graph)
        cluster, cluster_origin = C.resolve_cluster(self._cluster)
        if self._fixed_plan is not None:
            plan = self._fixed_plan
            mesh = E.device_mesh(plan.mesh) if self._mesh is None else self._device_mesh()
        elif self._planner is None:
            mesh = self._device_mesh()
            budget = cluster.device_memory if self._memory_budget is None else float(self._memory_budget)
            shape = C.MeshShape.from_mesh(mesh)
            plan = api.plan_graph(graph, shape, cluster, memory_budget=budget, time_limit=self._time_limit,
                                  pinned=api.pinned_inputs(graph, self._in_shardings, shape))
            plan = api.no_worse_than_baselines(plan, self._fun, args, self._static_argnums, budget,
                                               self._in_shardings)
        else:
            mesh = self._device_mesh()
            plan = self._planner(self._fun, *args, mesh=mesh, cluster=cluster,
                                 static_argnums=self._static_argnums)
        if self._fixed_plan is None:
            plan = dataclasses.replace(plan, cluster_origin=cluster_origin)
        self.num_plans += 1
        if len(plan.stages) > 1 or plan.microbatches > 1:  # a given pipelined or microbatched plan
            from autoplan._src import pipeline

            return pipeline.emit_accumulated(plan, self._fun, graph, mesh, donate=self._donate)
        return E.emit(plan, graph, mesh, donate=self._donate)

    def _build_pipelined(self, args, graph) -> E.Program:
        """stages= / microbatches= / schedule=: the inter-operator pass plans, `pipeline` runs it."""
        from autoplan._src import pipeline

        cluster, _ = C.resolve_cluster(self._cluster)
        budget = cluster.device_memory if self._memory_budget is None else float(self._memory_budget)
        where = dict(mesh=self._mesh) if self._mesh is not None else dict(num_devices=len(jax.devices()))
        plan = api.plan(self._fun, *args, cluster=cluster, memory_budget=budget, time_limit=self._time_limit,
                        static_argnums=self._static_argnums, **where, **self._pipeline)
        self.num_plans += 1
        return pipeline.emit_accumulated(plan, self._fun, graph, E.device_mesh(plan.mesh), donate=self._donate)

    def _device_mesh(self) -> jax.sharding.Mesh:
        if self._mesh is None:
            devices = jax.devices()
            return E.device_mesh(C.MeshShape(axis_names=("data",), axis_sizes=(len(devices),)), devices)
        if isinstance(self._mesh, jax.sharding.Mesh):
            return E.as_auto_mesh(self._mesh)
        return E.device_mesh(C.MeshShape.from_mesh(self._mesh))


def autoparallel(fun: Callable | None = None, *, mesh=None, cluster: C.Cluster | str | None = None,
                 memory_budget: float | None = None, static_argnums: Sequence[int] | int = (),
                 donate: bool = True, time_limit: float = 60.0, planner: Planner | None = None,
                 plan: P.Plan | None = None, stages: int | None = None, microbatches: int | None = None,
                 schedule: str | None = None, in_shardings=None, trip_count: int | None = None):
    """Plan, compile and run a training step over a device mesh, like ``jax.jit`` with shardings.

    Use it bare (``@autoparallel``: every local device on one "data" axis) or
    with arguments.  ``mesh`` is a `jax.sharding.Mesh` (any axis types), an
    `AbstractMesh` or a ``{name: size}`` mapping over all local devices;
    ``cluster`` the hardware the cost model assumes (default: the preset of
    the devices it runs on, from their device kind, e.g. "a100-8x" on A100s
    and "cpu" on a CPU; the plan's summary says so);
    ``memory_budget`` bytes per device.  ``donate`` reuses the buffers of
    every argument the step returns updated (parameters, optimizer state),
    as ``jax.jit(donate_argnums=...)`` would: do not use those arrays after
    the call.  ``planner`` swaps the ILP for another planner, e.g.
    ``autoplan.baselines.fsdp``; ``plan`` runs a fixed Plan (e.g. one loaded
    from JSON), refused if it was made for another step.  ``in_shardings``
    (a prefix of the arguments, as for `autoplan.plan`) pins those leaves'
    layouts; ``trip_count`` prices while loops whose trip count JAX cannot see
    (as for `autoplan.plan`).  ``stages``, ``microbatches`` and ``schedule`` pin the
    inter-operator pass (see
    `autoplan.plan`); a plan with one stage runs as gradient accumulation over
    the microbatches, one with several as a pipeline of the step as written
    (`autoplan._src.staging`: each stage row keeps and updates its own
    parameters and optimizer state, which the step returns on that row's
    devices; ``.lower(...).compile().programs`` holds its compiled programs).

    Arguments are pytrees of arrays: a Flax NNX Module or Optimizer, which
    an ``nnx.jit`` step mutates in place, is refused with the ``nnx.split``
    / ``nnx.merge`` form to use instead.

    The decorated function has ``.plan`` (the last call's Plan), ``.lower``
    (``.lower(*args).compile()`` gives XLA's ``Compiled``), ``.trace`` and
    ``.num_plans``.

    >>> import jax, jax.numpy as jnp, autoplan
    >>> @autoplan.autoparallel(mesh={"data": len(jax.devices())})
    ... def step(w, x):
    ...     loss, grad = jax.value_and_grad(lambda w: ((x @ w) ** 2).mean())(w)
    ...     return w - 0.1 * grad, loss
    >>> w, loss = step(jnp.ones((16, 4)), jnp.ones((64, 16)))
    >>> float(loss), step.num_plans
    (256.0, 1)
    """
    options = dict(mesh=mesh, cluster=cluster, memory_budget=memory_budget, static_argnums=static_argnums,
                   donate=donate, time_limit=time_limit, planner=planner, plan=plan, stages=stages,
                   microbatches=microbatches, schedule=schedule, in_shardings=in_shardings,
                   trip_count=trip_count)
    if fun is None:
        return functools.partial(AutoParallel, **options)
    return AutoParallel(fun, **options)


def _leaf_signature(leaf) -> tuple[tuple[int, ...], str]:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return ((), type(leaf).__name__)  # rejected with its path by `trace`
    return tuple(shape), str(dtype)


def _structure_change(old, new, names: Sequence[str]) -> str:
    def paths(tree):
        dummy = jax.tree_util.tree_unflatten(tree, range(tree.num_leaves))
        return [T._path_string(names[kp[0].idx] if kp[0].idx < len(names) else f"arg{kp[0].idx}", kp[1:])
                for kp, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]

    before, after = paths(old), paths(new)
    added = [p for p in after if p not in set(before)]
    removed = [p for p in before if p not in set(after)]
    detail = (f"new leaf {added[0]!r}" if added else f"missing leaf {removed[0]!r}" if removed
              else "the same leaves in a different container structure")
    return (f"the pytree structure of the step's arguments changed since it was planned ({detail}; "
            f"{len(before)} leaves before, {len(after)} now). autoplan plans once per structure; if the change "
            "is intended, call .clear_cache() on the step (or decorate it anew)")


def _place(dynamic: tuple, program: E.Program, arg_names: Sequence[str]) -> tuple:
    """Move every leaf onto its planned sharding; refuse arrays that live on other devices."""
    mesh_devices = set(program.mesh.devices.flat)
    leaves_with_paths, tree = jax.tree_util.tree_flatten_with_path(dynamic)
    targets = jax.tree_util.tree_leaves(program.in_shardings)
    placed = []
    for (keypath, leaf), target in zip(leaves_with_paths, targets):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf, jax.Array) and sharding is not None:
            if not set(sharding.device_set) <= mesh_devices:
                path = T._path_string(arg_names[keypath[0].idx], keypath[1:])
                raise ValueError(
                    f"input {path!r} lives on devices {sorted(d.id for d in sharding.device_set)} outside the "
                    f"plan's mesh {dict(program.mesh.shape)} (devices {sorted(d.id for d in mesh_devices)}); "
                    "move it first with jax.device_put(x, NamedSharding(mesh, spec)) or plan on its mesh")
            if sharding == target or (sharding.is_equivalent_to(target, leaf.ndim)
                                      and getattr(sharding, "mesh", None) == target.mesh):
                placed.append(leaf)
                continue
        placed.append(jax.device_put(leaf, target))
    return jax.tree_util.tree_unflatten(tree, placed)
