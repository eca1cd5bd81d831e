"""The training loop: determinism, kill/resume (mid-run and mid-save), elastic restore, bad checkpoints.

The CLI runs as subprocesses (``python -m autoplan train``) on 8 (or 4) fake CPU
devices, over a 1-D mesh where the planner is fast.  They share a persistent
XLA compilation cache in a temporary directory, which makes every run after the
first mostly free of compile time; the numbers do not depend on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import autoplan
from autoplan._src import training

STEPS = 12
SAVE_EVERY = 3


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla-cache")
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    e.pop("AUTOPLAN_TEST_STALL_SAVE", None)
    e.pop("XLA_FLAGS", None)
    return e


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoplan", "train", "--no-progress", *args]


def _run(env, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _printed_steps(out: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+) loss ([-\d.eE+naninf]+)$", out, re.M)}


def _losses(path: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads(path.read_text())["losses"].items()}


def _assert_losses_match(got: dict[int, float], want: dict[int, float], steps, rtol: float):
    for i in steps:
        assert i in got, f"step {i} missing from {sorted(got)}"
        np.testing.assert_allclose(got[i], want[i], rtol=rtol, err_msg=f"loss of step {i}")


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the training process exited (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _common(ckpt: Path) -> list[str]:
    return ["--model", "gpt-tiny", "--mesh", "8", "--ckpt", str(ckpt), "--save-every", str(SAVE_EVERY)]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted run of STEPS steps: (checkpoint dir, losses at full precision)."""
    d = tmp_path_factory.mktemp("reference")
    result = _ok(_run(env, *_common(d / "ckpt"), "--steps", str(STEPS), "--log-file", str(d / "log.json")))
    losses = _losses(d / "log.json")
    assert sorted(losses) == list(range(1, STEPS + 1))
    # printed lines agree with the log (6 decimals) and there is one per step
    printed = _printed_steps(result.stdout)
    assert sorted(printed) == list(range(1, STEPS + 1))
    _assert_losses_match(printed, losses, printed, rtol=1e-5)
    assert autoplan.checkpoint.all_steps(d / "ckpt") == [6, 9, 12]  # keep=3 pruned step 3
    assert losses[STEPS] < losses[1] - 0.2  # the synthetic data is learnable
    return d / "ckpt", losses


def _jit_reference(name: str, steps: int, seed: int = 0) -> dict[int, float]:
    """Single-device ``jax.jit(spec.train_step)`` on the same synthetic data."""
    spec = autoplan.models.get(name)
    data = training.SyntheticData(spec, seed=seed)
    params, opt_state = spec.init(jax.random.key(seed))
    step = jax.jit(spec.train_step)
    out = {}
    for i in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, data.global_batch(i))
        out[i] = float(loss)
    return out


# ---------------------------------------------------------------------------
# in-process


def test_synthetic_data_is_a_pure_function_of_seed_and_step():
    spec = autoplan.models.get("gpt-tiny")
    a, b = training.SyntheticData(spec, seed=0, pool=3), training.SyntheticData(spec, seed=0, pool=3)
    np.testing.assert_array_equal(a.global_batch(2)["tokens"], b.global_batch(2)["tokens"])
    np.testing.assert_array_equal(a.global_batch(2)["tokens"], a.global_batch(5)["tokens"])  # cycled
    assert not np.array_equal(a.global_batch(1)["tokens"], a.global_batch(2)["tokens"])
    c = training.SyntheticData(spec, seed=1, pool=3)
    assert not np.array_equal(a.global_batch(1)["tokens"], c.global_batch(1)["tokens"])
    # the process-local slice under a batch-sharded layout is the whole batch on one process
    mesh = training.make_mesh((8,))
    sharding = {"tokens": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))}
    np.testing.assert_array_equal(a.local_batch(1, sharding)["tokens"], a.global_batch(1)["tokens"])


def test_train_matches_single_device_jit_and_is_deterministic():
    lines = []
    result = training.train("mlp-tiny", 8, mesh=(4, 2), progress=False, log=lines.append, log_every=4)
    again = training.train("mlp-tiny", 8, mesh=(4, 2), progress=False, log=None, plan=result.plan)
    assert sorted(result.losses) == list(range(1, 9)) and result.steps_run == 8 and result.resumed_from is None
    assert result.losses == again.losses  # same seed, same losses, bit for bit
    _assert_losses_match(result.losses, _jit_reference("mlp-tiny", 8), range(1, 9), rtol=1e-5)
    assert [line.split()[1] for line in lines] == ["1", "4", "8"]  # first, every 4th, last
    assert result.plan.mesh.axis_sizes == (4, 2)
    params, _ = result.state
    assert {d for leaf in jax.tree_util.tree_leaves(params) for d in leaf.sharding.device_set} == set(jax.devices())


# ---------------------------------------------------------------------------
# subprocess: the CLI, killed and resumed


def test_kill_mid_run_then_resume_matches_uninterrupted(env, reference, tmp_path):
    _, want = reference
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "out.txt"
    with open(out, "w") as f:  # a long run (the same plan and data), killed soon after step 7
        proc = subprocess.Popen(_cmd(*_common(ckpt), "--steps", "500"), stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: any(s >= 7 for s in _printed_steps(out.read_text())), proc, 150, "step 7 was printed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_printed_steps(out.read_text()))
    last = autoplan.checkpoint.latest_step(ckpt)
    # the save of step 3 finished before the save of step 6 began (one save in flight at a time); the
    # latest may or may not have committed when the process died
    assert last is not None and last % SAVE_EVERY == 0 and 3 <= last <= min(killed_at, 9), (last, killed_at)

    result = _ok(_run(env, *_common(ckpt), "--steps", str(STEPS), "--resume", "--log-file", str(tmp_path / "log.json")))
    assert f"resumed from checkpoint {last} " in result.stdout
    printed = _printed_steps(result.stdout)
    assert min(printed) == last + 1 and sorted(printed) == list(range(last + 1, STEPS + 1))  # no step lost or redone
    got = _losses(tmp_path / "log.json")
    assert sorted(got) == list(range(1, STEPS + 1))  # the history before the resume comes from train_log.json
    _assert_losses_match(got, want, range(1, STEPS + 1), rtol=1e-6)


def test_kill_mid_save_leaves_previous_checkpoint_and_resume_matches(env, reference, tmp_path):
    _, want = reference
    ckpt = tmp_path / "ckpt"
    err = tmp_path / "err.txt"
    stalled = dict(env, AUTOPLAN_TEST_STALL_SAVE="6")  # test hook: the commit of checkpoint 6 hangs
    with open(err, "w") as f:
        proc = subprocess.Popen(_cmd(*_common(ckpt), "--steps", str(STEPS)), stdout=subprocess.DEVNULL, stderr=f,
                                env=stalled)
    try:
        _wait_for(lambda: "stalling the commit of checkpoint 6" in err.read_text(), proc, 150, "the save of step 6")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # step 6 was written into orbax's temporary directory but never committed
    assert autoplan.checkpoint.all_steps(ckpt) == [3]
    assert [p.name for p in ckpt.iterdir() if p.name.startswith("6.orbax-checkpoint-tmp")]
    # the loss log ran ahead of the checkpoints; the resumed run uses only what step 3 covers
    assert max(training.read_log(ckpt)) >= 6

    result = _ok(_run(env, *_common(ckpt), "--steps", str(STEPS), "--resume", "--log-file", str(tmp_path / "log.json")))
    assert "resumed from checkpoint 3 " in result.stdout
    assert min(_printed_steps(result.stdout)) == 4
    _assert_losses_match(_losses(tmp_path / "log.json"), want, range(1, STEPS + 1), rtol=1e-6)
    assert autoplan.checkpoint.all_steps(ckpt) == [6, 9, 12]
    assert not [p.name for p in ckpt.iterdir() if "orbax-checkpoint-tmp" in p.name]  # cleaned up


def test_elastic_restore_onto_four_devices_and_another_plan(env, reference, tmp_path):
    _, want = reference
    ckpt = tmp_path / "ckpt"
    # saved data-parallel on 8 devices ...
    _ok(_run(env, "--model", "gpt-tiny", "--ckpt", str(ckpt), "--devices", "8", "--mesh", "8",
             "--planner", "data_parallel", "--steps", "6", "--save-every", "3", "--plan-out", str(tmp_path / "a.json")))
    # ... resumed tensor-parallel (Megatron) on a (1, 4) mesh of 4 devices
    result = _ok(_run(env, "--model", "gpt-tiny", "--ckpt", str(ckpt), "--devices", "4", "--mesh", "1x4",
                      "--planner", "megatron", "--steps", "10", "--save-every", "3", "--resume",
                      "--log-file", str(tmp_path / "log.json"), "--plan-out", str(tmp_path / "b.json")))
    assert "4 cpu devices" in result.stdout
    assert "resumed from checkpoint 6 " in result.stdout and "{'data': 1, 'model': 4}" in result.stdout
    before, after = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert before["mesh"]["axis_sizes"] == [8] and after["mesh"]["axis_sizes"] == [1, 4]
    specs = lambda plan: {x["path"]: x["spec"] for x in plan["inputs"] if x["path"].startswith("params/")}  # noqa: E731
    assert all(all(not axes for axes in s) for s in specs(before).values())  # replicated parameters
    assert any(["model"] in s for s in specs(after).values())  # split over the model axis
    assert min(_printed_steps(result.stdout)) == 7
    _assert_losses_match(_losses(tmp_path / "log.json"), want, range(1, 11), rtol=1e-5)
    assert autoplan.checkpoint.latest_step(ckpt) == 10


# ---------------------------------------------------------------------------
# bad input


def test_resume_with_another_model_fails_cleanly(env, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0], ckpt)
    result = _run(env, "--model", "mlp-tiny", "--mesh", "8", "--ckpt", str(ckpt), "--resume", "--steps", "20")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr
    # names the first mismatching pytree path, and the step directory
    assert re.search(r"'params/[\w/]+'", result.stderr), result.stderr
    assert str(ckpt / "12") in result.stderr
    assert autoplan.checkpoint.all_steps(ckpt) == [6, 9, 12]  # untouched


def test_existing_checkpoints_without_resume_are_refused(env, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0], ckpt)
    result = _run(env, *_common(ckpt), "--steps", "20")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "already holds checkpoints (latest step 12)" in result.stderr and "--resume" in result.stderr


def test_corrupt_latest_checkpoint_is_detected(env, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0], ckpt)
    data_files = [p for p in (ckpt / "12").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    result = _run(env, *_common(ckpt), "--steps", "14", "--resume")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr and "corrupt" in result.stderr and str(ckpt / "12") in result.stderr
    assert "resume from checkpoint 9" in result.stderr  # says how to fall back; does not do it silently
    assert "step 13 loss" not in result.stdout
    assert autoplan.checkpoint.all_steps(ckpt) == [6, 9, 12]
