"""The manual strategies people use, as Plans costed by the same model.

Each baseline fixes the layouts of the step's inputs (and, for ZeRO-1/2, of
the gradients) the way its paper prescribes; the planner then runs the same
ILP for everything else, so a baseline is the best execution of that layout
under the cost model.  Since each baseline is a point of the planner's own
search space, ``autoplan.plan`` can never predict a slower step than any of
them.

The step is assumed to be ``step(params, opt_state, batch, ...)``: leaves of
the first argument are parameters, leaves of the second are optimizer state
(matched to parameters by path suffix), the rest is data.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from autoplan._src import api
from autoplan._src import cluster as C
from autoplan._src import graph as G
from autoplan._src import plan as P
from autoplan._src import trace as T
from autoplan._src.strategies import base as S


class _Setup:
    def __init__(self, fn, args, mesh, cluster, static_argnums, data_axes, model_axis, baseline):
        self.cluster, self.cluster_origin = C.resolve_cluster(cluster)
        meshes = api.resolve_mesh(mesh, None if mesh is not None else len(__import__("jax").devices()))
        self.mesh = meshes[0] if mesh is not None else C.MeshShape(axis_names=("data",),
                                                                   axis_sizes=(meshes[0].size,))
        names = self.mesh.axis_names
        self.model_axis = model_axis if model_axis is not None else (names[-1] if len(names) > 1 else names[0])
        self.data_axes = tuple(names) if data_axes is None else _axes_tuple(data_axes)
        _check_axes(baseline, "model_axis", model_axis, (self.model_axis,), self.mesh)
        _check_axes(baseline, "data_axes", data_axes, self.data_axes, self.mesh)
        api.refuse_graph_objects(fn, args, static_argnums)
        start = time.perf_counter()
        self.graph = T.trace(fn, *args, static_argnums=static_argnums)
        self.trace_seconds = time.perf_counter() - start
        arg_names = [p.split("/")[0] for p in self.graph.input_paths]
        first = arg_names[0]
        second = next((a for a in arg_names if a != first), None)
        self.params = [i for i, a in enumerate(arg_names) if a == first]
        self.opt = [i for i, a in enumerate(arg_names) if a == second and i not in self.params]
        self.data = [i for i in range(len(arg_names)) if i not in self.params and i not in self.opt]

    def shape(self, leaf: int) -> tuple[int, ...]:
        return self.graph.ops[self.graph.input_ops[leaf]].output_shapes[0]

    def param_of(self, opt_leaf: int) -> int | None:
        """The parameter leaf an optimizer-state leaf belongs to (longest common path suffix)."""
        path = self.graph.input_paths[opt_leaf].split("/")
        best, best_len = None, 0
        for p in self.params:
            ppath = self.graph.input_paths[p].split("/")[1:]
            if len(ppath) <= len(path) and path[-len(ppath):] == ppath and self.shape(p) == self.shape(opt_leaf):
                if len(ppath) > best_len:
                    best, best_len = p, len(ppath)
        return best

    def split_largest(self, shape: Sequence[int], axes: Sequence[str]) -> S.Spec:
        """Split the largest dim that the axes divide (ZeRO's flat partition, per tensor)."""
        axes = tuple(a for a in axes if self.mesh.axis_size(a) > 1)  # size-1 axes split nothing
        n = self.mesh.axis_size(axes)
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % n == 0 and n > 1:
                return tuple(axes if i == d else () for i in range(len(shape)))
        return S.replicated(len(shape))

    def split_batch(self, shape: Sequence[int], axes: Sequence[str]) -> S.Spec:
        axes = tuple(a for a in axes if self.mesh.axis_size(a) > 1)
        while axes and shape and shape[0] % self.mesh.axis_size(axes):
            axes = axes[:-1]
        if not shape or not axes:
            return S.replicated(len(shape))
        return (axes,) + ((),) * (len(shape) - 1)

    def solve(self, name: str, input_specs: dict[int, S.Spec], grad_specs=None) -> P.Plan:
        pinned = {self.graph.input_ops[i]: [spec] for i, spec in input_specs.items()}
        if grad_specs is not None:
            pinned.update(grad_specs)
        plan = api.plan_graph(self.graph, self.mesh, self.cluster, memory_budget=None, name=name,
                              pinned=pinned, trace_seconds=self.trace_seconds)
        return dataclasses.replace(plan, cluster_origin=self.cluster_origin)

    def gradient_ops(self) -> dict[int, int]:
        """Backward ops whose result feeds the optimizer, mapped to the parameter leaf of the same shape."""
        shapes: dict[tuple, list[int]] = {}
        for p in self.params:
            shapes.setdefault(self.shape(p), []).append(p)
        out = {}
        for op in self.graph.ops:
            if op.role != G.BACKWARD or not op.outputs:
                continue
            t = op.outputs[0]
            if any(self.graph.ops[c].role == G.OPTIMIZER for c, _ in self.graph.consumers[t]):
                candidates = shapes.get(self.graph.tensors[t].shape)
                if candidates:
                    out[op.id] = candidates[0]
        return out


def _setup(fn, args, mesh, cluster, static_argnums, data_axes=None, model_axis=None, *, baseline: str) -> _Setup:
    return _Setup(fn, args, mesh, cluster, static_argnums, data_axes, model_axis, baseline)


def _axes_tuple(axes) -> tuple:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_axes(baseline: str, option: str, value, axes: Sequence[str], mesh: C.MeshShape) -> None:
    """Refuse mesh axes the mesh lacks, naming the axis, the option, the mesh's axes and the fix."""
    for axis in axes:
        if axis not in mesh.axis_names:
            raise ValueError(
                f"autoplan.baselines.{baseline}: mesh axis {axis!r} ({option}={value!r}) is not in the mesh, "
                f"whose axes are {mesh.as_dict()}. Pass {option}= axes of this mesh, or plan on a mesh with a "
                f"{axis!r} axis, e.g. mesh=jax.sharding.AbstractMesh((2, 4), ('data', {axis!r})).")


def data_parallel(fn, *args, mesh=None, cluster=None, static_argnums=(), data_axes=None) -> P.Plan:
    """Replicate parameters and optimizer state; split the batch over every mesh axis.

    >>> import autoplan, jax
    >>> spec = autoplan.models.get("mlp-tiny")
    >>> p = autoplan.baselines.data_parallel(spec.train_step, *spec.abstract_state(), spec.abstract_batch(),
    ...                                      mesh=jax.sharding.AbstractMesh((8,), ("data",)))
    >>> p.name
    'data_parallel'
    """
    s = _setup(fn, args, mesh, cluster, static_argnums, data_axes, baseline="data_parallel")
    specs = {i: S.replicated(len(s.shape(i))) for i in s.params + s.opt}
    specs |= {i: s.split_batch(s.shape(i), s.data_axes) for i in s.data}
    return s.solve("data_parallel", specs)


def _zero(s: _Setup, name: str, *, shard_grads: bool, shard_params: bool) -> P.Plan:
    specs = {}
    for i in s.params:
        shape = s.shape(i)
        specs[i] = s.split_largest(shape, s.data_axes) if shard_params else S.replicated(len(shape))
    for i in s.opt:
        p = s.param_of(i)
        shape = s.shape(i)
        specs[i] = s.split_largest(shape, s.data_axes) if p is not None and math.prod(shape) > 1 \
            else S.replicated(len(shape))
    specs |= {i: s.split_batch(s.shape(i), s.data_axes) for i in s.data}
    grads = {}
    if not shard_params:
        for op_id, p in s.gradient_ops().items():
            shape = s.shape(p)
            grads[op_id] = [s.split_largest(shape, s.data_axes) if shard_grads else S.replicated(len(shape))]
    return s.solve(name, specs, grads)


def zero1(fn, *args, mesh=None, cluster=None, static_argnums=(), data_axes=None) -> P.Plan:
    """ZeRO-1: optimizer state split over the data axes; gradients all-reduced; parameters replicated."""
    return _zero(_setup(fn, args, mesh, cluster, static_argnums, data_axes, baseline="zero1"), "zero1",
                 shard_grads=False, shard_params=False)


def zero2(fn, *args, mesh=None, cluster=None, static_argnums=(), data_axes=None) -> P.Plan:
    """ZeRO-2: optimizer state and gradients split (reduce-scatter); parameters replicated."""
    return _zero(_setup(fn, args, mesh, cluster, static_argnums, data_axes, baseline="zero2"), "zero2",
                 shard_grads=True, shard_params=False)


def fsdp(fn, *args, mesh=None, cluster=None, static_argnums=(), data_axes=None) -> P.Plan:
    """ZeRO-3 / FSDP: parameters, gradients and optimizer state all split over the data axes."""
    return _zero(_setup(fn, args, mesh, cluster, static_argnums, data_axes, baseline="fsdp"), "fsdp",
                 shard_grads=True, shard_params=True)


def _megatron_specs(s: _Setup, axis: str) -> dict[int, S.Spec]:
    """Megatron's rules: in each layer, matrices alternate column split (last dim) and row
    split (the dim before); a column layer's bias is split too; embedding tables are split
    by vocabulary; everything else is replicated."""
    graph = s.graph
    n = s.mesh.axis_size(axis)
    if n <= 1:  # a size-1 model axis splits nothing
        return {i: S.replicated(len(s.shape(i))) for i in s.params + s.opt}
    first_use = {}
    gathered = set()
    for i in s.params:
        t = graph.ops[graph.input_ops[i]].outputs[0]
        consumers = graph.consumers[t]
        first_use[i] = min((c for c, _ in consumers), default=len(graph.ops))
        if any(graph.ops[c].primitive == "gather" for c, _ in consumers):
            gathered.add(i)
    specs: dict[int, S.Spec] = {}
    column_modules = set()
    parity: dict[str, int] = {}
    for i in sorted(s.params, key=lambda i: first_use[i]):
        shape = s.shape(i)
        path = graph.input_paths[i]
        layer = graph.ops[graph.input_ops[i]].layer
        spec = S.replicated(len(shape))
        if i in gathered and shape[0] % n == 0:
            spec = ((axis,),) + ((),) * (len(shape) - 1)
        elif len(shape) >= 2:
            k = parity.get(layer, 0)
            parity[layer] = k + 1
            dim = len(shape) - 1 if k % 2 == 0 else len(shape) - 2
            if shape[dim] % n == 0:
                spec = tuple((axis,) if d == dim else () for d in range(len(shape)))
                if k % 2 == 0:
                    column_modules.add(path.rsplit("/", 1)[0])
        specs[i] = spec
    for i in s.params:
        shape = s.shape(i)
        if len(shape) == 1 and graph.input_paths[i].rsplit("/", 1)[0] in column_modules and shape[0] % n == 0:
            specs[i] = ((axis,),)
    for i in s.opt:
        p = s.param_of(i)
        specs[i] = specs[p] if p is not None else S.replicated(len(s.shape(i)))
    return specs


def megatron(fn, *args, mesh=None, cluster=None, static_argnums=(), model_axis=None) -> P.Plan:
    """Megatron-LM tensor parallelism over ``model_axis`` (the last mesh axis); batch replicated."""
    s = _setup(fn, args, mesh, cluster, static_argnums, model_axis=model_axis, baseline="megatron")
    specs = _megatron_specs(s, s.model_axis)
    specs |= {i: S.replicated(len(s.shape(i))) for i in s.data}
    return s.solve("megatron", specs)


def megatron_dp(fn, *args, mesh=None, cluster=None, static_argnums=(), model_axis=None,
                data_axes=None) -> P.Plan:
    """Megatron tensor parallelism over ``model_axis`` and data parallelism over the other axes."""
    s = _setup(fn, args, mesh, cluster, static_argnums, data_axes, model_axis=model_axis, baseline="megatron_dp")
    data_axes = s.data_axes if data_axes is not None else tuple(a for a in s.mesh.axis_names if a != s.model_axis)
    specs = _megatron_specs(s, s.model_axis)
    specs |= {i: s.split_batch(s.shape(i), data_axes) for i in s.data}
    return s.solve("megatron_dp", specs)


ALL = ("data_parallel", "zero1", "zero2", "fsdp", "megatron", "megatron_dp")
