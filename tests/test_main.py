import re
import subprocess
import sys


def test_demo_prints_plan_and_baselines():
    result = subprocess.run([sys.executable, "-m", "autoplan", "demo"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "8 cpu devices" in out and "Plan 'autoplan'" in out
    ratios = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "autoplan/baseline" in line]
    assert len(ratios) == 6 and max(ratios) <= 1.0 + 1e-9
    # then it trains with autoplan.autoparallel, and the loss really falls
    losses = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+) loss ([\d.]+)$", out, re.M)}
    assert sorted(losses) == [1, 10, 20, 30], out
    assert losses[30] < losses[20] < losses[10] < losses[1]
    assert losses[30] < losses[1] - 0.5
    summary = re.search(r"^loss ([\d.]+) -> ([\d.]+) \(falling\)$", out, re.M)
    assert summary and float(summary.group(2)) < float(summary.group(1)), out
    assert "train gpt-tiny" in result.stderr  # the progress bar


def test_plan_command_writes_json(tmp_path):
    out = tmp_path / "p.json"
    result = subprocess.run([sys.executable, "-m", "autoplan", "plan", "--model", "mlp-tiny", "--mesh", "2x4",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    import autoplan

    assert autoplan.load_plan(str(out)).mesh.axis_sizes == (2, 4)
