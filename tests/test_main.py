import subprocess
import sys


def test_demo_prints_plan_and_baselines():
    result = subprocess.run([sys.executable, "-m", "autoplan", "demo"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "8 cpu devices" in out and "Plan 'autoplan'" in out
    ratios = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "autoplan/baseline" in line]
    assert len(ratios) == 6 and max(ratios) <= 1.0 + 1e-9


def test_plan_command_writes_json(tmp_path):
    out = tmp_path / "p.json"
    result = subprocess.run([sys.executable, "-m", "autoplan", "plan", "--model", "mlp-tiny", "--mesh", "2x4",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    import autoplan

    assert autoplan.load_plan(str(out)).mesh.axis_sizes == (2, 4)
