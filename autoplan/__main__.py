"""Command line: ``python -m autoplan demo`` plans a small GPT on 8 fake CPU devices and trains it.

``python -m autoplan plan --model gpt2-48 --devices 64 --cluster a100-8x`` plans any
zoo model for a target cluster over an abstract mesh, without the hardware.

``python -m autoplan train --model gpt-tiny --steps 100 --ckpt /tmp/run [--resume]`` trains a
zoo model on fake CPU devices with checkpoints; add ``--coordinator 127.0.0.1:PORT
--num-processes 2 --process-id I`` to run one of several processes (``--devices`` is then the
local device count of each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _devices(n: int) -> None:
    # Fake CPU devices must be requested before JAX starts its backend.
    import jax

    jax.config.update("jax_num_cpu_devices", n)


def demo(args) -> int:
    _devices(8)
    import jax

    import autoplan

    spec = autoplan.models.get(args.model)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    print(f"autoplan demo: planning {spec.name} on {len(jax.devices())} {jax.devices()[0].platform} devices, "
          f"mesh {dict(mesh.shape)}, cluster {args.cluster}")
    start = time.perf_counter()
    plan = autoplan.plan(spec.train_step, *spec.abstract_state(), spec.abstract_batch(), mesh=mesh,
                         cluster=args.cluster)
    print(f"planned in {time.perf_counter() - start:.2f} s\n")
    print(plan.summary())
    print("\nBaselines under the same cost model (predicted step time, per-device memory):")
    for name in autoplan.baselines.ALL:
        b = getattr(autoplan.baselines, name)(spec.train_step, *spec.abstract_state(), spec.abstract_batch(),
                                              mesh=mesh, cluster=args.cluster)
        ratio = plan.cost.step_seconds / b.cost.step_seconds
        print(f"  {name:<14} step {b.cost.step_seconds * 1e3:9.3f} ms   memory {b.cost.memory_bytes / 2**20:8.2f} MiB"
              f"   autoplan/baseline = {ratio:.3f}")

    from autoplan._src import training

    print(f"\nTraining {spec.name} with autoplan.autoparallel on mesh {dict(mesh.shape)} for {args.steps} steps "
          "(synthetic data: a small pool of fixed batches, so the loss can fall):", flush=True)
    result = training.train(spec, args.steps, mesh=mesh, cluster=args.cluster, plan=plan, seed=args.seed,
                            log_every=10, progress=not args.no_progress)
    first, last = result.first_loss, result.last_loss
    print(f"trained {result.steps_run} steps in {result.seconds:.2f} s")
    print(f"loss {first:.2f} -> {last:.2f} ({'falling' if last < first else 'NOT falling'})")
    return 0


def _start_jax(args) -> None:
    """Fake CPU devices and (with --coordinator) jax.distributed, before JAX starts its backend."""
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("error: --coordinator needs --num-processes and --process-id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def _short_summary(plan) -> str:
    lines = []
    for line in plan.summary().splitlines():
        if not line.strip():
            break
        lines.append(line)
    return "\n".join(lines)


def train_command(args) -> int:
    _start_jax(args)
    import jax
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's informational warnings (read-only managers, ...)

    from autoplan._src import training

    try:
        shape = tuple(int(s) for s in args.mesh.lower().split("x")) if args.mesh else None
    except ValueError:
        raise training.TrainingError(f"--mesh {args.mesh!r}: give axis sizes like 8 or 2x4") from None
    main = jax.process_index() == 0
    if main:
        print(f"autoplan train: {args.model} for {args.steps} steps on {jax.device_count()} "
              f"{jax.devices()[0].platform} devices in {jax.process_count()} process(es), cluster {args.cluster}, "
              f"planner {args.planner}", flush=True)

    def planned(plan):
        if main:
            print(_short_summary(plan), flush=True)
        if args.plan_out:  # every process writes its own, so runs can check that they agree
            with open(args.plan_out.format(process=jax.process_index()), "w") as f:
                f.write(plan.to_json())

    result = training.train(
        args.model, args.steps, mesh=shape, cluster=args.cluster, planner=args.planner, ckpt_dir=args.ckpt,
        resume=args.resume, save_every=args.save_every, keep=args.keep, seed=args.seed, pool=args.pool,
        progress=not args.no_progress, log_every=args.log_every,
        on_planned=planned)
    if main:
        if result.losses:
            first, last = result.first_loss, result.last_loss
            print(f"loss {first:.4f} -> {last:.4f} over steps {min(result.losses)}..{max(result.losses)}"
                  + (f" (resumed from checkpoint {result.resumed_from})" if result.resumed_from is not None else ""))
        if args.ckpt:
            from autoplan import checkpoint

            print(f"checkpoints in {args.ckpt} (steps {checkpoint.all_steps(args.ckpt)})")
        if args.log_file:
            import json

            with open(args.log_file, "w") as f:
                json.dump({"losses": {str(k): v for k, v in sorted(result.losses.items())},
                           "resumed_from": result.resumed_from, "steps_run": result.steps_run,
                           "plan": result.plan.name}, f, indent=1)
    return 0


def plan_command(args) -> int:
    import jax

    import autoplan

    spec = autoplan.models.get(args.model)
    shape = tuple(int(s) for s in args.mesh.split("x")) if args.mesh else None
    mesh = jax.sharding.AbstractMesh(shape, ("data", "model")[-len(shape):]) if shape else None
    plan = autoplan.plan(spec.train_step, *spec.abstract_state(), spec.abstract_batch(), mesh=mesh,
                         num_devices=None if mesh else args.devices, cluster=args.cluster)
    print(plan.summary())
    if args.out:
        plan.save(args.out)
        print(f"\nsaved {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoplan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="plan a small GPT on 8 fake CPU devices, print the plan, then train it")
    d.add_argument("--model", default="gpt-tiny")
    d.add_argument("--cluster", default="a100-8x")
    d.add_argument("--steps", type=int, default=30, help="training steps after planning (default 30)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=demo)
    p = sub.add_parser("plan", help="plan a zoo model for a target cluster (abstract mesh, no hardware)")
    p.add_argument("--model", default="gpt2-12")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mesh", default=None, help="e.g. 8x8 for a (data, model) mesh")
    p.add_argument("--cluster", default="a100-8x")
    p.add_argument("--out", default=None, help="write the plan JSON here")
    p.set_defaults(func=plan_command)
    t = sub.add_parser("train", help="train a zoo model on fake CPU devices, with checkpoints and resume",
                       description="Train a zoo model with a planned step on synthetic data; checkpoint, "
                                   "resume (also onto another mesh or planner), one process or many.")
    t.add_argument("--model", default="gpt-tiny")
    t.add_argument("--steps", type=int, default=50, help="train up to this global step (default 50)")
    t.add_argument("--ckpt", default=None, help="checkpoint directory (default: no checkpoints)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt")
    t.add_argument("--save-every", type=int, default=10, help="checkpoint every M steps (and at the end)")
    t.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    t.add_argument("--devices", type=int, default=8, help="fake CPU devices (per process; default 8)")
    t.add_argument("--mesh", default=None, help="e.g. 2x4 (data x model) or 8; default 2x(N/2)")
    t.add_argument("--cluster", default="cpu")
    t.add_argument("--planner", default="autoplan",
                   help="autoplan, or a baseline: data_parallel, zero1, zero2, fsdp, megatron, megatron_dp")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--pool", type=int, default=4, help="distinct synthetic batches, cycled (default 4)")
    t.add_argument("--log-every", type=int, default=1, help="print the loss every N steps (default 1)")
    t.add_argument("--log-file", default=None, help="write the losses (full precision) as JSON here")
    t.add_argument("--plan-out", default=None,
                   help="write the plan JSON here; '{process}' is replaced by the process index")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, for multi-process runs")
    t.add_argument("--num-processes", type=int, default=None)
    t.add_argument("--process-id", type=int, default=None)
    t.set_defaults(func=train_command)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - known user errors get one clean line, the rest a traceback
        if not _is_user_error(e):
            raise
        prefix = ""
        if getattr(args, "coordinator", None):
            prefix = f"[process {args.process_id}] "
        print(f"{prefix}error: {e}", file=sys.stderr)
        _quiet_teardown()
        return 2


def _quiet_teardown() -> None:
    """After a reported error, drop what background threads (orbax's abandoned reads) print on the way out."""
    sys.stdout.flush()
    sys.stderr.flush()
    if sys.stderr is sys.__stderr__:  # a real process (the CLI), not a test capturing output
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


def _is_user_error(e: BaseException) -> bool:
    from autoplan import PlanMismatchError, PlanningError, TraceError
    from autoplan._src.checkpoint import CheckpointError
    from autoplan._src.training import TrainingError

    return isinstance(e, (CheckpointError, PlanningError, TraceError, PlanMismatchError, TrainingError))


if __name__ == "__main__":
    sys.exit(main())
