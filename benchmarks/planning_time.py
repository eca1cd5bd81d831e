"""Planning wall time for GPT-2 shapes (12/24/48 layers) on 8- and 64-device abstract meshes.

Run: python benchmarks/planning_time.py [--quick]
Writes benchmarks/results/planning_time.{csv,md} and planning_time.png.
Target (issue 2): under 10 s for 48 layers on 64 devices on a 2-core machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
import warnings

import jax

import autoplan

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = ("gpt2-12", "gpt2-24", "gpt2-48")
MESHES = {8: ((1, 8), ("data", "model")), 64: ((8, 8), ("data", "model"))}


def measure(model: str, devices: int) -> dict:
    spec = autoplan.models.get(model)
    params, opt_state = spec.abstract_state()
    batch = spec.abstract_batch()
    shape, names = MESHES[devices]
    mesh = jax.sharding.AbstractMesh(shape, names)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = autoplan.plan(spec.train_step, params, opt_state, batch, mesh=mesh, cluster="a100-8x")
    wall = time.perf_counter() - start
    cfg = spec.config
    return {"model": model, "layers": cfg.layers, "hidden": cfg.hidden, "devices": devices,
            "mesh": "x".join(map(str, shape)), "plan_seconds": round(wall, 3),
            "trace_seconds": round(plan.solver["trace_seconds"], 3),
            "build_seconds": round(plan.solver["build_seconds"], 3),
            "solve_seconds": round(plan.solver["solve_seconds"], 3), "status": plan.solver["status"],
            "ilp_variables": plan.solver["num_vars"], "ilp_edges": plan.solver["num_edges"],
            "graph_ops": len(plan.op_strategies),
            "predicted_step_ms": round(plan.cost.step_seconds * 1e3, 3),
            "predicted_memory_gib": round(plan.cost.memory_bytes / 2**30, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="only the 12-layer model")
    args = parser.parse_args()
    models = MODELS[:1] if args.quick else MODELS
    rows = []
    for model in models:
        for devices in MESHES:
            row = measure(model, devices)
            print(row, flush=True)
            rows.append(row)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "planning_time.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(RESULTS, "planning_time.md"), "w") as f:
        f.write(f"# Planning time (GPT-2 shapes, cluster a100-8x)\n\nMachine: {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores; jax {jax.__version__}. Command: `python benchmarks/planning_time.py`.\n"
                "Target: < 10 s for 48 layers on 64 devices.\n\n")
        f.write("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(v) for v in row.values()) + " |\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for devices in MESHES:
            pts = [(r["layers"], r["plan_seconds"]) for r in rows if r["devices"] == devices]
            ax.plot(*zip(*pts), marker="o", label=f"{devices} devices")
        ax.axhline(10, color="grey", ls="--", label="target 10 s")
        ax.set_xlabel("layers (GPT-2 12/24/48 shapes)")
        ax.set_ylabel("planning wall time (s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "planning_time.png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
