"""Smoke test of benchmarks/plan_quality.py: one tiny workload, every planner and hand strategy, well-formed outputs."""

import csv
import importlib.util
import math
import os

import pytest

import autoplan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pq = _load("plan_quality")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    summary, everything = pq.run(["wide-mlp-tiny"], ["2x4"], ["a100-8x"], progress=False, log=lambda _: None)
    out = tmp_path_factory.mktemp("plan_quality")
    paths = pq.write_results(summary, everything, str(out), command="pytest", wall_seconds=1.0)
    return summary, everything, paths


def test_workload_helpers():
    assert pq.parse_mesh("8") == ((8,), ("data",))
    assert pq.parse_mesh("2x4") == ((2, 4), ("data", "model"))
    assert "megatron_dp" not in pq.planners_for(("data",))
    assert pq.planners_for(("data", "model"), hand_strategies=False) == ["autoplan", *autoplan.baselines.ALL]
    assert pq.planners_for(("data", "model")) == ["autoplan", *autoplan.baselines.ALL,
                                                  *(pq.HAND + s for s in pq.hand.STRATEGIES),
                                                  *(pq.PINNED + s for s in pq.hand.STRATEGIES)]
    assert pq.get_workload("wide-mlp-bench").name == "wide-mlp-bench"
    assert pq.get_workload("mlp-tiny") is autoplan.models.get("mlp-tiny")
    assert set(pq.SUITES["all"]) == set(pq.MODELS) | set(pq.WIDE) and "hf-gpt2-bench" in pq.WIDE
    four = pq.get_cluster("a100-4x")
    assert four.devices_per_node == 4 and four.name == "a100-4x"
    assert four.inter_node_bandwidth == autoplan.clusters["a100-8x"].inter_node_bandwidth
    assert pq.get_cluster("a100-8x") is autoplan.clusters["a100-8x"]
    assert pq.rel_err(3.0, 2.0) == 0.5 and pq.rel_err(0.0, 0.0) == 0.0 and math.isinf(pq.rel_err(1.0, 0.0))


def test_every_planner_measured(tiny):
    summary, everything, _ = tiny
    assert [r["planner"] for r in everything] == pq.planners_for(("data", "model"))
    by_name = {r["planner"]: r for r in everything}
    for name in ("hand:expert_parallel", "pinned:expert_parallel"):  # an MLP has no experts: skipped, not crashed
        assert by_name.pop(name)["status"] == "skipped"
    assert all(r["status"] == "ok" for r in by_name.values()), [r["error"] for r in by_name.values()]
    for r in by_name.values():
        assert r["step_seconds"] == pytest.approx(r["compute_seconds"] + r["communication_seconds"])
        assert r["memory_upper_bytes"] == pytest.approx(
            r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"])
        assert r["communication_bytes"] <= r["hlo_communication_bytes"]  # may add an alpha, never bytes
        assert r["hlo_step_seconds"] == pytest.approx(r["compute_seconds"] + r["hlo_communication_seconds"])
        assert r["plan_seconds"] > 0 and r["compile_seconds"] > 0


def test_ratio_and_errors_come_from_the_reports(tiny):
    summary, everything, _ = tiny
    (row,) = summary
    auto = everything[0]
    ok = [r for r in everything[1:] if r["status"] == "ok"]
    hands = [r for r in ok if r["planner"].startswith(pq.HAND)]
    baselines = [r for r in ok if r["planner"] in autoplan.baselines.ALL]
    assert len(hands) == 5 and len(baselines) == len(autoplan.baselines.ALL)
    best = min(hands, key=lambda r: r["step_seconds"])
    assert row["best_hand"] == best["planner"][len(pq.HAND):]
    assert row["ratio"] == pytest.approx(auto["step_seconds"] / best["step_seconds"])
    assert row["ratio_baseline"] == pytest.approx(auto["step_seconds"] / min(r["step_seconds"] for r in baselines))
    assert row["meets_target"] == (row["ratio"] <= 1.0 + pq.RATIO_SLACK)
    assert row["autoplan_step_ms"] == pytest.approx(auto["step_seconds"] * 1e3)
    assert row["ratio_hlo"] == pytest.approx(
        auto["hlo_step_seconds"] / min(r["hlo_step_seconds"] for r in hands))
    by_name = {r["planner"]: r for r in everything}
    for strategy in ("data_parallel", "megatron"):
        plain, pinned = by_name[pq.HAND + strategy], by_name[pq.PINNED + strategy]
        assert pinned["step_ratio_to_hand"] == pytest.approx(pinned["step_seconds"] / plain["step_seconds"])
        assert "predicted_step_seconds" in pinned and "predicted_step_seconds" not in plain
    assert row["worst_pinned_ratio"] == pytest.approx(max(r["step_ratio_to_hand"] for r in ok
                                                          if "step_ratio_to_hand" in r))
    assert row["memory_rel_err"] == pytest.approx(
        (auto["predicted_memory_bytes"] - auto["memory_upper_bytes"]) / auto["memory_upper_bytes"])
    if auto["communication_bytes"]:
        assert row["comm_rel_err"] == pytest.approx(
            (auto["predicted_communication_bytes"] - auto["communication_bytes"]) / auto["communication_bytes"])
    else:  # the tiny MLP is cheapest replicated: nothing sent, nothing predicted
        assert auto["predicted_communication_bytes"] == 0 and row["comm_rel_err"] == 0
    assert row["step_rel_err"] == pytest.approx(
        (auto["predicted_step_seconds"] - auto["step_seconds"]) / auto["step_seconds"])
    assert row["fits"] is True


def test_output_files(tiny):
    summary, everything, paths = tiny
    with open(paths[".csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and list(rows[0]) == list(pq.SUMMARY_FIELDS)
    assert float(rows[0]["ratio"]) == pytest.approx(summary[0]["ratio"])
    with open(paths["_all.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["planner"] for r in rows] == [r["planner"] for r in everything]
    assert list(rows[0]) == list(pq.ALL_FIELDS)
    text = open(paths[".md"]).read()
    assert "| model | mesh | cluster | autoplan ms | best hand |" in text
    assert "Rows meeting ratio (vs best hand strategy) <= 1.00" in text and "wide-mlp-tiny | 2x4 | a100-8x" in text
    assert "| wide-mlp-tiny | 2x4 | a100-8x | megatron |" in text  # plain jit vs pinned through the emitter
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.getsize(paths[".png"]) > 1000
