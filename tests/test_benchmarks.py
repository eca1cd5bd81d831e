"""Smoke test of benchmarks/plan_quality.py: one tiny workload, every planner, well-formed outputs."""

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
    summary, everything = pq.run(["mlp-tiny"], ["2x4"], ["a100-8x"], progress=False, log=lambda _: None)
    out = tmp_path_factory.mktemp("plan_quality")
    paths = pq.write_results(summary, everything, str(out), command="pytest", wall_seconds=1.0)
    return summary, everything, paths


def test_workload_helpers():
    assert pq.parse_mesh("8") == ((8,), ("data",))
    assert pq.parse_mesh("2x4") == ((2, 4), ("data", "model"))
    assert "megatron_dp" not in pq.planners_for(("data",))
    assert pq.planners_for(("data", "model")) == ["autoplan", *autoplan.baselines.ALL]
    four = pq.get_cluster("a100-4x")
    assert four.devices_per_node == 4 and four.name == "a100-4x"
    assert four.inter_node_bandwidth == autoplan.clusters["a100-8x"].inter_node_bandwidth
    assert pq.get_cluster("a100-8x") is autoplan.clusters["a100-8x"]
    assert pq.rel_err(3.0, 2.0) == 0.5 and pq.rel_err(0.0, 0.0) == 0.0 and math.isinf(pq.rel_err(1.0, 0.0))


def test_every_planner_measured(tiny):
    summary, everything, _ = tiny
    assert [r["planner"] for r in everything] == ["autoplan", *autoplan.baselines.ALL]
    assert all(r["status"] == "ok" for r in everything), [r["error"] for r in everything]
    for r in everything:
        assert r["step_seconds"] == pytest.approx(r["compute_seconds"] + r["communication_seconds"])
        assert r["memory_upper_bytes"] == pytest.approx(
            r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"])
        assert r["communication_bytes"] <= r["hlo_communication_bytes"]  # may add an alpha, never bytes
        assert r["hlo_step_seconds"] == pytest.approx(r["compute_seconds"] + r["hlo_communication_seconds"])
        assert r["plan_seconds"] > 0 and r["compile_seconds"] > 0


def test_ratio_and_errors_come_from_the_reports(tiny):
    summary, everything, _ = tiny
    (row,) = summary
    auto, baselines = everything[0], everything[1:]
    best = min(baselines, key=lambda r: r["step_seconds"])
    assert row["best_baseline"] == best["planner"]
    assert row["ratio"] == pytest.approx(auto["step_seconds"] / min(r["step_seconds"] for r in baselines))
    assert row["meets_target"] == (row["ratio"] <= 1.0 + 1e-9)
    assert row["autoplan_step_ms"] == pytest.approx(auto["step_seconds"] * 1e3)
    assert row["ratio_hlo"] == pytest.approx(
        auto["hlo_step_seconds"] / min(r["hlo_step_seconds"] for r in baselines))
    assert row["memory_rel_err"] == pytest.approx(
        (auto["predicted_memory_bytes"] - auto["memory_upper_bytes"]) / auto["memory_upper_bytes"])
    assert row["comm_rel_err"] == pytest.approx(
        (auto["predicted_communication_bytes"] - auto["communication_bytes"]) / auto["communication_bytes"])
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
    assert "| model | mesh | cluster | autoplan ms |" in text
    assert "Rows meeting ratio <= 1.00" in text and "mlp-tiny | 2x4 | a100-8x" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.getsize(paths[".png"]) > 1000
