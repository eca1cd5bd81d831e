"""Pipeline planning on a slow-link cluster: the stage DP's plan (stages, submeshes, logical meshes and
microbatches B in 1, 2, 4, 8 all chosen) vs the best non-pipelined plan (intra-operator ILP over every
(data, model) mesh, no microbatches) vs a Megatron-style hand pipeline (2 stages of equal layers, 1F1B,
4 microbatches).

Two clusters of 8 devices in nodes of 4: "slow-link" (inter-node bandwidth 100x below intra-node) and
"equal-link" (the same bandwidth everywhere).  All figures are the cost model's predictions (not yet
priced from compiled HLO); pipeline figures leave out the optimizer update, the non-pipelined plan's
include it.  Writes benchmarks/results/pipeline.{csv,md} and the chosen schedule as
benchmarks/results/pipeline_schedule.txt.

    PYTHONPATH=$PWD python benchmarks/pipeline.py
"""

from __future__ import annotations

import csv
import os
import time

import jax

import autoplan
from autoplan._src import inter
from autoplan._src import pipeline as pl
from autoplan._src import trace

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CLUSTERS = {
    "slow-link": autoplan.Cluster(name="slow-link", device_flops=312e12, device_memory=80e9, devices_per_node=4,
                                  intra_node_bandwidth=300e9, inter_node_bandwidth=3e9, latency=10e-6),
    "equal-link": autoplan.Cluster(name="equal-link", device_flops=312e12, device_memory=80e9, devices_per_node=4,
                                   intra_node_bandwidth=300e9, inter_node_bandwidth=300e9, latency=10e-6),
}
MODEL = dict(layers=4, hidden=256, heads=4, seq_len=128, vocab_size=8192, batch=8)
DEVICES = 8
MICROBATCHES = 4


def main() -> None:
    spec = autoplan.models.get("gpt-small", **MODEL)
    params, opt_state = spec.abstract_state()
    batch = spec.abstract_batch()
    args = (params, opt_state, batch)
    rows = []
    for name, cluster in CLUSTERS.items():
        start = time.perf_counter()
        chosen = autoplan.plan(spec.train_step, *args, num_devices=DEVICES, cluster=cluster, schedule="1f1b")
        plan_seconds = time.perf_counter() - start
        flat = autoplan.plan(spec.train_step, *args, num_devices=DEVICES, cluster=cluster)
        names = trace._argument_names(spec.train_step, 3)
        cost = inter.GraphStageCosts(
            lambda b: trace.trace(spec.train_step, *pl.microbatch_shapes(args, 2, b, names)), cluster)
        cost.total_devices = DEVICES
        units = cost.units(MICROBATCHES)
        half = len(units) // 2
        hand = inter.evaluate_layout(cost, [(0, half), (half, len(units))], [DEVICES // 2] * 2, MICROBATCHES,
                                     layer_names=["+".join(u) for u in units])
        rows.append(dict(cluster=name, plan="chosen (stage DP)", stages=len(chosen.stages),
                         microbatches=chosen.microbatches, step_ms=1e3 * chosen.cost.step_seconds,
                         layout=" | ".join(f"{'+'.join(s.layers)}@{s.mesh.as_dict()}" for s in chosen.stages),
                         plan_seconds=plan_seconds))
        rows.append(dict(cluster=name, plan="best non-pipelined", stages=1, microbatches=1,
                         step_ms=1e3 * flat.cost.step_seconds, layout=str(flat.mesh.as_dict()), plan_seconds=""))
        rows.append(dict(cluster=name, plan="hand 1F1B, equal layers", stages=2, microbatches=MICROBATCHES,
                         step_ms=1e3 * hand.step_seconds,
                         layout=" | ".join(f"{'+'.join(s.layers)}@{s.mesh.as_dict()}" for s in hand.stages),
                         plan_seconds=""))
        for alt in chosen.alternatives:
            rows.append(dict(cluster=name, plan="runner-up", stages=len(alt.stages), microbatches=alt.microbatches,
                             step_ms=1e3 * alt.step_seconds, layout=alt.describe(), plan_seconds=""))
        print(chosen.summary().split("\n\nInputs")[0], flush=True)
        if name == "slow-link" and len(chosen.stages) > 1:
            with open(os.path.join(RESULTS, "pipeline_schedule.txt"), "w") as f:
                f.write(str(pl.schedule("1f1b", stages=len(chosen.stages), microbatches=chosen.microbatches)) + "\n")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "pipeline.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(RESULTS, "pipeline.md"), "w") as f:
        f.write(f"GPT {MODEL} on {DEVICES} devices, nodes of 4; hand pipeline with {MICROBATCHES} microbatches "
                "(predicted by the cost model). Caveat: pipeline steps (chosen, hand, runner-ups) price forward + "
                "backward per microbatch and leave out the once-per-step optimizer update; the non-pipelined "
                "plan's step includes it.\n\n| cluster | plan | stages | B | step (ms) | layout |\n"
                "|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['cluster']} | {r['plan']} | {r['stages']} | {r['microbatches']} | {r['step_ms']:.3f} | "
                    f"{r['layout']} |\n")
    print(open(os.path.join(RESULTS, "pipeline.md")).read())


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    main()
