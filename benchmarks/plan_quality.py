"""Plan quality: autoplan's plans against hand strategies and the manual baselines, priced from compiled HLO.

For every benchmark workload (model x mesh x cluster) this compiles

* autoplan's own program (`autoplan.autoparallel`);
* every hand strategy of ``benchmarks/hand.py`` (data parallel, FSDP, Megatron, DP x TP, FSDP x TP,
  expert parallel) as a user writes it: plain ``jax.jit(step, in_shardings=..., out_shardings=...)``,
  no autoplan code in the path (rows ``hand:<strategy>``);
* the same hand input specs pinned and planned/emitted by autoplan (rows ``pinned:<strategy>``), so the
  emitter's overhead over plain jit with the same inputs is visible;
* every baseline of `autoplan.baselines.ALL` through the same emitter (`autoplan.autoparallel(...,
  planner=...)`);

reads each optimized HLO with `autoplan._src.hlo.compiled_report` (one yardstick for all programs) and
compares:

* plan quality: autoplan's compiled step time over the best hand strategy's (``ratio``, target <= 1.00)
  and over the best emitted baseline's (``ratio_baseline``), and whether autoplan's compiled memory fits;
* honest predictions: the plan's predicted memory, communication bytes and
  step time against the compiled ones (relative error, signed:
  (predicted - compiled) / compiled).

Reduce-scatters: XLA's SPMD partitioner writes a reduce-scatter as an
all-reduce whose users keep one ``partition-id`` slice; the GPU pipeline
rewrites that into a reduce-scatter (ReduceScatterCreator), the CPU pipeline
does not, which doubles those bytes in CPU HLO.  The step and communication
figures price such all-reduce elements as the reduce-scatters an a100/h100
build runs (for autoplan and the baselines alike); the HLO as is, is kept in
the ``*_hlo`` columns.  ``--mock-gpus`` compiles for 8 mock H100s
(``jax_mock_gpu_topology``) on a machine with one GPU, where XLA:GPU's own
reduce-scatters are read directly.

Diagnostics per plan: XLA's SPMD "involuntary full rematerialization"
warnings (reshards XLA could only do by replicating a tensor).
``--dump-hlo DIR`` also writes each compiled HLO, plan summary with the
predicted collectives, and XLA warnings, for finding where plan and program part.

Workloads: ``--suite zoo`` (autoplan's zoo: gpt/moe/wresnet/mlp-small), ``--suite wide`` (code we did
not write, ``benchmarks/workloads.py`` at benchmark size: Flax MHA GPT, DenseGeneral/Einsum T5, einsum
MoE, GroupNorm WRN, wide MLP, Hugging Face GPT-2/BERT/GPT-Neo/Llama/Mistral/T5/ViT), ``--suite all``.

Run: python benchmarks/plan_quality.py [--suite zoo|wide|all] [--models gpt-small,hf-gpt2-bench,...]
                                       [--meshes 8,2x4,4x2] [--clusters a100-8x,a100-4x] [--quick]
                                       [--no-pinned] [--dump-hlo DIR] [--mock-gpus]
Writes benchmarks/results/plan_quality.{csv,md,png} (one row per workload) and
plan_quality_all.csv (one row per program: autoplan, every baseline, hand and pinned
strategy); ``--suite wide`` writes plan_quality_wide.* and ``--suite all`` plan_quality_zoo_wide.*;
with --mock-gpus, plan_quality_gpu*.  Results so far are
rewritten after every row, so an interrupted sweep keeps its rows.  On 8 fake CPU devices
by default; nothing executes, programs are only compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import jax

if __name__ == "__main__":  # before the backend starts; the tests' conftest does the same
    if "--mock-gpus" in sys.argv:  # 8 GPUs for the compiler on a one-GPU machine (compile only)
        jax.config.update("jax_mock_gpu_topology", "1x8x1")
    else:
        jax.config.update("jax_num_cpu_devices", 8)

import numpy as np

import autoplan
from autoplan._src import hlo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hand  # noqa: E402  (benchmarks/hand.py: plain-jit hand strategies)
import workloads  # noqa: E402  (benchmarks/workloads.py: the wider suite)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = ("gpt-small", "moe-small", "wresnet-small", "mlp-small")  # the zoo suite
WIDE = tuple(f"{name}-bench" for name in workloads.SUITE)  # the wider suite
SUITES = {"zoo": MODELS, "wide": WIDE, "all": MODELS + WIDE}
MESHES = ("8", "2x4", "4x2")
CLUSTERS = ("a100-8x", "a100-4x")
QUICK = {"zoo": ("mlp-small", "gpt-small"), "wide": ("wide-mlp-bench", "hf-gpt2-bench"),
         "meshes": ("2x4",), "clusters": ("a100-8x",)}
QUICK["all"] = QUICK["zoo"] + QUICK["wide"]
HAND = "hand:"  # plain jax.jit with a hand strategy's specs
PINNED = "pinned:"  # the same input specs, planned and emitted by autoplan
TARGET_RATIO = 1.00
RATIO_SLACK = 5e-4  # ratios are compared as printed (3 decimals): programs that differ by a few flops tie
ERROR_THRESHOLD = 0.20  # prediction errors above this are flagged in the summary
AUTOPLAN = "autoplan"

# Summary row (one per workload).  Times in ms, memory in GiB, communication in MB (1e6 bytes).
SUMMARY_FIELDS = (
    "model", "mesh", "cluster", "autoplan_step_ms", "best_hand", "best_hand_step_ms", "ratio",
    "meets_target", "hlo_best_hand", "ratio_hlo", "best_baseline", "best_baseline_step_ms", "ratio_baseline",
    "worst_pinned", "worst_pinned_ratio", "worst_pinned_comm_ratio",
    "autoplan_memory_gib", "xla_peak_gib", "device_memory_gib", "fits",
    "predicted_memory_gib", "memory_rel_err", "memory_rel_err_xla_peak",
    "predicted_comm_mb", "compiled_comm_mb", "comm_rel_err", "hlo_comm_mb", "comm_rel_err_hlo",
    "predicted_step_ms", "step_rel_err", "predicted_collectives", "compiled_collectives", "xla_remat_warnings",
    "plan_seconds", "compile_seconds", "baselines_failed", "hand_skipped")

# Long-format row (one per plan).
ALL_FIELDS = (
    "model", "mesh", "cluster", "planner", "status", "error", "plan_seconds", "compile_seconds",
    "predicted_step_seconds", "predicted_compute_seconds", "predicted_communication_seconds",
    "predicted_communication_bytes", "predicted_memory_bytes", "predicted_collectives",
    "step_seconds", "compute_seconds", "communication_seconds", "communication_bytes", "memory_bytes",
    "flops", "bytes_accessed", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
    "generated_code_bytes", "compiled_collectives", "compiled_collective_elements",
    "compiled_all_reduce", "compiled_all_gather", "compiled_reduce_scatter", "compiled_all_to_all",
    "compiled_collective_permute", "memory_upper_bytes", "all_reduce_sliced_bytes",
    "hlo_communication_seconds", "hlo_communication_bytes", "hlo_step_seconds",
    "xla_remat_warnings", "device_memory_bytes", "fits", "step_ratio_to_autoplan", "step_ratio_to_hand",
    "comm_ratio_to_hand")


# ----------------------------------------------------------------------------- workloads


def parse_mesh(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """"8" -> ((8,), ("data",)); "2x4" -> ((2, 4), ("data", "model"))."""
    shape = tuple(int(s) for s in text.lower().split("x"))
    names = {1: ("data",), 2: ("data", "model"), 3: ("pipe", "data", "model")}.get(len(shape))
    if names is None:
        raise ValueError(f"mesh {text!r}: expected 1 to 3 axes like 8, 2x4 or 2x2x2")
    return shape, names


def mesh_label(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def get_cluster(name: str) -> autoplan.Cluster:
    """A preset, or "<preset>-<k>x"-style variants: "a100-4x" is a100-8x with 4 devices per node."""
    if name in autoplan.clusters:
        return autoplan.clusters[name]
    family, _, per_node = name.rpartition("-")
    for preset_name, preset in autoplan.clusters.items():
        if preset_name.rpartition("-")[0] == family and per_node.endswith("x") and per_node[:-1].isdigit():
            return dataclasses.replace(preset, name=name, devices_per_node=int(per_node[:-1]))
    raise ValueError(f"unknown cluster {name!r}; presets: {sorted(autoplan.clusters)} or e.g. 'a100-4x'")


def device_mesh(shape: Sequence[int], names: Sequence[str]) -> jax.sharding.Mesh:
    """Devices in id order, so that HLO device ids are row-major mesh positions."""
    n = math.prod(shape)
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(f"mesh {mesh_label(shape)} needs {n} devices, jax has {len(devices)}; "
                           "set jax.config.update('jax_num_cpu_devices', 8) before the backend starts")
    return jax.sharding.Mesh(np.array(devices[:n]).reshape(shape), tuple(names))


def planners_for(names: Sequence[str], *, hand_strategies: bool = True, pinned: bool = True,
                 baselines: bool = True) -> list[str]:
    """autoplan, the baselines, the hand strategies (plain jit) and the same specs pinned through autoplan.

    megatron_dp on a one-axis mesh is megatron (no data axis left): skipped.  Hand strategies that do not
    apply to a model or mesh are measured as rows with status "skipped" and the reason.
    """
    out = [AUTOPLAN]
    for b in autoplan.baselines.ALL if baselines else ():
        if b == "megatron_dp" and len(names) < 2:
            continue
        out.append(b)
    if hand_strategies:
        out += [HAND + s for s in hand.STRATEGIES]
        if pinned:
            out += [PINNED + s for s in hand.STRATEGIES]
    return out


def get_workload(name: str):
    """A zoo model (`autoplan.models.get`) or a wider-suite workload (`workloads.get`, e.g. "hf-gpt2-bench")."""
    if workloads.is_workload(name):
        return workloads.get(name)
    return autoplan.models.get(name)


def pinned_planner(strategy: str):
    """An autoplan planner that pins every input to the hand strategy's spec and plans the rest (ILP)."""

    def planner(fn, *args, mesh=None, cluster=None, static_argnums=()):
        in_specs, _ = hand.shardings(strategy, fn, args, mesh)
        plan = autoplan.plan(fn, *args, mesh=mesh, cluster=cluster, static_argnums=static_argnums,
                             in_shardings=in_specs)
        return dataclasses.replace(plan, name=PINNED + strategy)

    return planner


# ----------------------------------------------------------------------------- measuring one plan


_REMAT = "Involuntary full rematerialization"


@contextlib.contextmanager
def capture_native_stderr():
    """Collect what native code (XLA's C++ logging) writes to fd 2 meanwhile; yields a list that gets the text."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def _split_xla_log(text: str) -> tuple[list[str], str]:
    """(SPMD 'involuntary full rematerialization' warnings, everything else)."""
    remat, rest = [], []
    for line in text.splitlines():
        (remat if _REMAT in line else rest).append(line)
    return remat, "\n".join(rest)


_HAND_COMPILED: dict = {}  # (model, mesh, strategy) -> (compiled, XLA log, lower seconds, compile seconds)


def measure_plan(spec, mesh: jax.sharding.Mesh, cluster: autoplan.Cluster, planner: str,
                 dump_dir: str | None = None) -> dict:
    """Plan (+ emit + lower) and compile one planner's program; price it with `compiled_report`."""
    params, opt_state = spec.abstract_state()
    batch = spec.abstract_batch()
    args = (params, opt_state, batch)
    row: dict = {"planner": planner, "status": "ok", "error": ""}
    plan = None
    try:
        start = time.perf_counter()
        if planner.startswith(HAND):
            strategy = planner[len(HAND):]
            reason = hand.applicable(strategy, spec.train_step, args, mesh)
            if reason:
                return row | {"status": "skipped", "error": reason}
            key = (spec.name, mesh_label(mesh.devices.shape), strategy)
            if key not in _HAND_COMPILED:  # plain jit does not depend on the cluster: compile once, price per cluster
                lowered = hand.jit(strategy, spec.train_step, args, mesh).lower(*args)
                plan_seconds = time.perf_counter() - start
                start = time.perf_counter()
                with capture_native_stderr() as log:
                    compiled = lowered.compile()
                _HAND_COMPILED[key] = (compiled, log[0], plan_seconds, time.perf_counter() - start)
            lowered = None
        else:
            if planner.startswith(PINNED):
                reason = hand.applicable(planner[len(PINNED):], spec.train_step, args, mesh)
                if reason:
                    return row | {"status": "skipped", "error": reason}
                fn = pinned_planner(planner[len(PINNED):])
            else:
                fn = None if planner == AUTOPLAN else getattr(autoplan.baselines, planner)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = autoplan.autoparallel(spec.train_step, mesh=mesh, cluster=cluster, planner=fn)
                lowered = step.lower(*args)
        if lowered is None:
            compiled, log_text, row["plan_seconds"], row["compile_seconds"] = _HAND_COMPILED[key]
        else:
            row["plan_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            with capture_native_stderr() as log:
                compiled = lowered.compile()
            row["compile_seconds"] = time.perf_counter() - start
            log_text = log[0]
        remat, other = _split_xla_log(log_text)
        if other.strip():
            print(other, file=sys.stderr)
        if not planner.startswith(HAND):
            plan = step.plan
        report = hlo.compiled_report(compiled, mesh, cluster)
        text = compiled.as_text()
    except Exception as e:  # noqa: BLE001 - a failing baseline is a result, not a crash
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return row
    sliced = hlo.sliced_all_reduces(text, report.collectives)
    gpu = hlo.with_reduce_scatters(report, sliced, mesh, cluster)
    rs_seconds, rs_bytes = gpu.communication_seconds, gpu.communication_bytes
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        stem = os.path.join(dump_dir, f"{spec.name}_{mesh_label(mesh.devices.shape)}_{cluster.name}_{planner}")
        with open(stem + ".hlo.txt", "w") as f:
            f.write(text)
        with open(stem + ".xla_warnings.txt", "w") as f:
            f.write("\n".join(remat))
        with open(stem + ".plan.txt", "w") as f:
            if plan is None:
                f.write("plain jax.jit, hand strategy\n")
                plan_collectives = ()
            else:
                f.write(plan.summary(max_rows=1000))
                plan_collectives = plan.collectives
            f.write("\n\nPredicted collectives:\n")
            for c in plan_collectives:
                f.write(f"{c.where}\t{c.op}\t{c.kind}\t{','.join(c.axes)}\t{c.nbytes:.0f}\t{c.wire_bytes:.0f}"
                        f"\t{c.seconds:.3e}\n")
    instructions = {(c.computation, c.name): c.kind for c in report.collectives}
    kinds = Counter(instructions.values())
    upper = report.argument_bytes + report.output_bytes + report.temp_bytes - report.alias_bytes
    if plan is not None:
        cost = plan.cost
        row.update(
            predicted_step_seconds=cost.step_seconds, predicted_compute_seconds=cost.compute_seconds,
            predicted_communication_seconds=cost.communication_seconds,
            predicted_communication_bytes=cost.communication_bytes, predicted_memory_bytes=cost.memory_bytes,
            predicted_collectives=len(plan.collectives))
    row.update(
        step_seconds=report.compute_seconds + rs_seconds, compute_seconds=report.compute_seconds,
        communication_seconds=rs_seconds, communication_bytes=rs_bytes,
        memory_bytes=report.memory_bytes, flops=report.flops, bytes_accessed=report.bytes_accessed,
        argument_bytes=report.argument_bytes, output_bytes=report.output_bytes, temp_bytes=report.temp_bytes,
        alias_bytes=report.alias_bytes, generated_code_bytes=report.generated_code_bytes,
        compiled_collectives=len(instructions), compiled_collective_elements=len(report.collectives),
        compiled_all_reduce=kinds["all-reduce"], compiled_all_gather=kinds["all-gather"],
        compiled_reduce_scatter=kinds["reduce-scatter"], compiled_all_to_all=kinds["all-to-all"],
        compiled_collective_permute=kinds["collective-permute"],
        memory_upper_bytes=upper,
        all_reduce_sliced_bytes=float(sum(c.nbytes for c in report.collectives
                                          if (c.computation, c.name, c.index) in sliced)),
        hlo_communication_seconds=report.communication_seconds, hlo_communication_bytes=report.communication_bytes,
        hlo_step_seconds=report.step_seconds,
        xla_remat_warnings=len(remat),
        device_memory_bytes=cluster.device_memory, fits=max(report.memory_bytes, upper) <= cluster.device_memory)
    return row


def rel_err(predicted: float, compiled: float) -> float:
    """(predicted - compiled) / compiled; 0 when both are 0, inf when only compiled is 0."""
    if compiled == 0:
        return 0.0 if predicted == 0 else math.inf
    return (predicted - compiled) / compiled


def _best(rows: Sequence[dict], key: str = "step_seconds") -> dict | None:
    return min(rows, key=lambda p: p[key]) if rows else None


def summarize(model: str, mesh: str, cluster: autoplan.Cluster, plans: Sequence[dict]) -> dict:
    """The workload's summary row from its per-plan rows (first is autoplan)."""
    auto = plans[0]
    ok = [p for p in plans[1:] if p["status"] == "ok"]
    hands = [p for p in ok if p["planner"].startswith(HAND)]
    baselines = [p for p in ok if not p["planner"].startswith((HAND, PINNED))]
    failed = [p["planner"] for p in plans[1:] if p["status"] == "error"]
    skipped = [p["planner"] for p in plans[1:] if p["status"] == "skipped"]
    row = {"model": model, "mesh": mesh, "cluster": cluster.name, "baselines_failed": " ".join(failed),
           "hand_skipped": " ".join(skipped)}
    by_name = {p["planner"]: p for p in ok}
    for p in ok:
        if p["planner"].startswith(PINNED) and HAND + p["planner"][len(PINNED):] in by_name:
            plain = by_name[HAND + p["planner"][len(PINNED):]]
            p["step_ratio_to_hand"] = p["step_seconds"] / plain["step_seconds"]
            p["comm_ratio_to_hand"] = (p["communication_bytes"] / plain["communication_bytes"]
                                       if plain["communication_bytes"] else math.nan)
    pinned = [p for p in ok if "step_ratio_to_hand" in p]
    worst_pinned = max(pinned, key=lambda p: p["step_ratio_to_hand"]) if pinned else None
    if worst_pinned:
        row.update(worst_pinned=worst_pinned["planner"][len(PINNED):],
                   worst_pinned_ratio=worst_pinned["step_ratio_to_hand"],
                   worst_pinned_comm_ratio=worst_pinned["comm_ratio_to_hand"])
    if auto["status"] != "ok":
        return row | {"best_hand": "", "best_baseline": "", "meets_target": False, "fits": False}
    for p in plans:
        if p["status"] == "ok":
            p["step_ratio_to_autoplan"] = p["step_seconds"] / auto["step_seconds"]
    best, hlo_best, best_baseline = _best(hands), _best(hands, "hlo_step_seconds"), _best(baselines)
    ratio = auto["step_seconds"] / best["step_seconds"] if best else math.nan
    row.update(
        autoplan_step_ms=auto["step_seconds"] * 1e3,
        best_hand=best["planner"][len(HAND):] if best else "",
        best_hand_step_ms=best["step_seconds"] * 1e3 if best else math.nan,
        ratio=ratio, meets_target=bool(ratio <= TARGET_RATIO + RATIO_SLACK),
        hlo_best_hand=hlo_best["planner"][len(HAND):] if hlo_best else "",
        ratio_hlo=auto["hlo_step_seconds"] / hlo_best["hlo_step_seconds"] if hlo_best else math.nan,
        best_baseline=best_baseline["planner"] if best_baseline else "",
        best_baseline_step_ms=best_baseline["step_seconds"] * 1e3 if best_baseline else math.nan,
        ratio_baseline=auto["step_seconds"] / best_baseline["step_seconds"] if best_baseline else math.nan,
        autoplan_memory_gib=auto["memory_upper_bytes"] / 2**30, xla_peak_gib=auto["memory_bytes"] / 2**30,
        device_memory_gib=cluster.device_memory / 2**30, fits=auto["fits"],
        predicted_memory_gib=auto["predicted_memory_bytes"] / 2**30,
        memory_rel_err=rel_err(auto["predicted_memory_bytes"], auto["memory_upper_bytes"]),
        memory_rel_err_xla_peak=rel_err(auto["predicted_memory_bytes"], auto["memory_bytes"]),
        predicted_comm_mb=auto["predicted_communication_bytes"] / 1e6,
        compiled_comm_mb=auto["communication_bytes"] / 1e6,
        comm_rel_err=rel_err(auto["predicted_communication_bytes"], auto["communication_bytes"]),
        hlo_comm_mb=auto["hlo_communication_bytes"] / 1e6,
        comm_rel_err_hlo=rel_err(auto["predicted_communication_bytes"], auto["hlo_communication_bytes"]),
        predicted_step_ms=auto["predicted_step_seconds"] * 1e3,
        step_rel_err=rel_err(auto["predicted_step_seconds"], auto["step_seconds"]),
        predicted_collectives=auto["predicted_collectives"], compiled_collectives=auto["compiled_collectives"],
        xla_remat_warnings=auto["xla_remat_warnings"],
        plan_seconds=auto["plan_seconds"], compile_seconds=auto["compile_seconds"])
    return row


# ----------------------------------------------------------------------------- the sweep


def run(models: Iterable[str] = MODELS, meshes: Iterable[str] = MESHES, clusters: Iterable[str] = CLUSTERS,
        *, progress: bool = True, dump_dir: str | None = None, hand_strategies: bool = True, pinned: bool = True,
        baselines: bool = True, log: Callable[[str], None] | None = None,
        on_row: Callable[[list[dict], list[dict]], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Measure every (model, mesh, cluster): returns (summary rows, per-plan rows).

    ``on_row(summary, everything)`` is called after each workload row (e.g. to write partial results)."""
    models, meshes, clusters = list(models), [parse_mesh(m) for m in meshes], [get_cluster(c) for c in clusters]
    which = functools.partial(planners_for, hand_strategies=hand_strategies, pinned=pinned, baselines=baselines)
    jobs = [(m, shape, names, c, p) for m in models for shape, names in meshes for c in clusters
            for p in which(names)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), unit="plan", dynamic_ncols=True, file=sys.stderr)
    summary, everything = [], []
    for model in models:
        spec = get_workload(model)
        for shape, names in meshes:
            mesh = device_mesh(shape, names)
            for cluster in clusters:
                plans = []
                for planner in which(names):
                    if bar is not None:
                        bar.set_description(f"{model} {mesh_label(shape)} {cluster.name} {planner}")
                    row = {"model": model, "mesh": mesh_label(shape), "cluster": cluster.name}
                    row |= measure_plan(spec, mesh, cluster, planner, dump_dir)
                    plans.append(row)
                    if bar is not None:
                        bar.update()
                srow = summarize(model, mesh_label(shape), cluster, plans)
                summary.append(srow)
                everything.extend(plans)
                message = (f"{model} {mesh_label(shape)} {cluster.name}: ratio {_fmt(srow.get('ratio'))} "
                           f"(autoplan {_fmt(srow.get('autoplan_step_ms'))} ms, hand {srow.get('best_hand')} "
                           f"{_fmt(srow.get('best_hand_step_ms'))} ms, baseline {srow.get('best_baseline')} "
                           f"{_fmt(srow.get('best_baseline_step_ms'))} ms); errors mem {_pct(srow.get('memory_rel_err'))}"
                           f" comm {_pct(srow.get('comm_rel_err'))} step {_pct(srow.get('step_rel_err'))}")
                (log or (bar.write if bar is not None else print))(message)
                if on_row is not None:
                    on_row(summary, everything)
        _HAND_COMPILED.clear()
        jax.clear_caches()  # compiled programs of this model are no longer needed: keep peak memory down
    if bar is not None:
        bar.close()
    return summary, everything


# ----------------------------------------------------------------------------- writing results


def _fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _pct(value) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{100 * value:+.1f}%"


def _csv_value(value):
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return value


def write_csv(path: str, rows: Sequence[dict], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in fields})


_MD_COLUMNS = (  # (header, field, formatter)
    ("model", "model", str), ("mesh", "mesh", str), ("cluster", "cluster", str),
    ("autoplan ms", "autoplan_step_ms", _fmt), ("best hand", "best_hand", str),
    ("hand ms", "best_hand_step_ms", _fmt), ("ratio", "ratio", lambda v: _fmt(v, 3)),
    ("ratio (HLO as is)", "ratio_hlo", lambda v: _fmt(v, 3)),
    ("best baseline", "best_baseline", str), ("baseline ms", "best_baseline_step_ms", _fmt),
    ("ratio vs baseline", "ratio_baseline", lambda v: _fmt(v, 3)),
    ("worst pinned/plain", None, None),
    ("mem GiB", "autoplan_memory_gib", lambda v: _fmt(v, 3)), ("fits", "fits", _fmt),
    ("pred mem GiB", "predicted_memory_gib", lambda v: _fmt(v, 3)), ("mem err", "memory_rel_err", _pct),
    ("mem err vs XLA peak", "memory_rel_err_xla_peak", _pct),
    ("pred comm MB", "predicted_comm_mb", _fmt), ("comm MB", "compiled_comm_mb", _fmt),
    ("comm err", "comm_rel_err", _pct), ("comm err (HLO as is)", "comm_rel_err_hlo", _pct),
    ("pred step ms", "predicted_step_ms", _fmt), ("step err", "step_rel_err", _pct),
    ("colls pred/XLA", None, None), ("XLA remat warn.", "xla_remat_warnings", str),
    ("plan+compile s", None, None),
)


def _md_cell(row: dict, header: str, field, formatter) -> str:
    if header == "colls pred/XLA":
        return f"{row.get('predicted_collectives', '')}/{row.get('compiled_collectives', '')}"
    if header == "worst pinned/plain":
        if not row.get("worst_pinned"):
            return ""
        return f"{row['worst_pinned']} {_fmt(row['worst_pinned_ratio'])}"
    if header == "plan+compile s":
        if "plan_seconds" not in row:
            return ""
        return f"{row['plan_seconds']:.1f}+{row['compile_seconds']:.1f}"
    value = row.get(field, "")
    return formatter(value) if value != "" else ""


def _worst(rows: Sequence[dict], key: str, absolute: bool = False) -> dict | None:
    usable = [r for r in rows if isinstance(r.get(key), float) and not math.isnan(r[key])]
    if not usable:
        return None
    return max(usable, key=lambda r: abs(r[key]) if absolute else r[key])


def write_markdown(path: str, summary: Sequence[dict], everything: Sequence[dict], command: str,
                   wall_seconds: float) -> None:
    ok = [r for r in summary if isinstance(r.get("ratio"), float) and not math.isnan(r["ratio"])]
    meets = sum(bool(r["meets_target"]) for r in ok)
    fits = sum(bool(r.get("fits")) for r in summary)
    lines = [
        "# Plan quality: autoplan vs hand strategies and manual baselines, priced from XLA's compiled HLO", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
        f"{len(jax.devices())} {jax.devices()[0].platform.upper()} devices (compiled for, not run). "
        f"Command: `{command}` ({wall_seconds:.0f} s wall).", "",
        "Step times are `autoplan._src.hlo.compiled_report` of the compiled program: the per-kernel roofline "
        "of the fused, partitioned program (each kernel of the optimized HLO takes the longer of its FLOPs at the "
        "program's matmul rate and its bytes at device memory bandwidth, as XLA's GPU performance model does; "
        "kernel FLOPs and bytes add up to XLA's `cost_analysis()`; loop bodies times their trip count) plus the "
        "alpha-beta time of every collective in the optimized HLO, no overlap. "
        f"Hand strategies (`benchmarks/hand.py`, plain `jax.jit(step, in_shardings=..., out_shardings=...)`, no "
        f"autoplan code in the path): {', '.join(hand.STRATEGIES)}; a strategy that does not apply (no 'model' "
        "axis, no expert weights) is skipped with its reason. *pinned:<strategy>* = the same input specs pinned "
        "in autoplan's ILP and emitted by autoplan (its emitter's overhead over plain jit: *worst pinned/plain*, "
        "step ratio). "
        f"Emitted baselines: {', '.join(autoplan.baselines.ALL)} (megatron_dp skipped on 1-axis meshes, where it "
        "equals megatron). ratio = autoplan step / best hand step (target <= 1.00); ratio vs baseline = "
        "autoplan step / best emitted baseline step. "
        "Cluster a100-4x is a100-8x with 4 devices per node (so 8-device groups cross nodes).", "",
        "Columns: *mem GiB* = XLA's argument + output + temp - alias bytes per device (on the CPU backend "
        "`memory_analysis().peak_memory_in_bytes`, which `compiled_report.memory_bytes` reads, is argument + "
        "output - alias and leaves temporaries out; *mem err vs XLA peak* compares with that number). "
        "Errors are (predicted - compiled) / compiled for autoplan's plan: memory = `plan.cost.memory_bytes`, "
        "comm = `plan.cost.communication_bytes` vs the wire bytes of the compiled collectives, step = "
        "`plan.cost.step_seconds` vs the compiled step. Reduce-scatters: the CPU pipeline leaves one as "
        "all-reduce + a `partition-id` dynamic-slice, which GPU XLA rewrites into a reduce-scatter; ratio, comm "
        "and step price such all-reduce elements as the reduce-scatters a GPU build runs, for autoplan and "
        "baselines alike; *(HLO as is)* columns price the text unchanged. "
        "*colls pred/XLA* = collectives the plan lists / collective instructions in the HLO (a combined tuple "
        "all-reduce counts once). *XLA remat warn.* = SPMD 'involuntary full rematerialization' warnings "
        "(a reshard XLA could only do by replicating the tensor).", "",
        "## Summary", "",
        f"- Rows meeting ratio (vs best hand strategy) <= {TARGET_RATIO:.2f}: **{meets} / {len(summary)}**.",
        (f"- Rows where autoplan <= best emitted baseline: "
         f"{sum(r.get('ratio_baseline', math.inf) <= TARGET_RATIO + RATIO_SLACK for r in ok)} / {len(summary)}."
         if any(r.get("best_baseline") for r in ok) else "- Emitted baselines: not measured in this run."),
        f"- autoplan's compiled memory fits the device in {fits} / {len(summary)} rows.",
    ]
    worst = _worst(ok, "ratio")
    if worst:
        lines.append(f"- Worst ratio: **{worst['ratio']:.3f}** ({worst['model']} {worst['mesh']} {worst['cluster']}: "
                     f"autoplan {worst['autoplan_step_ms']:.4g} ms vs hand {worst['best_hand']} "
                     f"{worst['best_hand_step_ms']:.4g} ms).")
    ratios = [r["ratio"] for r in ok if r["ratio"] > 0]
    if ratios:
        lines.append(f"- Geometric mean ratio vs best hand: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}.")
    pinned = [r for r in summary if isinstance(r.get("worst_pinned_ratio"), float)]
    if pinned:
        w = max(pinned, key=lambda r: r["worst_pinned_ratio"])
        lines.append(f"- Emitter overhead: worst pinned/plain-jit step ratio **{w['worst_pinned_ratio']:.3f}** "
                     f"({w['worst_pinned']} on {w['model']} {w['mesh']} {w['cluster']}); "
                     f"{sum(r['worst_pinned_ratio'] > 1.0 + RATIO_SLACK for r in pinned)} / {len(pinned)} rows have some "
                     "hand strategy slower through the emitter than as plain jit.")
    as_is = [r for r in ok if isinstance(r.get("ratio_hlo"), float)]
    lines.append(f"- Priced from the HLO as is (reduce-scatters left as all-reduce + slice where the backend "
                 f"does so): {sum(r['ratio_hlo'] <= TARGET_RATIO + RATIO_SLACK for r in as_is)} / {len(summary)} rows "
                 "meet the target.")
    for key, label in (("memory_rel_err", "memory"), ("comm_rel_err", "communication"),
                       ("comm_rel_err_hlo", "communication (HLO as is)"), ("step_rel_err", "step")):
        w = _worst(ok, key, absolute=True)
        if w:
            flagged = sum(abs(r[key]) > ERROR_THRESHOLD for r in ok if isinstance(r.get(key), float))
            lines.append(f"- Worst {label} prediction error: **{_pct(w[key])}** ({w['model']} {w['mesh']} "
                         f"{w['cluster']}); {flagged} / {len(ok)} rows beyond +-{ERROR_THRESHOLD:.0%}.")
    failed = [(r["model"], r["mesh"], r["cluster"], r["baselines_failed"]) for r in summary if r.get("baselines_failed")]
    if failed:
        lines.append("- Plans that failed to plan or compile: "
                     + "; ".join(f"{m} {me} {c}: {b}" for m, me, c, b in failed) + ".")
    auto_failed = [r for r in everything if r["planner"] == AUTOPLAN and r["status"] != "ok"]
    for r in auto_failed:
        lines.append(f"- autoplan FAILED on {r['model']} {r['mesh']} {r['cluster']}: {r['error']}")
    lines += ["", "## Results", "",
              "| " + " | ".join(h for h, _, _ in _MD_COLUMNS) + " |",
              "|" + "---|" * len(_MD_COLUMNS)]
    for row in summary:
        lines.append("| " + " | ".join(_md_cell(row, h, f, fmt) for h, f, fmt in _MD_COLUMNS) + " |")
    lines += _hand_table(everything)
    lines += ["", "## Every plan (compiled step ms; ratio to autoplan in parentheses)", ""]
    planners = [AUTOPLAN, *autoplan.baselines.ALL, *(HAND + h for h in hand.STRATEGIES)]
    lines += ["| model | mesh | cluster | " + " | ".join(planners) + " |", "|" + "---|" * (3 + len(planners))]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in everything:
        by_key.setdefault((r["model"], r["mesh"], r["cluster"]), {})[r["planner"]] = r
    for (model, mesh, cluster), plans in by_key.items():
        cells = []
        for p in planners:
            r = plans.get(p)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(f"{r['step_seconds'] * 1e3:.4g} ({r['step_ratio_to_autoplan']:.2f})")
        lines.append(f"| {model} | {mesh} | {cluster} | " + " | ".join(cells) + " |")
    lines += ["", "Per-plan details (all report fields, predicted and compiled): `plan_quality_all.csv`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _hand_table(everything: Sequence[dict]) -> list[str]:
    """Each hand strategy: plain jit vs the same input specs through autoplan's ILP and emitter."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in everything:
        by_key.setdefault((r["model"], r["mesh"], r["cluster"]), {})[r["planner"]] = r
    lines = ["", "## Hand strategies: plain jit vs the same input specs through autoplan's emitter", "",
             "step ms / compiled comm MB for plain `jax.jit` (*plain*) and for autoplan with those inputs pinned "
             "(*pinned*, with its predicted comm MB); *pinned/plain* = step ratio. Skipped strategies give "
             "their reason in `plan_quality_all.csv`.", "",
             "| model | mesh | cluster | strategy | plain ms | plain comm MB | pinned ms | pinned comm MB | "
             "pinned predicted comm MB | pinned/plain |", "|" + "---|" * 10]
    for (model, mesh, cluster), plans in by_key.items():
        for strategy in hand.STRATEGIES:
            plain, pinned = plans.get(HAND + strategy), plans.get(PINNED + strategy)
            if plain is None or plain["status"] != "ok":
                continue
            cells = [f"{plain['step_seconds'] * 1e3:.4g}", f"{plain['communication_bytes'] / 1e6:.4g}"]
            if pinned is not None and pinned["status"] == "ok":
                cells += [f"{pinned['step_seconds'] * 1e3:.4g}", f"{pinned['communication_bytes'] / 1e6:.4g}",
                          f"{pinned['predicted_communication_bytes'] / 1e6:.4g}",
                          _fmt(pinned.get("step_ratio_to_hand", math.nan))]
            else:
                cells += [pinned["status"] if pinned else "-"] + [""] * 3
            lines.append(f"| {model} | {mesh} | {cluster} | {strategy} | " + " | ".join(cells) + " |")
    return lines


def write_plot(path: str, summary: Sequence[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summary if isinstance(r.get("ratio"), float) and not math.isnan(r["ratio"])]
    if not rows:
        return False
    labels = [f"{r['model']} {r['mesh']}\n{r['cluster']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    as_is = [r.get("ratio_hlo", math.nan) for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 2), 4.8))
    colors = ["tab:green" if r <= TARGET_RATIO + RATIO_SLACK else "tab:red" for r in ratios]
    ax.bar(x - 0.2, ratios, width=0.4, color=colors, label="compiled HLO, reduce-scatters as GPU XLA emits them")
    ax.bar(x + 0.2, as_is, width=0.4, color="tab:grey", alpha=0.6, label="compiled HLO as is")
    ax.axhline(TARGET_RATIO, color="black", ls="--", lw=1, label=f"target {TARGET_RATIO:.2f}")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("autoplan step / best hand strategy step")
    if max(ratios) / max(min(ratios), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title("Plan quality: autoplan vs best hand strategy, plain jax.jit (alpha-beta cost of compiled HLO)",
                 fontsize=9)
    for i, r in enumerate(ratios):
        ax.text(i - 0.2, r, f"{r:.2f}", ha="center", va="bottom", fontsize=6)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(summary: Sequence[dict], everything: Sequence[dict], out_dir: str = RESULTS, *,
                  command: str = "python benchmarks/plan_quality.py", wall_seconds: float = 0.0,
                  stem: str = "plan_quality") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{stem}{k}") for k in (".csv", "_all.csv", ".md", ".png")}
    write_csv(paths[".csv"], summary, SUMMARY_FIELDS)
    write_csv(paths["_all.csv"], everything, ALL_FIELDS)
    write_markdown(paths[".md"], summary, everything, command, wall_seconds)
    if not write_plot(paths[".png"], summary):
        del paths[".png"]
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="zoo",
                        help="zoo (autoplan's models), wide (benchmarks/workloads.py at benchmark size) or all")
    parser.add_argument("--models", help="comma-separated zoo or workload names (default: the suite's)")
    parser.add_argument("--no-pinned", action="store_true",
                        help="skip the hand strategies' specs through autoplan's emitter (pinned:* rows)")
    parser.add_argument("--no-hand", action="store_true", help="skip hand strategies altogether")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip autoplan.baselines (emitted data_parallel, zero1, ... rows)")
    parser.add_argument("--meshes", help=f"comma-separated mesh shapes (default: {','.join(MESHES)})")
    parser.add_argument("--clusters", help=f"comma-separated clusters (default: {','.join(CLUSTERS)})")
    parser.add_argument("--quick", action="store_true",
                        help="two models of the suite on a 2x4 mesh of a100-8x (explicit flags win)")
    parser.add_argument("--out", default=RESULTS, help="output folder (default: benchmarks/results)")
    parser.add_argument("--dump-hlo", metavar="DIR", help="also write each compiled HLO and plan summary here")
    parser.add_argument("--mock-gpus", action="store_true",
                        help="compile for 8 mock GPUs (needs one real GPU); results go to plan_quality_gpu.*")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    defaults = (dict(QUICK, models=QUICK[args.suite]) if args.quick else
                {"models": SUITES[args.suite], "meshes": MESHES, "clusters": CLUSTERS})
    pick = lambda flag, key: flag.split(",") if flag else list(defaults[key])  # noqa: E731
    models, meshes, clusters = pick(args.models, "models"), pick(args.meshes, "meshes"), pick(args.clusters, "clusters")
    command = "python benchmarks/plan_quality.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                     " " + " ".join(sys.argv[1:] if argv is None else argv))
    stem = (("plan_quality_gpu" if args.mock_gpus else "plan_quality")
            + {"zoo": "", "wide": "_wide", "all": "_zoo_wide"}[args.suite])  # not "_all": plan_quality_all.csv exists
    start = time.perf_counter()

    def partial(summary, everything):  # results so far, so that an interrupted sweep still leaves its rows
        write_results(summary, everything, args.out, command=command + "  (partial)",
                      wall_seconds=time.perf_counter() - start, stem=stem)

    summary, everything = run(models, meshes, clusters, progress=not args.no_progress, dump_dir=args.dump_hlo,
                              hand_strategies=not args.no_hand, pinned=not args.no_pinned,
                              baselines=not args.no_baselines, on_row=partial)
    wall = time.perf_counter() - start
    paths = write_results(summary, everything, args.out, command=command, wall_seconds=wall, stem=stem)
    meets = sum(bool(r.get("meets_target")) for r in summary)
    print(f"{meets}/{len(summary)} rows meet ratio <= {TARGET_RATIO:.2f}; {wall:.0f} s; wrote "
          + ", ".join(os.path.relpath(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
