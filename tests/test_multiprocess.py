"""Two processes x 4 CPU devices (gloo on loopback) train like one process x 8 devices and like jax.jit.

Each process runs ``python -m autoplan train --coordinator 127.0.0.1:PORT
--num-processes 2 --process-id I --devices 4`` on one global 8-device mesh:
it plans the step itself (the plans must be byte-identical), builds only its
process-local half of every batch, and checkpoints its shards.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import autoplan
from autoplan._src import training

STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla-cache")
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    e.pop("AUTOPLAN_TEST_STALL_SAVE", None)
    e.pop("XLA_FLAGS", None)
    return e


def _args(tmp: Path, tag: str) -> list[str]:
    return [sys.executable, "-m", "autoplan", "train", "--model", "gpt-tiny", "--mesh", "8",
            "--steps", str(STEPS), "--save-every", "3", "--ckpt", str(tmp / f"ckpt-{tag}"),
            "--log-file", str(tmp / f"log-{tag}.json"), "--plan-out", str(tmp / f"plan-{tag}-{{process}}.json")]


def _losses(path: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads(path.read_text())["losses"].items()}


_GLOO_LINE = re.compile(r"\[Gloo\]|^\d+ is connected to \d+ peer ranks")


def _our_lines(out: str) -> list[str]:
    # gloo's C++ side prints "[Gloo] Rank i is connected ..." to stdout from several threads, so two such lines
    # can interleave mid-line ("[Gloo] Rank [Gloo] Rank 6 ...", then "4 is connected ..."); none of that is ours
    return [line for line in out.splitlines() if line.strip() and not _GLOO_LINE.search(line)]


@pytest.fixture(scope="module")
def two_processes(env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    port = _free_port()
    procs = [subprocess.Popen(_args(tmp, "mp") + ["--devices", "4", "--coordinator", f"127.0.0.1:{port}",
                                                  "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed (rc {p.returncode})\nstdout:\n{out}\nstderr:\n{err}"
    return tmp, outs


@pytest.fixture(scope="module")
def one_process(env, two_processes):
    tmp, _ = two_processes
    result = subprocess.run(_args(tmp, "sp") + ["--devices", "8"], capture_output=True, text=True, timeout=240,
                            env=env)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return tmp, result


def test_two_processes_run_one_eight_device_mesh_with_identical_plans(two_processes):
    tmp, ((out0, err0), (out1, err1)) = two_processes
    assert "8 cpu devices in 2 process(es)" in out0
    plans = [(tmp / f"plan-mp-{i}.json").read_bytes() for i in range(2)]
    assert plans[0] == plans[1]  # byte-identical plan JSON on every process
    plan = autoplan.Plan.from_dict(json.loads(plans[0]))
    assert plan.mesh.axis_sizes == (8,) and plan.num_devices == 8
    # only process 0 prints
    assert [int(m) for m in re.findall(r"^step (\d+) loss", out0, re.M)] == list(range(1, STEPS + 1))
    assert _our_lines(out1) == [], out1
    assert "train gpt-tiny" in err0 and "train gpt-tiny" not in err1  # the progress bar, on process 0 only


def test_two_processes_match_one_process_and_single_device_jit(two_processes, one_process):
    tmp, result = one_process
    multi, single = _losses(tmp / "log-mp.json"), _losses(tmp / "log-sp.json")
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    # the same plan on one process as on two
    assert (tmp / "plan-sp-0.json").read_bytes() == (tmp / "plan-mp-0.json").read_bytes()

    spec = autoplan.models.get("gpt-tiny")
    data = training.SyntheticData(spec, seed=0)
    params, opt_state = spec.init(jax.random.key(0))
    step = jax.jit(spec.train_step)
    for i in range(1, STEPS + 1):
        params, opt_state, loss = step(params, opt_state, data.global_batch(i))
        np.testing.assert_allclose(multi[i], float(loss), rtol=1e-5, err_msg=f"2 processes vs jax.jit, step {i}")
        np.testing.assert_allclose(single[i], float(loss), rtol=1e-5, err_msg=f"1 process vs jax.jit, step {i}")
    assert multi[STEPS] < multi[1]


def test_two_process_checkpoint_restores_on_one_process(two_processes):
    """The shards both processes wrote form one checkpoint; one process restores it and continues the run."""
    tmp, _ = two_processes
    ckpt = tmp / "ckpt-mp"
    assert autoplan.checkpoint.all_steps(ckpt) == [3, 5]
    multi = _losses(tmp / "log-mp.json")
    spec = autoplan.models.get("gpt-tiny")
    mesh = training.make_mesh((8,))
    step = autoplan.autoparallel(spec.train_step, mesh=mesh, cluster="cpu")
    step.lower(*spec.abstract_state(), spec.abstract_batch())
    (params, opt_state), restored = autoplan.checkpoint.restore(ckpt, step.plan, step=3, mesh=step.mesh)
    assert restored == 3
    data = training.SyntheticData(spec, seed=0)
    for i in range(4, STEPS + 1):
        params, opt_state, loss = step(params, opt_state, data.global_batch(i))
        np.testing.assert_allclose(float(loss), multi[i], rtol=1e-5, err_msg=f"step {i} after the restore")
    # and the final state agrees with the single-device jax.jit run (relative to each leaf's size)
    ref_params, ref_opt = spec.init(jax.random.key(0))
    jstep = jax.jit(spec.train_step)
    for i in range(1, STEPS + 1):
        ref_params, ref_opt, _ = jstep(ref_params, ref_opt, data.global_batch(i))
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        got, want = np.asarray(got), np.asarray(want)
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-6
