"""Pipeline planning on a slow-link cluster, predicted and priced from compiled HLO.

Three programs per cluster for one GPT training step (Adam), 8 devices in nodes of 4:

* the planner's choice: `autoplan.plan(..., microbatches=4)`, the stage DP choosing stages, submeshes,
  logical meshes and the schedule (1F1B or GPipe, whichever is cheaper as the runtime runs it; B is
  pinned: searching it too multiplies planning time by 5);
* the best non-pipelined plan: the intra-operator ILP over every (data, model) mesh, no microbatches;
* a Megatron-style hand pipeline: 2 stages of equal layers, 1F1B, 4 microbatches, data parallel over
  the 4 devices of each stage.

"predicted" is the cost model's step (pipelines: the schedule's ticks in lock step, the sends and the
residual-slot copies around each tick, `inter.lockstep_parts`, as the planner prices its own, and their
optimizer update; the gradient
accumulation at device memory bandwidth, `inter.update_parts`; a one-stage loop planned with its
update; packing unpriced); "priced"
is the same alpha-beta / roofline model applied to the programs XLA compiled: the pipelines' packing,
tick loops (each tick as long as its slowest stage's branch, picked by the schedule's task table, plus
the point-to-point sends and stash updates of its loop),
exchange and updates (`staging.priced_step`), the non-pipelined program's `hlo.compiled_report`.
Clusters: "slow-link" (inter-node bandwidth 100x below intra-node) and "equal-link".  Writes
benchmarks/results/pipeline.{csv,md}, the chosen schedule as pipeline_schedule.{txt,png}.

    PYTHONPATH=$PWD python benchmarks/pipeline.py
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time

import jax

import autoplan
from autoplan._src import emit
from autoplan._src import hlo
from autoplan._src import inter
from autoplan._src import pipeline as pl
from autoplan._src import staging
from autoplan._src import trace

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CLUSTERS = {
    "slow-link": autoplan.Cluster(name="slow-link", device_flops=312e12, device_memory=80e9, devices_per_node=4,
                                  intra_node_bandwidth=300e9, inter_node_bandwidth=3e9, latency=10e-6),
    "equal-link": autoplan.Cluster(name="equal-link", device_flops=312e12, device_memory=80e9, devices_per_node=4,
                                   intra_node_bandwidth=300e9, inter_node_bandwidth=300e9, latency=10e-6),
}
MODEL = "gpt-small"
OVERRIDES = dict(layers=8, hidden=768, heads=12, seq_len=512, vocab_size=32768, batch=32)
DEVICES = 8
MICROBATCHES = 4  # pinned for every plan here: the stage DP over B as well takes 5x longer to plan


HEADINGS = {"microbatches": "B", "predicted_ms": "predicted (ms)", "priced_ms": "priced from HLO (ms)",
            "plan_seconds": "planning (s)"}


def write_results(name: str, intro: str, rows: list[dict]) -> None:
    """benchmarks/results/<name>.csv with ``rows``, and <name>.md: ``intro`` and a table of them."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(rows[0])
    lines = [intro, "", "| " + " | ".join(HEADINGS.get(c, c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if c.endswith("_ms") and row[c] != "" else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _mesh(axes: dict) -> jax.sharding.Mesh:
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def layout(plan) -> str:
    """Each stage's layers and mesh; a one-stage plan's mesh."""
    if len(plan.stages) <= 1:
        return str(plan.mesh.as_dict())
    return " / ".join(f"{'+'.join(s.layers)} @ {s.mesh.as_dict()}" for s in plan.stages)


def schedule_label(choice) -> str:
    """The schedule a plan or runner-up runs; a one-stage one runs none."""
    return choice.schedule if len(choice.stages) > 1 else "no pipeline"


def priced_plan(plan, spec, args, graph) -> float:
    """Seconds per step of the program `autoparallel` runs for ``plan``, priced from its compiled HLO."""
    mesh = emit.device_mesh(plan.mesh)
    if len(plan.stages) > 1:
        program = staging.emit_staged(plan, spec.train_step, graph, mesh)
        sched = pl.schedule(plan.schedule, stages=len(plan.stages), microbatches=plan.microbatches)
        return staging.priced_step(program.lower(*args).compile(), sched, mesh, plan.cluster)["step"]
    if plan.microbatches > 1:
        program = pl.emit_accumulated(plan, spec.train_step, graph, mesh)
    else:
        program = emit.emit(plan, graph, mesh)
    return hlo.compiled_report(program.lower(*args).compile(), mesh, plan.cluster).step_seconds


def _hand_pipeline(spec, args, cluster, microbatches: int):
    """Megatron-style: two stages of equal layers, 1F1B, data parallel inside each stage; (predicted,
    priced) seconds."""
    names = trace._argument_names(spec.train_step, 3)
    cost = inter.GraphStageCosts(lambda b: trace.trace(spec.train_step, *pl.microbatch_shapes(args, 2, b, names)),
                                 cluster)
    cost.total_devices = DEVICES
    units = cost.units(microbatches)
    bounds = pl.even_bounds(len(units), 2)
    data_parallel = lambda i, j, d, b: [o for o in cost(i, j, d, b) if o.mesh.axis_size("model") == 1]  # noqa: E731
    predicted = inter.evaluate_layout(data_parallel, bounds, [DEVICES // 2] * 2, microbatches,
                                      layer_names=["+".join(u) for u in units])
    mesh = _mesh({"stage": 2, "data": DEVICES // 2})
    sched = pl.schedule("1f1b", stages=2, microbatches=microbatches)
    graph = trace.trace(spec.train_step, *args)
    batch = set(range(len(graph.input_ops) - len(jax.tree_util.tree_leaves(args[2])), len(graph.input_ops)))
    in_specs = [jax.sharding.PartitionSpec("data") if i in batch else jax.sharding.PartitionSpec()
                for i in range(len(graph.input_ops))]
    staged = staging.StagedStep(spec.train_step, sched, mesh, bounds, in_specs=in_specs, data_axes=("data",))
    # Priced as the planner prices its own pipelines: the runtime's ticks in lock step, its sends and
    # per-tick copies, the update and the gradient accumulation.
    runtime = staged.runtime_cost(*args)
    parts = inter.lockstep_parts(predicted, [[s.seconds] for s in predicted.stages], runtime.p2p_bytes, cluster,
                                 copy_bytes=runtime.tick_copy_bytes)
    parts |= inter.update_parts(predicted, inter._stage_options(predicted, cost), cluster)
    predicted = dataclasses.replace(predicted, step_seconds=sum(parts.values()))
    compiled = staging.StagedCompiled(programs=staged.compile(*args))
    return predicted, staging.priced_step(compiled, sched, mesh, cluster)["step"]


def _schedule_picture(sched, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, sched.num_ticks * 0.45), 0.6 * sched.num_stages + 1))
    for task in sched.tasks:
        forward = task.kind == pl.FORWARD
        ax.add_patch(plt.Rectangle((task.tick, task.stage), 1, 1, facecolor="#4c72b0" if forward else "#dd8452",
                                   edgecolor="white"))
        ax.text(task.tick + 0.5, task.stage + 0.5, str(task.microbatch), ha="center", va="center", color="white",
                fontsize=8)
    ax.set_xlim(0, sched.num_ticks)
    ax.set_ylim(sched.num_stages, 0)
    ax.set_xlabel("tick")
    ax.set_ylabel("stage")
    ax.set_yticks([s + 0.5 for s in range(sched.num_stages)], [str(s) for s in range(sched.num_stages)])
    ax.set_title(f"{sched.name}: {sched.num_stages} stages, {sched.num_microbatches} microbatches\n"
                 "blue forward, orange backward; numbers are microbatches", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_schedule(sched) -> None:
    with open(os.path.join(RESULTS, "pipeline_schedule.txt"), "w") as f:
        f.write(str(sched) + "\n")
    _schedule_picture(sched, os.path.join(RESULTS, "pipeline_schedule.png"))


def main() -> None:
    spec = autoplan.models.get(MODEL, **OVERRIDES)
    params, opt_state = spec.abstract_state()
    args = (params, opt_state, spec.abstract_batch())
    graph = trace.trace(spec.train_step, *args)
    rows = []
    os.makedirs(RESULTS, exist_ok=True)
    for name, cluster in CLUSTERS.items():
        start = time.perf_counter()
        chosen = autoplan.plan(spec.train_step, *args, num_devices=DEVICES, cluster=cluster,
                               microbatches=MICROBATCHES)
        plan_seconds = time.perf_counter() - start
        print(chosen.summary().split("\n\nInputs")[0], flush=True)
        flat = autoplan.plan(spec.train_step, *args, num_devices=DEVICES, cluster=cluster)
        b = MICROBATCHES
        hand, hand_priced = _hand_pipeline(spec, args, cluster, b)
        rows.append(dict(cluster=name, plan=f"chosen (stage DP, {schedule_label(chosen)})",
                         stages=len(chosen.stages), microbatches=chosen.microbatches,
                         predicted_ms=1e3 * chosen.cost.step_seconds,
                         priced_ms=1e3 * priced_plan(chosen, spec, args, graph), layout=layout(chosen),
                         plan_seconds=round(plan_seconds, 1)))
        rows.append(dict(cluster=name, plan="best non-pipelined", stages=1, microbatches=1,
                         predicted_ms=1e3 * flat.cost.step_seconds,
                         priced_ms=1e3 * priced_plan(flat, spec, args, graph),
                         layout=layout(flat), plan_seconds=""))
        rows.append(dict(cluster=name, plan="hand 1F1B, equal layers, data parallel stages", stages=2, microbatches=b,
                         predicted_ms=1e3 * hand.step_seconds, priced_ms=1e3 * hand_priced, layout=layout(hand),
                         plan_seconds=""))
        for alt in chosen.alternatives:
            rows.append(dict(cluster=name, plan=f"runner-up ({schedule_label(alt)})", stages=len(alt.stages),
                             microbatches=alt.microbatches, predicted_ms=1e3 * alt.step_seconds, priced_ms="",
                             layout=alt.describe(), plan_seconds=""))
        if name == "slow-link":  # the chosen pipeline's schedule, or the hand pipeline's if none is chosen
            _write_schedule(pl.schedule(chosen.schedule, stages=len(chosen.stages), microbatches=chosen.microbatches)
                            if len(chosen.stages) > 1 else pl.schedule("1f1b", stages=2, microbatches=b))
    write_results("pipeline", f"{MODEL} {OVERRIDES} (Adam) on {DEVICES} devices in nodes of 4. predicted: the cost "
                  "model's step (pipelines: ticks in lock step + sends + the residual-slot copies of each tick, as the "
                  "runtime runs them, and the update; "
                  "all: gradient accumulation at memory bandwidth; one stage: the loop planned with its update; "
                  "packing unpriced); priced: the same cluster "
                  "model applied to the programs XLA compiled "
                  "(pipelines: packing + ticks, each as long as its slowest stage's branch, + the tick loops' "
                  "sends and stash updates + exchange + updates). Planning time on this machine's 2 CPU cores.",
                  rows)


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", DEVICES)
    main()
