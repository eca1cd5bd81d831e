"""A small, complete training loop on top of `autoparallel`: data, checkpoints, resume, many processes.

`train` trains a zoo model (or any `ModelSpec`) with a planned step::

    result = train("gpt-tiny", 50, mesh=(2, 4), ckpt_dir="/tmp/run", save_every=10)
    result.losses[50]        # loss of step 50 (steps are numbered from 1)

and is what ``python -m autoplan train`` and the ``demo`` run.  What it adds
around the planned step:

- Deterministic, learnable data.  `SyntheticData` draws a fixed pool of a few
  batches with ``spec.make_batch`` from fixed keys and cycles through it, so
  the batch of step ``i`` is a pure function of ``(seed, i)`` and the loss
  falls visibly within a few dozen steps (the model memorizes the pool).  A
  resumed run sees exactly the batches the uninterrupted run would have seen.
- Multi-process input.  With several processes each one builds only its
  process-local slice of the global batch (the rows that its devices hold under
  the plan's batch sharding) and the global array is assembled with
  ``jax.make_array_from_process_local_data``.  Parameters and optimizer state
  are initialized under ``jax.jit`` straight into the planned shardings, so no
  host array ever has to be broadcast.
- Checkpoints.  ``(params, opt_state)`` is saved with `autoplan.checkpoint`
  every ``save_every`` steps and at the end (asynchronously; the last save is
  waited for), and the loss history is written beside the checkpoints as
  ``train_log.json`` (atomically, by process 0), so a resumed run reports the
  whole history.  ``resume=True`` restores the latest committed checkpoint
  directly onto the *current* plan and mesh, which may differ from the ones
  that saved it (elastic restart on fewer devices, another planner), and
  continues at the next step.
- Output only on process 0: log lines and the tqdm progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from autoplan._src import checkpoint as ckpt_lib
from autoplan._src import cluster as C
from autoplan._src import emit as E
from autoplan._src import plan as P
from autoplan._src.autoparallel import autoparallel

__all__ = ["SyntheticData", "TrainResult", "TrainingError", "train", "make_mesh", "TRAIN_LOG"]

# The loss history beside the checkpoints (orbax ignores files that are not step directories).
TRAIN_LOG = "train_log.json"
_LOG_FORMAT = "autoplan.train_log"


class TrainingError(ValueError):
    """A training run cannot start as asked (e.g. a checkpoint directory in use without ``resume``)."""


# ---------------------------------------------------------------------------
# Data


class SyntheticData:
    """Deterministic, learnable batches for a `ModelSpec`: a fixed pool cycled by step.

    The pool holds ``pool`` batches drawn with ``spec.make_batch`` from keys
    derived from ``seed`` only; step ``i`` (counted from 1) uses pool entry
    ``(i - 1) % pool``.  Small enough to memorize, so the training loss falls.

    >>> import autoplan
    >>> data = SyntheticData(autoplan.models.get("gpt-tiny"), seed=0, pool=2)
    >>> bool((data.global_batch(1)["tokens"] == data.global_batch(3)["tokens"]).all())
    True
    """

    def __init__(self, spec, seed: int = 0, pool: int = 4):
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.spec = spec
        self.seed = int(seed)
        self.pool = int(pool)
        base = jax.random.fold_in(jax.random.key(self.seed), 0x0DA7A)  # apart from the init key
        # Host numpy: every process computes the same pool from the same keys.
        self._batches = [jax.tree_util.tree_map(np.asarray, spec.make_batch(jax.random.fold_in(base, j)))
                         for j in range(self.pool)]

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        """The whole batch of ``step`` (host arrays)."""
        return self._batches[(int(step) - 1) % self.pool]

    def local_batch(self, step: int, shardings) -> dict[str, np.ndarray]:
        """This process's block of the batch of ``step`` under ``shardings`` (a pytree like the batch)."""
        def local(x, sharding):
            box = _process_slice(sharding, x.shape)
            if box is None:
                raise ValueError(f"the sharding {sharding} gives this process non-contiguous rows")
            return x[box]

        return jax.tree_util.tree_map(local, self.global_batch(step), shardings)

    def batch(self, step: int, shardings):
        """The batch of ``step`` ready for the step function.

        One process: the host batch (the step places it).  Several: global
        `jax.Array`s assembled from each process's local slice.
        """
        if jax.process_count() == 1:
            return self.global_batch(step)

        def assemble(x: np.ndarray, sharding):
            box = _process_slice(sharding, x.shape)
            if box is None:  # this process's rows are not one block: build each device's shard instead
                return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
            return jax.make_array_from_process_local_data(sharding, x[box], x.shape)

        return jax.tree_util.tree_map(assemble, self.global_batch(step), shardings)


def _process_slice(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> tuple[slice, ...] | None:
    """The block of the global array that this process's devices hold, or None if it is not one block."""
    index_map = sharding.addressable_devices_indices_map(tuple(shape))
    box = []
    for dim, size in enumerate(shape):
        intervals = sorted({index[dim].indices(size)[:2] for index in index_map.values()})
        start, stop = intervals[0]
        for lo, hi in intervals[1:]:
            if lo > stop:  # a gap: the process holds rows from separate places
                return None
            stop = max(stop, hi)
        box.append(slice(start, stop))
    return tuple(box)


# ---------------------------------------------------------------------------
# Meshes


def make_mesh(mesh=None, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A device mesh for training.

    ``mesh`` is a `jax.sharding.Mesh` (returned as is), a shape tuple such as
    ``(2, 4)`` (axes ``("data", "model")``; a 1-tuple is ``("data",)``), a
    ``{name: size}`` dict, or None: ``(2, n // 2)`` over the ``n`` devices
    when ``n`` is even and at least 4, else ``(n,)``.  ``devices`` defaults to
    ``jax.devices()`` (every process's devices).
    """
    if isinstance(mesh, jax.sharding.Mesh):
        return E.as_auto_mesh(mesh)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if mesh is None:
        shape, names = ((2, n // 2), ("data", "model")) if n >= 4 and n % 2 == 0 else ((n,), ("data",))
    elif isinstance(mesh, Mapping):
        names, shape = tuple(mesh), tuple(int(s) for s in mesh.values())
    else:
        shape = tuple(int(s) for s in mesh)
        if len(shape) == 1:
            names = ("data",)
        elif len(shape) == 2:
            names = ("data", "model")
        else:
            raise TrainingError(f"mesh shape {shape}: give 1 or 2 axes, or a {{name: size}} dict")
    if math.prod(shape) != n:
        raise TrainingError(f"mesh {dict(zip(names, shape))} needs {math.prod(shape)} devices but {n} are "
                            "available; pass a mesh whose sizes multiply to the device count")
    return E.device_mesh(C.MeshShape(axis_names=tuple(names), axis_sizes=tuple(shape)), devices)


# ---------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What `train` did.

    Attributes:
        losses: Global step (from 1) -> loss, for every step of the run so
            far, including those before a resume (read from the train log).
        state: The final ``(params, opt_state)`` (sharded as the plan says).
        plan: The plan the step ran with.
        steps_run: How many steps this call ran (0 if the checkpoint was
            already at ``steps``).
        resumed_from: The checkpoint step this call restored, or None.
        seconds: Wall time of the training loop (after planning and compiling).
    """

    losses: dict[int, float]
    state: Any = dataclasses.field(repr=False)
    plan: P.Plan = dataclasses.field(repr=False)
    steps_run: int
    resumed_from: int | None
    seconds: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.losses[min(self.losses)]

    @property
    def last_loss(self) -> float:
        return self.losses[max(self.losses)]


def _resolve_planner(planner):
    if planner is None or callable(planner):
        return planner
    from autoplan import baselines

    if planner == "autoplan":
        return None
    if planner not in baselines.ALL:
        raise TrainingError(f"unknown planner {planner!r}; use 'autoplan' or one of {', '.join(baselines.ALL)}")
    return getattr(baselines, planner)


def train(spec_or_name, steps: int, *, mesh=None, devices: Sequence | None = None,
          cluster: C.Cluster | str | None = "cpu", planner: Callable | str | None = None,
          plan: P.Plan | None = None, ckpt_dir: str | os.PathLike | None = None, resume: bool = False,
          save_every: int = 10, keep: int | None = 3, seed: int = 0, pool: int = 4, progress: bool = True,
          log: Callable[[str], Any] | None = print, log_every: int = 1,
          on_planned: Callable[[P.Plan], Any] | None = None) -> TrainResult:
    """Train ``spec_or_name`` (a `ModelSpec` or zoo name) for ``steps`` steps with a planned step.

    Steps are numbered from 1; step ``i`` trains on ``SyntheticData(spec,
    seed, pool).batch(i)``, and ``losses[i]`` is the loss it reports.  The
    state starts from ``spec.init(jax.random.key(seed))`` (computed directly
    into the planned shardings), or with ``resume`` from the latest checkpoint
    in ``ckpt_dir``, restored onto this run's plan and mesh (they may differ
    from the run that saved it); training then continues at the next step up
    to ``steps``.  Same seed, same losses, interrupted or not.

    Args:
        mesh, devices: see `make_mesh`.
        cluster, planner, plan: passed to `autoparallel` (``planner`` may be a
            baseline name such as ``"data_parallel"``, or ``"autoplan"``).
        ckpt_dir: checkpoint directory; None trains without checkpoints.
        resume: continue from the latest checkpoint in ``ckpt_dir`` if there
            is one (else start fresh).  Without it a ``ckpt_dir`` that already
            holds checkpoints is refused, so no run silently overwrites another.
        save_every: checkpoint every this many steps (and after the last step).
        keep: how many checkpoints to keep.
        progress: show a tqdm progress bar (process 0 only).
        log: where log lines go (process 0 only; None: nowhere).
        log_every: log the loss of the first step, every ``log_every``-th
            step and the last step, as ``step 10 loss 4.123456``.
        on_planned: called with the plan once it is made, before training (on
            every process).

    Raises:
        TrainingError, `autoplan.checkpoint.CheckpointError` (e.g. the
        checkpoint belongs to another model: the message names the first
        mismatching pytree path; or it is corrupt), `autoplan.PlanningError`.
    """
    from autoplan import models

    if isinstance(spec_or_name, str):
        try:
            spec = models.get(spec_or_name)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    else:
        spec = spec_or_name
    steps = int(steps)
    if steps < 0 or save_every < 1 or log_every < 1:
        raise TrainingError("steps must be >= 0, save_every and log_every >= 1")
    main = jax.process_index() == 0
    say = (log if (main and log is not None) else (lambda _msg: None))
    _install_test_hooks()

    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=keep) if ckpt_dir is not None else None
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if latest is not None and not resume:
        raise TrainingError(
            f"{checkpointer.path} already holds checkpoints (latest step {latest}); pass resume=True "
            "(--resume) to continue that run, or use an empty directory")

    device_mesh = make_mesh(mesh, devices)
    step_fn = autoparallel(spec.train_step, mesh=device_mesh, cluster=cluster,
                           planner=_resolve_planner(planner), plan=plan)
    abstract_params, abstract_opt = spec.abstract_state()
    step_fn.lower(abstract_params, abstract_opt, spec.abstract_batch())  # plans (and checks) the step
    the_plan, run_mesh = step_fn.plan, step_fn.mesh
    _check_same_plan(the_plan)
    if on_planned is not None:
        on_planned(the_plan)
    params_sharding, opt_sharding, batch_sharding = E.input_named_shardings(the_plan, run_mesh)
    data = SyntheticData(spec, seed=seed, pool=pool)

    history: dict[int, float] = {}
    resumed_from = None
    try:
        if latest is not None:
            try:
                (params, opt_state), resumed_from = checkpointer.restore(the_plan, mesh=run_mesh)
            except ckpt_lib.CheckpointError as e:
                earlier = [s for s in checkpointer.all_steps() if s != latest]
                if "corrupt" in str(e) and earlier:
                    raise ckpt_lib.CheckpointError(
                        f"{e}. Nothing was loaded or overwritten; to resume from checkpoint {earlier[-1]} "
                        f"instead, move {checkpointer.path / str(latest)} out of the directory and resume "
                        "again") from None
                raise
            history = _read_log(ckpt_dir, spec.name, seed, pool, upto=resumed_from, say=say)
            say(f"resumed from checkpoint {resumed_from} in {checkpointer.path} "
                f"(mesh {dict(run_mesh.shape)}, plan {the_plan.name!r})"
                + (f"; continuing at step {resumed_from + 1}" if resumed_from < steps else ""))
        else:
            if resume and checkpointer is not None:
                say(f"no checkpoint in {checkpointer.path}: starting from step 1")
            init = jax.jit(lambda: spec.init(jax.random.key(seed)), out_shardings=(params_sharding, opt_sharding))
            params, opt_state = init()

        first = (resumed_from or 0) + 1
        if first > steps:
            say(f"checkpoint {resumed_from} is already at or past step {steps}: nothing to train")
        losses = dict(history)
        bar = _progress_bar(spec.name, steps, first - 1, enabled=progress and main)
        write = (lambda msg: bar.write(msg, file=sys.stdout)) if (bar is not None and log is print) else say
        start = time.perf_counter()
        try:
            for i in range(first, steps + 1):
                batch = data.batch(i, batch_sharding)
                params, opt_state, loss = step_fn(params, opt_state, batch)
                losses[i] = _scalar(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[i]:.4f}", refresh=False)
                if i == first or i % log_every == 0 or i == steps:
                    write(f"step {i} loss {losses[i]:.6f}")
                if checkpointer is not None and (i % save_every == 0 or i == steps):
                    if main:
                        _write_log(ckpt_dir, spec.name, seed, pool, losses)
                    checkpointer.save((params, opt_state), i)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        if checkpointer is not None:
            checkpointer.wait()
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return TrainResult(losses=losses, state=(params, opt_state), plan=the_plan,
                       steps_run=max(0, steps - first + 1), resumed_from=resumed_from, seconds=seconds)


def _progress_bar(name: str, total: int, initial: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {name}", unit="step", file=sys.stderr,
                dynamic_ncols=True, leave=True)


def _scalar(x) -> float:
    """A scalar loss as a Python float, on one process or many (it is replicated)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return float(np.asarray(x))
    if x.is_fully_replicated:
        return float(np.asarray(x.addressable_data(0)))
    from jax.experimental import multihost_utils

    return float(np.asarray(multihost_utils.process_allgather(x, tiled=True)))


def _check_same_plan(plan: P.Plan) -> None:
    """Every process must run the same plan (planning is deterministic; this makes sure)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(plan.to_json().encode()).digest()[:16], dtype=np.uint32)
    multihost_utils.assert_equal(digest, f"the processes made different plans for {plan.name!r}; planning "
                                          "must see the same step, shapes, mesh and cluster on every process")


# ---------------------------------------------------------------------------
# The loss log beside the checkpoints


def _log_path(ckpt_dir) -> str:
    return os.path.join(os.fspath(ckpt_dir), TRAIN_LOG)


def _write_log(ckpt_dir, model: str, seed: int, pool: int, losses: Mapping[int, float]) -> None:
    """Write ``train_log.json`` atomically (a temporary file renamed over the old one)."""
    os.makedirs(os.fspath(ckpt_dir), exist_ok=True)
    path = _log_path(ckpt_dir)
    tmp = f"{path}.tmp-{os.getpid()}"
    payload = {"format": _LOG_FORMAT, "version": 1, "model": model, "seed": seed, "pool": pool,
               "losses": {str(k): float(v) for k, v in sorted(losses.items())}}
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_log(ckpt_dir) -> dict[int, float]:
    """The loss history saved in ``ckpt_dir`` (step -> loss); empty if there is none."""
    try:
        with open(_log_path(ckpt_dir)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {int(k): float(v) for k, v in data.get("losses", {}).items()}


def _read_log(ckpt_dir, model: str, seed: int, pool: int, *, upto: int, say) -> dict[int, float]:
    try:
        with open(_log_path(ckpt_dir)) as f:
            data = json.load(f)
    except FileNotFoundError:
        say(f"note: no {TRAIN_LOG} in {ckpt_dir}; the loss history before step {upto + 1} is unknown")
        return {}
    except (OSError, ValueError) as e:
        say(f"note: {TRAIN_LOG} in {ckpt_dir} is unreadable ({e}); the loss history before step "
            f"{upto + 1} is unknown")
        return {}
    if (data.get("model"), data.get("seed"), data.get("pool")) != (model, seed, pool):
        say(f"note: the checkpoint was trained with model={data.get('model')!r} seed={data.get('seed')} "
            f"pool={data.get('pool')}, this run uses model={model!r} seed={seed} pool={pool}: the data "
            "after the resume differs from the original run's, and its loss history is not carried over")
        return {}
    # The log may run ahead of the last committed checkpoint (a save that did not finish).
    return {int(k): float(v) for k, v in data.get("losses", {}).items() if int(k) <= upto}


# ---------------------------------------------------------------------------
# Test-only hook


def _install_test_hooks() -> None:
    """TEST ONLY. ``AUTOPLAN_TEST_STALL_SAVE=<step>`` makes the commit of checkpoint ``<step>`` hang.

    The arrays of that step are fully written into orbax's temporary
    directory, but the final rename never happens, so a test can SIGKILL the
    process in the middle of a save and check that resuming ignores it.
    """
    stall = os.environ.get("AUTOPLAN_TEST_STALL_SAVE")
    if not stall:
        return
    import asyncio

    from orbax.checkpoint._src.path import atomicity

    cls = atomicity.AtomicRenameTemporaryPath
    if getattr(cls.finalize, "_autoplan_stall", False):
        return
    original = cls.finalize

    async def finalize(self, *args, **kwargs):
        if self._final_path.name == stall:
            sys.stderr.write(f"autoplan test hook: stalling the commit of checkpoint {stall}\n")
            sys.stderr.flush()
            await asyncio.sleep(3600)
        return await original(self, *args, **kwargs)

    finalize._autoplan_stall = True
    cls.finalize = finalize
