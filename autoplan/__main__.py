"""Command line: ``python -m autoplan demo`` plans a small GPT on 8 fake CPU devices.

``python -m autoplan plan --model gpt2-48 --devices 64 --cluster a100-8x`` plans any
zoo model for a target cluster over an abstract mesh, without the hardware.
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
    d = sub.add_parser("demo", help="plan a small GPT on 8 fake CPU devices and print the plan")
    d.add_argument("--model", default="gpt-tiny")
    d.add_argument("--cluster", default="a100-8x")
    d.set_defaults(func=demo)
    p = sub.add_parser("plan", help="plan a zoo model for a target cluster (abstract mesh, no hardware)")
    p.add_argument("--model", default="gpt2-12")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mesh", default=None, help="e.g. 8x8 for a (data, model) mesh")
    p.add_argument("--cluster", default="a100-8x")
    p.add_argument("--out", default=None, help="write the plan JSON here")
    p.set_defaults(func=plan_command)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
