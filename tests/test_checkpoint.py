"""Checkpoints: round trip, restore onto another mesh or plan, pruning, atomicity, corruption."""

import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoplan
from autoplan import checkpoint
from autoplan._src.emit import input_named_shardings

TMP = ".orbax-checkpoint-tmp"


def _mesh(shape, names, n=None):
    return jax.make_mesh(shape, names, devices=jax.devices()[: n or int(np.prod(shape))])


def _state(mesh, seed=0):
    """A small sharded state with a bf16 leaf, a numpy leaf and a Python number."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = jax.device_put(jax.random.normal(k1, (16, 32)), NamedSharding(mesh, P("data", "model")))
    e = jax.device_put(jax.random.normal(k2, (8, 4)).astype(jnp.bfloat16), NamedSharding(mesh, P("data")))
    return {"params": {"w": w, "emb": e}, "rng": np.arange(4, dtype=np.uint32) + seed, "count": 7 + seed}


def _target(state):
    return jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else x, state)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(autouse=True)
def _close_cached():
    yield
    checkpoint.close()


def _data_files(step_dir: pathlib.Path):
    """Array data files of a step, largest first."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


# -- round trips ------------------------------------------------------------------


def test_roundtrip_sharded_state(tmp_path):
    mesh = _mesh((2, 4), ("data", "model"))
    state = _state(mesh)
    checkpoint.save(tmp_path, state, step=5, asynchronous=False)
    restored, step = checkpoint.restore(tmp_path, _target(state))
    assert step == 5
    _assert_tree_equal(restored, state)
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding
    assert restored["params"]["emb"].dtype == jnp.bfloat16
    assert isinstance(restored["rng"], np.ndarray) and restored["count"] == 7


def test_restore_onto_other_mesh(tmp_path):
    mesh8 = _mesh((8,), ("data",))
    w = jax.device_put(jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16), NamedSharding(mesh8, P("data")))
    checkpoint.save(tmp_path, {"w": w}, step=1)

    mesh4 = _mesh((4,), ("x",))
    target = NamedSharding(mesh4, P(None, "x"))
    restored, _ = checkpoint.restore(tmp_path, {"w": target})
    assert restored["w"].sharding == target
    assert len(restored["w"].sharding.device_set) == 4
    assert restored["w"].addressable_shards[0].data.shape == (8, 4)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(w))

    # A ShapeDtypeStruct target onto a (2, 4) tensor-parallel layout.
    tp = NamedSharding(_mesh((2, 4), ("data", "model")), P("model", "data"))
    restored, _ = checkpoint.restore(tmp_path, {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=tp)})
    assert restored["w"].sharding == tp
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(w))


def test_restore_onto_plan(tmp_path):
    spec = autoplan.models.get("mlp-tiny")
    params, opt_state = spec.init(jax.random.key(0))
    dp = NamedSharding(_mesh((8,), ("data",)), P())
    params, opt_state = jax.device_put((params, opt_state), dp)
    checkpoint.save(tmp_path, (params, opt_state), step=3)

    # ZeRO-3 layouts: every large leaf is split, so restoring really reshards.
    plan = autoplan.baselines.fsdp(spec.train_step, params, opt_state, spec.make_batch(jax.random.key(1)),
                                   mesh=jax.sharding.AbstractMesh((2, 4), ("data", "model")))
    (r_params, r_opt), step = checkpoint.restore(tmp_path, plan)
    assert step == 3
    _assert_tree_equal((r_params, r_opt), (params, opt_state))
    expected = input_named_shardings(plan)[:2]
    got = [x.sharding for x in jax.tree.leaves((r_params, r_opt))]
    assert got == jax.tree.leaves(expected)
    assert any(not s.is_fully_replicated for s in got)  # the plan really reshards something

    # A dict keyed by the step's argument names works too, for any subset of them.
    checkpoint.save(tmp_path, {"params": params}, step=4)
    restored, step = checkpoint.restore(tmp_path, plan)
    assert step == 4 and list(restored) == ["params"]
    _assert_tree_equal(restored["params"], params)
    assert [x.sharding for x in jax.tree.leaves(restored)] == jax.tree.leaves(expected[0])


# -- pruning and asynchronous saves ---------------------------------------------------


def test_keep_prunes_old_checkpoints(tmp_path):
    mesh = _mesh((2, 4), ("data", "model"))
    with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(_state(mesh, seed=step), step)
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40]
        assert ckpt.latest_step() == 40
        restored, step = ckpt.restore(_target(_state(mesh)), step=30)
    assert step == 30
    _assert_tree_equal(restored, _state(mesh, seed=30))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["30", "40"]


def test_async_save_returns_before_commit_and_survives_donation(tmp_path):
    mesh = _mesh((8,), ("data",))
    w = jax.device_put(jax.random.normal(jax.random.key(0), (1024, 512)), NamedSharding(mesh, P("data")))
    expected = np.asarray(w)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save({"w": w}, step=1)
    w.delete()  # the training loop may donate/overwrite the buffers once save returns
    ckpt.wait()
    assert ckpt.latest_step() == 1 and checkpoint.latest_step(tmp_path) == 1
    restored, _ = ckpt.restore({"w": NamedSharding(mesh, P(None, "data"))})
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected)
    ckpt.close()
    with pytest.raises(checkpoint.CheckpointError, match="closed"):
        ckpt.save({"w": expected}, step=2)


def test_module_functions_share_one_manager_and_wait(tmp_path):
    for step in range(1, 5):
        checkpoint.save(tmp_path, {"x": jnp.full((4,), step)}, step, keep=3)
    checkpoint.wait_until_finished(tmp_path)
    assert checkpoint.all_steps(tmp_path) == [2, 3, 4]
    restored, step = checkpoint.restore(tmp_path, {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
    assert step == 4 and np.asarray(restored["x"]).tolist() == [4, 4, 4, 4]

    for step in range(1, 6):
        checkpoint.save(tmp_path / "all", {"x": jnp.full((4,), step)}, step, keep=None)
    checkpoint.wait_until_finished()
    assert checkpoint.all_steps(tmp_path / "all") == [1, 2, 3, 4, 5]


def test_save_rejects_existing_step_and_bad_arguments(tmp_path):
    checkpoint.save(tmp_path, {"x": jnp.ones(2)}, step=1)
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        checkpoint.save(tmp_path, {"x": jnp.ones(2)}, step=1)
    with pytest.raises(TypeError, match="save\\(state, step\\)"):
        checkpoint.Checkpointer(tmp_path / "other").save(2, {"x": jnp.ones(2)})
    with pytest.raises(ValueError, match="keep"):
        checkpoint.Checkpointer(tmp_path, keep=0)


# -- errors -------------------------------------------------------------------------


def test_different_model_names_first_mismatching_path(tmp_path):
    spec = autoplan.models.get("mlp-tiny")
    params, opt_state = spec.init(jax.random.key(0))
    checkpoint.save(tmp_path, (params, opt_state), step=1)

    other = autoplan.models.get("mlp-tiny", hidden=32)
    o_params, o_opt = other.abstract_state()
    plan = autoplan.plan(other.train_step, o_params, o_opt, other.abstract_batch(), num_devices=8)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(tmp_path, plan)
    message = str(info.value)
    assert "'params/block0/bias'" in message  # first leaf in flatten order that differs
    assert "saved (64,) float32, expected (32,) float32" in message
    assert "different model" in message

    # A pytree target: paths are pytree key paths; dtype and structure are checked too.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), (params, opt_state))
    target[0]["head"]["kernel"] = jax.ShapeDtypeStruct((64, 8), jnp.bfloat16, sharding=sharding)
    with pytest.raises(checkpoint.CheckpointError, match=r"'0/head/kernel'.*saved \(64, 8\) float32, expected "
                                                         r"\(64, 8\) bfloat16"):
        checkpoint.restore(tmp_path, target)
    del target[0]["head"]
    with pytest.raises(checkpoint.CheckpointError, match="'0/head/bias'.*which the target lacks"):
        checkpoint.restore(tmp_path, target)


def test_no_checkpoint(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.restore(missing, {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
    assert not missing.exists()  # a restore never creates the directory
    assert checkpoint.latest_step(missing) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.restore(tmp_path / "empty", {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
    checkpoint.save(tmp_path / "one", {"x": jnp.ones(2)}, step=1)
    with pytest.raises(checkpoint.CheckpointError, match=r"no committed checkpoint 2 .*committed steps: \[1\]"):
        checkpoint.restore(tmp_path / "one", {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])}, step=2)


def _truncate(step_dir):
    f = _data_files(step_dir)[0]
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _delete_data(step_dir):
    _data_files(step_dir)[0].unlink()


def _flip_bits(step_dir):
    f = _data_files(step_dir)[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # readable, but wrong: only the checksum catches this
    f.write_bytes(bytes(data))


def _delete_array_metadata(step_dir):
    (step_dir / "default" / "_METADATA").unlink()


def _delete_step_metadata(step_dir):
    (step_dir / "_CHECKPOINT_METADATA").unlink()


def _tamper_checksum(step_dir):
    # Data that reads back fine but differs from what was saved: only the checksum can tell.
    meta_file = step_dir / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    meta["custom_metadata"]["autoplan"]["digests"]["w"] ^= 1
    meta_file.write_text(json.dumps(meta))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's aborted reads
@pytest.mark.parametrize("corrupt", [_truncate, _delete_data, _flip_bits, _tamper_checksum,
                                     _delete_array_metadata, _delete_step_metadata],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_checkpoint_detected_and_previous_restores(tmp_path, corrupt):
    mesh = _mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    states = {s: {"w": jax.device_put(jax.random.normal(jax.random.key(s), (256, 128)), sharding)} for s in (1, 2)}
    with checkpoint.Checkpointer(tmp_path, asynchronous=False) as ckpt:
        for s, state in states.items():
            ckpt.save(state, s)
    corrupt(tmp_path / "2")

    target = {"w": NamedSharding(mesh, P(None, "data"))}
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(tmp_path, target)
    assert str(tmp_path / "2") in str(info.value)
    assert "step=1" in str(info.value)  # the hint points at the previous checkpoint
    if corrupt is _tamper_checksum:
        assert "does not match the checksum" in str(info.value)
    restored, step = checkpoint.restore(tmp_path, target, step=1)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(states[1]["w"]))


def test_uncommitted_tmp_dir_is_ignored_and_cleaned(tmp_path):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpoint.save(tmp_path, {"x": jnp.full((3,), 1.0)}, step=1, asynchronous=False)
    checkpoint.save(tmp_path, {"x": jnp.full((3,), 2.0)}, step=2, asynchronous=False)
    checkpoint.close()
    # What a crash during the write of step 3 leaves: orbax's temporary directory, never renamed.
    partial = tmp_path / f"3{TMP}"  # the name orbax 0.12 uses
    shutil.copytree(tmp_path / "2", partial)
    (partial / "commit_success.txt").unlink()

    assert checkpoint.latest_step(tmp_path) == 2
    restored, step = checkpoint.restore(tmp_path, {"x": sharding})
    assert step == 2 and np.asarray(restored["x"]).tolist() == [2.0] * 3
    with pytest.raises(checkpoint.CheckpointError, match="uncommitted temporary directory"):
        checkpoint.restore(tmp_path, {"x": sharding}, step=3)
    assert partial.exists()  # a reader leaves it alone (it may be another job's save in flight)

    checkpoint.save(tmp_path, {"x": jnp.full((3,), 3.0)}, step=3)  # a writer cleans it up
    checkpoint.wait_until_finished()
    assert not partial.exists()
    assert checkpoint.restore(tmp_path, {"x": sharding})[1] == 3

    only_tmp = tmp_path / "only-tmp"
    only_tmp.mkdir()
    shutil.copytree(partial.parent / "3", only_tmp / f"7{TMP}-1712345678")  # older orbax names
    with pytest.raises(checkpoint.CheckpointError, match="only uncommitted temporary directories"):
        checkpoint.restore(only_tmp, {"x": sharding})


_CRASHING_TRAINER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from autoplan import checkpoint

    mesh = jax.make_mesh((8,), ("data",))
    base = jax.device_put(jax.random.normal(jax.random.key(0), (2048, 1024)), NamedSharding(mesh, P("data")))
    with checkpoint.Checkpointer(sys.argv[1], keep=2) as ckpt:
        for step in range(1, 10_000):
            ckpt.save({"w": base + step, "v": base * step}, step)
            print("started", step, flush=True)
            ckpt.wait()
            print("committed", step, flush=True)
""")


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(_CRASHING_TRAINER)
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    committed, killed_at = 0, None
    deadline = time.monotonic() + 60
    try:
        while killed_at is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                assert proc.poll() is None, "the trainer exited early"
                continue
            kind, step = proc.stdout.readline().split()
            if kind == "committed":
                committed = int(step)
            elif int(step) >= 3:
                # Pull the plug once the background writer has started this step's files.
                while time.monotonic() < deadline and not any(
                        p.name.startswith(f"{step}.") or p.name == step for p in ckpt_dir.iterdir()):
                    time.sleep(0.002)
                killed_at = int(step)
        assert killed_at is not None, "the trainer did not reach step 3 in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert committed == killed_at - 1

    latest = checkpoint.latest_step(ckpt_dir)
    partial = [p.name for p in ckpt_dir.iterdir() if TMP in p.name]
    # Either the kill landed mid-save (an uncommitted temporary directory, ignored) or just
    # after orbax's final rename (then that step is complete).
    assert (latest == committed and partial == [f"{killed_at}{TMP}"]) or (latest == killed_at and not partial)
    base = np.asarray(jax.random.normal(jax.random.key(0), (2048, 1024)))
    mesh = _mesh((4,), ("x",))
    target = {"w": NamedSharding(mesh, P("x")), "v": NamedSharding(mesh, P(None, "x"))}
    restored, step = checkpoint.restore(ckpt_dir, target)
    assert step == latest
    np.testing.assert_array_equal(np.asarray(restored["w"]), (base + latest).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(restored["v"]), (base * latest).astype(np.float32))

    # Resuming: a writer reopens the directory, drops the partial save and carries on.
    checkpoint.save(ckpt_dir, restored, latest + 1, keep=2)
    checkpoint.wait_until_finished()
    assert not [p for p in ckpt_dir.iterdir() if TMP in p.name]
    assert checkpoint.all_steps(ckpt_dir) == [latest, latest + 1]
