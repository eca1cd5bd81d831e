"""Checkpoint, resume, and restore onto another mesh or plan, with orbax-checkpoint.

A training state (a pytree of `jax.Array`s, possibly sharded over a
multi-device or multi-process mesh, plus any numpy arrays and Python numbers)
is saved as a numbered *step* under a checkpoint directory::

    ckpt/
      100/              committed checkpoints (orbax renames them into place)
      200/
      300.orbax-checkpoint-tmp-1712345678/    a save in progress, or one that crashed

Why orbax, and what we rely on from it:

- Atomic commit.  orbax writes a step into ``<step>.orbax-checkpoint-tmp-<t>``
  and, once every array of every process is on disk, writes
  ``commit_success.txt`` into it and renames it to ``<step>`` (on object stores
  without atomic rename it instead relies on that commit file).  Listing steps
  only ever returns committed directories, so a process killed mid-save
  (SIGKILL, preemption) leaves at most a temporary directory that is ignored
  and deleted the next time a `Checkpointer` opens the directory for writing;
  the previous checkpoint stays the latest and restores unchanged.
- Asynchronous saves.  ``save`` blocks only while the arrays are copied to
  host memory; the files are written by a background thread while training
  continues (the step's buffers may be donated or overwritten right after
  ``save`` returns).
- Multi-process coordination.  Every process calls ``save``/``restore`` with
  its shards; orbax writes each process's shards and lets process 0 write the
  metadata and commit.  This module never writes files itself.
- Resharding on restore.  Each array is read straight into the sharding the
  caller asks for, so a state saved data-parallel on 8 devices restores onto a
  (2, 4) tensor-parallel layout, onto 4 devices, or onto an autoplan `Plan`.

On top of orbax this module adds what a training loop needs to trust a restore:

- A shape/dtype/structure check against the saved metadata *before* reading
  any array, so restoring another model's checkpoint fails with the first
  mismatching pytree path (``params/block0/mlp_in/kernel``) instead of deep
  inside tensorstore.
- Content checksums.  orbax does not checksum array data: a flipped or zeroed
  block in a data file restores silently wrong numbers.  ``save`` computes a
  32-bit position-weighted checksum of every leaf on device (one fused pass,
  exact integer arithmetic, so independent of the sharding) and stores them in
  the step's metadata; ``restore`` recomputes them on the restored arrays and
  raises `CheckpointError` naming the step directory on any difference, as it
  does for missing or truncated files and missing metadata.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from autoplan._src.plan import Plan

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "all_steps",
    "close",
    "latest_step",
    "restore",
    "save",
    "wait_until_finished",
]

# Key of autoplan's entry in orbax's per-step custom metadata.
_META_KEY = "autoplan"
_META_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the restore target."""


# ---------------------------------------------------------------------------
# Pytree paths


def _keystr(keypath) -> str:
    return jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")


def _is_saved_leaf(x) -> bool:
    # orbax metadata leaves (ArrayMetadata, ScalarMetadata, ...) all carry a shape.
    return x is not None and hasattr(x, "shape") and hasattr(x, "dtype")


def _saved_leaves(tree) -> dict[str, Any]:
    """path -> orbax leaf metadata, in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_saved_leaf)
    return {_keystr(kp): leaf for kp, leaf in flat if _is_saved_leaf(leaf)}


def _fmt(shape, dtype) -> str:
    return f"{tuple(int(d) for d in shape)} {np.dtype(dtype).name}"


# ---------------------------------------------------------------------------
# Content checksums
#
# digest(x) = sum_i  word_i * (2*i + 1)   (mod 2**32)   over the row-major
# element index i of the logical array, for each 32-bit word of its bit
# pattern (8/16-bit types are widened, 64-bit types split in two halves,
# complex types digest real and imaginary parts).  Integer wraparound sums are
# exact and order-independent, so the value does not depend on how the array is
# sharded or on the reduction order, and a single flipped bit always changes it
# (2**b * odd is never 0 mod 2**32).  The jax and numpy versions agree bit for bit.

_MASK = 0xFFFFFFFF


def _digestible(dtype) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError:  # extended dtypes such as PRNG keys
        return False
    if dt.kind == "c":
        return dt.itemsize in (8, 16)
    if dt.kind == "V":  # ml_dtypes: bfloat16 and the float8 family; not the sub-byte int4/float4
        return dt.itemsize in (1, 2) and dt.name.startswith(("bfloat", "float8"))
    return dt.kind in "biuf" and dt.itemsize in (1, 2, 4, 8)


def _np_words(x: np.ndarray) -> list[np.ndarray]:
    dt = x.dtype
    if dt.kind == "c":
        return _np_words(np.ascontiguousarray(x.real)) + _np_words(np.ascontiguousarray(x.imag))
    if dt.kind == "b":
        return [x.astype(np.uint64)]
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
    u = np.ascontiguousarray(x).view(unsigned).astype(np.uint64)
    if dt.itemsize == 8:
        return [u & _MASK, u >> np.uint64(32)]
    return [u]


def _np_digest(x) -> int:
    x = np.asarray(x)
    weights = (np.arange(x.size, dtype=np.uint64).reshape(x.shape) * np.uint64(2) + np.uint64(1)) & np.uint64(_MASK)
    total = 0
    for k, words in enumerate(_np_words(x)):
        part = int(np.sum(words * weights, dtype=np.uint64)) & _MASK
        total = (total + (k + 1) * part) & _MASK
    return total


def _jnp_words(x) -> list:
    dt = np.dtype(x.dtype)
    if dt.kind == "c":
        return _jnp_words(jnp.real(x)) + _jnp_words(jnp.imag(x))
    if dt.kind == "b":
        return [x.astype(jnp.uint32)]
    if dt.itemsize == 8:
        u = jax.lax.bitcast_convert_type(x, jnp.uint64)
        return [(u & _MASK).astype(jnp.uint32), (u >> 32).astype(jnp.uint32)]
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[dt.itemsize]
    return [jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)]


def _jnp_digest(x):
    # Build the flat index from per-axis iotas instead of reshaping, so that a
    # sharded array is never gathered: each device reduces its shard and XLA
    # all-reduces one scalar.
    shape = x.shape
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride & _MASK)
        stride *= shape[axis]
    weights = index * np.uint32(2) + np.uint32(1)
    total = jnp.uint32(0)
    for k, words in enumerate(_jnp_words(x)):
        total = total + np.uint32(k + 1) * jnp.sum(words * weights, dtype=jnp.uint32)
    return total


@jax.jit
def _jnp_digests(leaves):
    return [_jnp_digest(x) for x in leaves]


def _digests(leaves: Sequence[Any]) -> list[int | None]:
    """Checksum of every leaf (None where the dtype has no stable bit pattern)."""
    out: list[int | None] = [None] * len(leaves)
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            if _digestible(leaf.dtype):
                sharding = leaf.sharding
                key = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
                if key is None or not hasattr(key, "devices"):
                    key = tuple(sorted(d.id for d in sharding.device_set))
                groups.setdefault(key, []).append(i)
        elif isinstance(leaf, (np.ndarray, np.generic, int, float, complex, bool)):
            arr = np.asarray(leaf)
            if _digestible(arr.dtype):
                out[i] = _np_digest(arr)
    # One jitted call per device set: every process runs the same calls in the
    # same order, and each result is a replicated scalar any process can read.
    for indices in groups.values():
        results = _jnp_digests([leaves[i] for i in indices])
        for i, r in zip(indices, results):
            out[i] = int(np.asarray(r.addressable_data(0)))
    return out


# ---------------------------------------------------------------------------
# Restore targets


def _plan_target(plan: Plan, saved_tree, mesh):
    """(target pytree of ShapeDtypeStructs, display name of each leaf) for a Plan."""
    from autoplan._src.emit import input_named_shardings  # emit imports heavy modules; only here

    if plan.input_tree is None:
        raise CheckpointError(
            "this Plan was loaded from JSON and does not know the pytree structure of the step's "
            "arguments; restore onto the Plan returned by autoplan.plan(...) for the same step, or "
            "pass a pytree of jax.sharding.NamedSharding as the target")
    if plan.stack_chunks:  # a pipeline of a cut stack: the user's stacked leaves, as they live between steps
        from autoplan._src import stacked
        from autoplan._src.emit import device_mesh

        tree, pairs = stacked.user_inputs(plan, device_mesh(plan.mesh) if mesh is None else mesh)
        inputs, flat_shardings = [leaf for leaf, _ in pairs], [s for _, s in pairs]
    else:
        tree, inputs = plan.input_tree, list(plan.inputs)
        flat_shardings = jax.tree_util.tree_leaves(input_named_shardings(plan, mesh))
    arg_trees = tree.children()
    leaf_counts = [t.num_leaves for t in arg_trees]
    starts = np.cumsum([0] + leaf_counts).tolist()
    names = [inputs[starts[i]].path.split("/")[0] if leaf_counts[i] else f"arg{i}"
             for i in range(len(arg_trees))]

    if isinstance(saved_tree, (list, tuple)):
        chosen = list(range(len(saved_tree)))
        if len(chosen) > len(arg_trees):
            raise CheckpointError(
                f"the checkpoint holds a tuple of {len(chosen)} values but the plan's step takes only "
                f"{len(arg_trees)} arguments ({', '.join(names)}); save the state as a tuple of the "
                "step's leading arguments, e.g. (params, opt_state)")
        pick = lambda xs: tuple(xs[i] for i in chosen)  # noqa: E731
    elif isinstance(saved_tree, Mapping) and set(saved_tree) <= set(names):
        chosen = [names.index(k) for k in saved_tree]
        pick = lambda xs: {names[i]: xs[i] for i in chosen}  # noqa: E731
    else:
        raise CheckpointError(
            "to restore onto a Plan the checkpoint must hold a tuple of the step's leading arguments, "
            f"e.g. save((params, opt_state), ...), or a dict keyed by argument names {names}; this one "
            f"holds a {type(saved_tree).__name__}. Pass a pytree of NamedShardings as the target instead")

    target = pick([
        jax.tree_util.tree_unflatten(arg_trees[i], [
            jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(leaf.dtype), sharding=s)
            for leaf, s in zip(inputs[starts[i]:starts[i + 1]], flat_shardings[starts[i]:starts[i + 1]])])
        for i in range(len(arg_trees))])
    # Display names: the plan's own leaf paths ("params/block0/mlp_in/kernel").
    display: dict[str, str] = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(target)
    by_arg = {i: iter(inputs[starts[i]:starts[i + 1]]) for i in chosen}
    for kp, _leaf in flat:
        arg = kp[0].idx if isinstance(kp[0], jax.tree_util.SequenceKey) else names.index(kp[0].key)
        display[_keystr(kp)] = next(by_arg[arg]).path
    for key, i in zip(saved_tree if isinstance(saved_tree, Mapping) else range(len(saved_tree)), chosen):
        display.setdefault(f"{key}", names[i])
    return target, display


def _display(path: str, display: Mapping[str, str]) -> str:
    if path in display:
        return display[path]
    head, _, rest = path.partition("/")
    if head in display:
        return f"{display[head]}/{rest}" if rest else display[head]
    return path or "<root>"


def _abstract_target(target, saved_tree, mesh, step_dir: str):
    """Validate ``target`` against the saved metadata and build orbax's restore target.

    Returns (abstract target pytree, internal path of each target leaf in
    flatten order, display names).
    """
    display: dict[str, str] = {}
    if isinstance(target, Plan):
        target, display = _plan_target(target, saved_tree, mesh)
    elif mesh is not None:
        raise TypeError("mesh= is only used when the target is an autoplan Plan")

    saved = _saved_leaves(saved_tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    hint = ("the checkpoint was written by a different model or optimizer configuration; restore it "
            "with a target built from the same model and optimizer as the run that saved it, or start "
            "this run from a fresh checkpoint directory")
    leaves, paths = [], []
    for kp, leaf in flat:
        path = _keystr(kp)
        name = _display(path, display)
        if path not in saved:
            raise CheckpointError(
                f"checkpoint {step_dir} has no value at {name!r}, which the target expects "
                f"({_describe(leaf)}): {hint}")
        meta = saved[path]
        saved_shape, saved_dtype = tuple(meta.shape), np.dtype(meta.dtype)
        if isinstance(leaf, jax.sharding.Sharding):
            abstract = jax.ShapeDtypeStruct(saved_shape, saved_dtype, sharding=leaf)
            expected = (saved_shape, saved_dtype)
        elif isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
            if getattr(leaf, "sharding", None) is None:
                raise CheckpointError(
                    f"target leaf {name!r} is a ShapeDtypeStruct without a sharding; give it "
                    "sharding=NamedSharding(mesh, spec) so the array is read straight onto its devices")
            abstract = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
            expected = (tuple(leaf.shape), np.dtype(leaf.dtype))
        elif isinstance(leaf, (np.ndarray, np.generic)):
            abstract = leaf
            expected = (tuple(leaf.shape), leaf.dtype)
        elif isinstance(leaf, (int, float, complex, bool)):
            abstract = leaf  # a Python number: only the (scalar) shape must agree
            expected = ((), saved_dtype)
        else:
            raise CheckpointError(
                f"target leaf {name!r} is a {type(leaf).__name__}; use a jax.sharding.NamedSharding, a "
                "jax.ShapeDtypeStruct with a sharding, a jax.Array, a numpy array or a Python number")
        if expected != (saved_shape, saved_dtype):
            raise CheckpointError(
                f"checkpoint {step_dir} does not match the target at {name!r}: saved "
                f"{_fmt(saved_shape, saved_dtype)}, expected {_fmt(*expected)}: {hint}")
        leaves.append(abstract)
        paths.append(path)
    extra = [p for p in saved if p not in set(paths)]
    if extra:
        raise CheckpointError(
            f"checkpoint {step_dir} holds {_display(extra[0], display)!r} "
            f"({_fmt(saved[extra[0]].shape, saved[extra[0]].dtype)}), which the target lacks"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + f": {hint}")
    return jax.tree_util.tree_unflatten(treedef, leaves), paths, display


def _describe(leaf) -> str:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return _fmt(leaf.shape, leaf.dtype)
    return type(leaf).__name__


# ---------------------------------------------------------------------------
# Checkpointer


def _normalize(path) -> epath.Path:
    text = os.fspath(path)
    if "://" not in text:
        text = os.path.abspath(text)
    return epath.Path(text)


def _committed_steps(path: epath.Path) -> list[int]:
    """Steps whose directories orbax committed (temporary directories are skipped)."""
    if not path.exists():
        return []
    return sorted(m.step for m in ocp.step.standard_name_format().find_all(path))


@contextlib.contextmanager
def _late_callback_noise_dropped(settle_seconds: float = 0.5):
    """Hold back what Python code prints to stderr while orbax restores.

    When a read fails, orbax abandons its other reads: their callbacks print
    "Event loop is closed" tracebacks from background threads, and their
    coroutines, when collected, "Exception ignored in" reports.  That is
    noise after an error `restore` already reports cleanly.  On failure,
    wait for the callbacks, drop what was held back, and silence those
    coroutines' reports for the rest of the process; on success, print what
    was held back as it was.
    """
    held, original = io.StringIO(), sys.stderr
    sys.stderr = held
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        _silence_abandoned_orbax_reads()
        time.sleep(settle_seconds)
        raise
    finally:
        sys.stderr = original
        if not failed and held.getvalue():
            original.write(held.getvalue())


class _AbandonedReadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "never retrieved" not in record.getMessage()


def _silence_abandoned_orbax_reads() -> None:
    """Drop the reports of orbax reads left behind by a failed restore.

    Their coroutines print 'Exception ignored' when collected, and their
    futures are logged by asyncio as 'exception was never retrieved'.
    """
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedReadFilter())
    previous = sys.unraisablehook
    if getattr(previous, "_autoplan_filter", False):
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        previous(unraisable)

    hook._autoplan_filter = True
    sys.unraisablehook = hook


class Checkpointer:
    """An open checkpoint directory: numbered, atomic, asynchronous saves and resharding restores.

    Keep one per directory for a training run, so successive saves share one
    orbax `CheckpointManager` (one background writer, one view of which steps
    exist, pruning of old steps).  Every process of a multi-process job must
    create it and call `save`/`restore` with the same arguments.

    Args:
        path: The checkpoint directory (created on the first save).  Local paths
            are made absolute; ``gs://`` and other URLs are passed to orbax.
        keep: How many of the most recent checkpoints to keep (``None``: all).
        asynchronous: Write files in a background thread (default).  `save`
            then returns once the arrays are copied to host memory.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> with Checkpointer(tempfile.mkdtemp(), keep=2) as ckpt:
    ...     ckpt.save({"w": jnp.ones((4, 4))}, step=1)
    ...     target = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    ...     state, step = ckpt.restore(target)
    >>> step, float(state["w"].sum())
    (1, 16.0)
    """

    def __init__(self, path, *, keep: int | None = 3, asynchronous: bool = True):
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        self.path = _normalize(path)
        self.keep = keep
        self.asynchronous = bool(asynchronous)
        self._manager: ocp.CheckpointManager | None = None
        self._writable = False
        self._closed = False

    # -- the orbax manager, created lazily: a Checkpointer that only restores
    # opens the directory read-only, so it neither creates it nor deletes the
    # temporary directory of a save that another job has in flight.
    def _open(self, *, write: bool) -> ocp.CheckpointManager:
        if self._closed:
            raise CheckpointError(f"the Checkpointer for {self.path} is closed")
        if self._manager is not None and write and not self._writable:
            self._manager.close()
            self._manager = None
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep,
                create=write,
                read_only=not write,
                # A process killed mid-save leaves <step>.orbax-checkpoint-tmp-*;
                # it is never listed as a step, and deleting it when a writer
                # opens the directory keeps partial saves from piling up.
                cleanup_tmp_directories=write,
                enable_async_checkpointing=self.asynchronous,
            )
            self._manager = ocp.CheckpointManager(
                self.path, options=options, item_handlers=ocp.StandardCheckpointHandler())
            self._writable = write
        return self._manager

    def save(self, state, step: int) -> None:
        """Save ``state`` as checkpoint ``step`` (asynchronously unless ``asynchronous=False``).

        The arrays are copied to host memory before this returns, so the
        caller may donate or overwrite them right away.  If the previous save
        is still being written, this first waits for it (orbax keeps one save
        in flight).  Raises `CheckpointError` if ``step`` already exists.

        >>> import tempfile, jax.numpy as jnp
        >>> ckpt = Checkpointer(tempfile.mkdtemp())
        >>> ckpt.save((jnp.zeros(3), {"count": 0}), step=10)
        >>> ckpt.wait(); ckpt.latest_step()
        10
        >>> ckpt.close()
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise TypeError(f"step must be a non-negative int, got {type(step).__name__} {step!r} "
                            "(the signature is save(state, step))")
        step = int(step)
        manager = self._open(write=True)
        manager.check_for_errors()
        if step in manager.all_steps() or step in _committed_steps(self.path):
            raise CheckpointError(
                f"checkpoint {step} already exists in {self.path}; save under a new step number "
                "(orbax never overwrites a committed checkpoint)")
        flat, _ = jax.tree_util.tree_flatten_with_path(state)
        if not flat:
            raise CheckpointError("the state to save has no leaves")
        digests = _digests([leaf for _, leaf in flat])
        meta = {_META_KEY: {"version": _META_VERSION,
                            "digests": {_keystr(kp): d for (kp, _), d in zip(flat, digests) if d is not None}}}
        # force=True: save exactly the steps the caller asks for; orbax would
        # otherwise silently skip a step lower than the last one it saved.
        manager.save(step, args=ocp.args.StandardSave(state), custom_metadata=meta, force=True)

    def all_steps(self) -> list[int]:
        """Committed checkpoint steps in this directory, ascending (saves in flight excluded)."""
        return _committed_steps(self.path)

    def latest_step(self) -> int | None:
        """The highest committed step, or None if there is none.

        Reads the directory, so it sees checkpoints written by other
        processes or earlier runs, and never a save still in flight.
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
        """Restore checkpoint ``step`` (default: the latest) onto ``target``; returns ``(state, step)``.

        ``target`` says where every array goes:

        - a pytree shaped like the saved state whose leaves are
          `jax.sharding.NamedSharding` (shape and dtype come from the
          checkpoint), `jax.ShapeDtypeStruct` with a ``sharding`` or
          `jax.Array` (shape and dtype must match the checkpoint), numpy
          arrays (restored to host) or Python numbers;
        - or an autoplan `Plan`: the saved state must then be a tuple of the
          step's leading arguments, e.g. ``(params, opt_state)`` for a step
          ``(params, opt_state, batch)`` (or a dict keyed by argument names),
          and each array is restored with the plan's input sharding on
          ``mesh`` (default: the plan's mesh over all devices).

        Raises `CheckpointError` if there is no checkpoint, if the target's
        structure, shapes or dtypes differ from the saved state (naming the
        first differing path), or if the checkpoint is corrupt or incomplete
        (missing or truncated files, missing metadata, checksum mismatch).
        A save of this Checkpointer still in flight is waited for first.

        >>> import tempfile, jax, jax.numpy as jnp, numpy as np
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("data",))
        >>> ckpt = Checkpointer(tempfile.mkdtemp())
        >>> ckpt.save({"w": jnp.arange(8.0)}, step=3)
        >>> spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        >>> state, step = ckpt.restore({"w": spec})
        >>> step, state["w"].sharding == spec
        (3, True)
        >>> ckpt.close()
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(self._no_checkpoint_message())
            step = steps[-1]
        elif int(step) not in steps:
            if not steps:
                raise CheckpointError(self._no_checkpoint_message(f"step {step}"))
            raise CheckpointError(
                f"no committed checkpoint {step} in {self.path}"
                + (" (only an uncommitted temporary directory, left by a save that did not finish)"
                   if self._has_tmp(int(step)) else "")
                + f"; committed steps: {steps}")
        step = int(step)
        step_dir = str(self.path / str(step))
        manager = self._open(write=False)
        manager.reload()  # pick up steps written by other processes or earlier runs

        step_meta = self._step_metadata(manager, step, step_dir)
        saved_tree = step_meta.item_metadata
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        if saved_tree is None:
            raise CheckpointError(f"checkpoint {step_dir} is corrupt or incomplete: its array metadata "
                                  f"is missing{self._other_steps_hint(step)}")
        abstract, paths, display = _abstract_target(target, saved_tree, mesh, step_dir)

        try:
            with _late_callback_noise_dropped():
                restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # tensorstore / orbax raise assorted types for bad files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore")[0]
            raise CheckpointError(
                f"checkpoint {step_dir} is corrupt or incomplete and was not loaded ({first[:300]})"
                f"{self._other_steps_hint(step)}") from e

        saved_digests = (step_meta.custom_metadata or {}).get(_META_KEY, {}).get("digests")
        if saved_digests is not None:  # absent for checkpoints written by plain orbax
            leaves = jax.tree_util.tree_leaves(restored)
            saved_leaves = _saved_leaves(saved_tree)
            check = [i for i, p in enumerate(paths)
                     if p in saved_digests and _same_dtype(leaves[i], saved_leaves[p].dtype)]
            got = _digests([leaves[i] for i in check])
            for i, d in zip(check, got):
                if d is not None and d != saved_digests[paths[i]]:
                    raise CheckpointError(
                        f"checkpoint {step_dir} is corrupt: the data read for {_display(paths[i], display)!r} "
                        f"does not match the checksum written at save time{self._other_steps_hint(step)}")
        return restored, step

    def _step_metadata(self, manager, step: int, step_dir: str):
        try:
            step_meta = manager.metadata(step)
        except Exception as e:
            raise CheckpointError(f"checkpoint {step_dir} is corrupt or incomplete: its metadata cannot be "
                                  f"read ({e}){self._other_steps_hint(step)}") from e
        # orbax writes _CHECKPOINT_METADATA (with our checksums) before it commits a step.
        if (step_meta.custom_metadata or {}).get(_META_KEY) is None and not (
                self.path / str(step) / "_CHECKPOINT_METADATA").exists():
            raise CheckpointError(f"checkpoint {step_dir} is corrupt or incomplete: its step metadata "
                                  f"(_CHECKPOINT_METADATA) is missing{self._other_steps_hint(step)}")
        return step_meta

    def _has_tmp(self, step: int) -> bool:
        return self.path.exists() and any(
            p.name.startswith(f"{step}.orbax-checkpoint-tmp") for p in self.path.iterdir())

    def _no_checkpoint_message(self, what: str = "checkpoint") -> str:
        if not self.path.exists():
            return f"no {what} to restore: {self.path} does not exist"
        tmp = [p.name for p in self.path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
        if tmp:
            return (f"no committed {what} in {self.path}: only uncommitted temporary directories "
                    f"({', '.join(sorted(tmp))}), left by saves that did not finish")
        return f"no {what} in {self.path}: it holds no committed checkpoint step directories"

    def _other_steps_hint(self, step: int) -> str:
        others = [s for s in self.all_steps() if s != step]
        if not others:
            return ""
        return f"; restore an earlier checkpoint with step={others[-1]} (committed steps: {others})"

    def wait(self) -> None:
        """Block until every save started by this Checkpointer is committed (re-raises its errors)."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()

    def close(self) -> None:
        """Wait for pending saves and release the orbax manager (idempotent)."""
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()
                self._manager = None
        self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.path)!r}, keep={self.keep}, asynchronous={self.asynchronous})"


def _same_dtype(leaf, dtype) -> bool:
    try:
        return np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype) == np.dtype(dtype)
    except TypeError:
        return False


# ---------------------------------------------------------------------------
# Module-level convenience API: one cached Checkpointer per directory.

_lock = threading.Lock()
_cache: dict[str, Checkpointer] = {}


_ANY = object()  # "whatever the cached Checkpointer has" (restore does not care about keep)


def _checkpointer(path, keep=_ANY, asynchronous=_ANY) -> Checkpointer:
    key = str(_normalize(path))
    with _lock:
        ckpt = _cache.get(key)
        if ckpt is not None and ((keep is not _ANY and ckpt.keep != keep)
                                 or (asynchronous is not _ANY and ckpt.asynchronous != bool(asynchronous))):
            ckpt.close()  # settings changed between calls: finish pending saves, reopen
            ckpt = None
        if ckpt is None:
            ckpt = Checkpointer(key, keep=3 if keep is _ANY else keep,
                                asynchronous=True if asynchronous is _ANY else asynchronous)
            _cache[key] = ckpt
        return ckpt


def save(path, state, step: int, *, keep: int | None = 3, asynchronous: bool = True) -> None:
    """Save ``state`` as checkpoint ``step`` under ``path``, keeping the last ``keep``.

    Uses one cached `Checkpointer` per directory, so a training loop can call
    this every N steps; saves are asynchronous by default (call
    `wait_until_finished` before reading the files from elsewhere; pending saves
    are also completed at interpreter exit).  A crash mid-save never damages the
    previous checkpoint.  See `Checkpointer` for the details.

    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> save(d, {"w": jnp.ones(4)}, step=1)
    >>> wait_until_finished(d); latest_step(d)
    1
    """
    _checkpointer(path, keep, asynchronous).save(state, step)


def restore(path, target, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """Restore checkpoint ``step`` (default: latest) from ``path`` onto ``target``: ``(state, step)``.

    ``target`` is a pytree of `jax.sharding.NamedSharding` /
    `jax.ShapeDtypeStruct` (with shardings) shaped like the saved state, or an
    autoplan `Plan` whose step's leading arguments the state holds (save
    ``(params, opt_state)``).  See `Checkpointer.restore`.

    >>> import tempfile, jax, jax.numpy as jnp, autoplan
    >>> spec = autoplan.models.get("mlp-tiny")
    >>> params, opt_state = spec.init(jax.random.key(0))
    >>> d = tempfile.mkdtemp()
    >>> save(d, (params, opt_state), step=100)
    >>> plan = autoplan.plan(spec.train_step, params, opt_state, spec.make_batch(jax.random.key(1)),
    ...                      num_devices=len(jax.devices()))
    >>> (params, opt_state), step = restore(d, plan)
    >>> step
    100
    """
    return _checkpointer(path).restore(target, step=step, mesh=mesh)


def latest_step(path) -> int | None:
    """The highest committed checkpoint step under ``path``, or None (for resuming a run).

    >>> import tempfile
    >>> latest_step(tempfile.mkdtemp()) is None
    True
    """
    steps = _committed_steps(_normalize(path))
    return steps[-1] if steps else None


def all_steps(path) -> list[int]:
    """All committed checkpoint steps under ``path``, ascending."""
    return _committed_steps(_normalize(path))


def wait_until_finished(path=None) -> None:
    """Block until pending asynchronous saves to ``path`` (default: every directory) are committed."""
    with _lock:
        targets = list(_cache.values()) if path is None else [
            c for k, c in _cache.items() if k == str(_normalize(path))]
    for ckpt in targets:
        ckpt.wait()


def close(path=None) -> None:
    """Finish pending saves and drop the cached Checkpointer of ``path`` (default: all)."""
    with _lock:
        keys = list(_cache) if path is None else [str(_normalize(path))]
        targets = [_cache.pop(k) for k in keys if k in _cache]
    for ckpt in targets:
        ckpt.close()


# Asynchronous saves run in background threads; finish them before the
# interpreter exits so that `save(...)` as the last line of a script commits.
atexit.register(close)
