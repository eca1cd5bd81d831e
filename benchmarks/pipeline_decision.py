"""When to pipeline: the planner's choice on slow and on equal inter-node links, predicted and priced
from the compiled HLO.

The decision test's setting (`tests/test_inter.py::test_pipelines_across_slow_nodes_only`): a GPT
(4 layers, d=256, seq 32, vocab 512, batch 64, Adam) on 4 devices in nodes of 2 at 2.5 TF/s, inter-node
links 100x below intra-node ("slow") or equal, 4 microbatches.  Per cluster: the planner's choice
(stages, schedule and meshes its own), its runner-ups as it prices them, and three pinned plans compiled
and priced from their HLO by the same cluster model (`pipeline.priced_plan`): the best one-stage plan
and the best 2-stage plans under GPipe and 1F1B.  Writes benchmarks/results/pipeline_decision.{csv,md}.

    PYTHONPATH=$PWD python benchmarks/pipeline_decision.py
"""

from __future__ import annotations

import time

import jax

import autoplan
from autoplan._src import trace

DEVICES = 4
MICROBATCHES = 4
OVERRIDES = dict(layers=4, hidden=256, seq_len=32, vocab_size=512, batch=64)


def _cluster(name: str, inter_node_bandwidth: float) -> autoplan.Cluster:
    return autoplan.Cluster(name=name, device_flops=2.5e12, device_memory=80e9, devices_per_node=2,
                            intra_node_bandwidth=300e9, inter_node_bandwidth=inter_node_bandwidth, latency=10e-6)


def main() -> None:
    from pipeline import layout
    from pipeline import priced_plan
    from pipeline import schedule_label
    from pipeline import write_results

    spec = autoplan.models.get("gpt-tiny", **OVERRIDES)
    params, opt_state = spec.abstract_state()
    args = (params, opt_state, spec.abstract_batch())
    graph = trace.trace(spec.train_step, *args)
    rows = []
    for name, bandwidth in (("slow", 3e9), ("equal", 300e9)):
        cluster = _cluster(name, bandwidth)
        start = time.perf_counter()
        chosen = autoplan.plan(spec.train_step, *args, num_devices=DEVICES, cluster=cluster, microbatches=MICROBATCHES)
        seconds = time.perf_counter() - start
        rows.append(dict(cluster=name, plan=f"chosen ({schedule_label(chosen)})", stages=len(chosen.stages),
                         predicted_ms=1e3 * chosen.cost.step_seconds, priced_ms="", layout=layout(chosen),
                         plan_seconds=round(seconds, 1)))
        for alt in chosen.alternatives:
            rows.append(dict(cluster=name, plan=f"runner-up ({schedule_label(alt)})",
                             stages=len(alt.stages), predicted_ms=1e3 * alt.step_seconds, priced_ms="",
                             layout=alt.describe(), plan_seconds=""))
        for stages, schedule in ((1, None), (2, "gpipe"), (2, "1f1b")):
            pinned = autoplan.plan(spec.train_step, *args, num_devices=DEVICES, cluster=cluster, stages=stages,
                                   schedule=schedule, microbatches=MICROBATCHES)
            rows.append(dict(cluster=name, plan=f"pinned: {stages} stage(s), {schedule or 'no pipeline'}",
                             stages=stages, predicted_ms=1e3 * pinned.cost.step_seconds,
                             priced_ms=1e3 * priced_plan(pinned, spec, args, graph), layout=layout(pinned),
                             plan_seconds=""))
            print(rows[-1], flush=True)
    write_results("pipeline_decision", f"gpt-tiny {OVERRIDES} (Adam), {MICROBATCHES} microbatches, on {DEVICES} "
                  "devices in nodes of 2 at 2.5 TF/s; inter-node 3 GB/s (slow) or 300 GB/s (equal). predicted: "
                  "the planner's cost model (pipelines as the runtime runs them; their update and all gradient "
                  "accumulation at memory bandwidth; one stage: the loop planned with its update; packing unpriced); "
                  "priced: the same cluster model on the programs XLA compiled (pipelines: packing + tick loops + "
                  "exchange + updates). Planning time on this machine's 2 CPU cores.", rows)


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", DEVICES)
    main()
