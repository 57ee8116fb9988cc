"""Long runs that lose nothing: non-finite guard, checkpoint integrity and fallback, one writer per
workdir, agreed stops across processes, a dead process, the host's run-ahead bound, and a state
shape mismatch named by config field. Tiny RotNet on scikit-learn's digits (as tests/test_train)."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.lib import loop
from bow_jax.lib import checkpoint, lock, sharding, stop, writers
from bow_jax.data.splits import load_split
from bow_jax.methods import create_method, data_info_for
from bow_jax.tasks import common
from bow_jax.tasks import train as train_task
from test_train import tiny_config  # tests/ is on sys.path (pytest's rootdir import mode)
import fault_worker  # noqa: E402
import obow_multihost_worker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ------------------------------------------------------------------------------------------------
# Fingerprint and finiteness (unit)


def numpy_checksum(x) -> list:
    """Independent reference: [sum w_i, sum w_i * (1 + i * 2654435761)] mod 2**32 over the uint32
    words of x's bit pattern (2-byte and 1-byte values widened)."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    words = {4: lambda a: a.view(np.uint32), 2: lambda a: a.view(np.uint16),
             1: lambda a: a.view(np.uint8)}[x.dtype.itemsize](x.reshape(-1)).astype(np.uint64)
    weights = (np.arange(words.size, dtype=np.uint64) * 2654435761 + 1) % 2**32
    return [int(words.sum() % 2**32), int(((words * weights) % 2**32).sum() % 2**32)]


def sample_tree():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
            "h": jnp.asarray(rng.normal(size=(9,)), jnp.bfloat16),
            "step": jnp.int32(7), "mask": jnp.asarray([True, False, True]),
            "queue": (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),),
            "rng": jax.random.key(3)}


def test_fingerprint_matches_numpy_and_survives_save_and_restore(tmp_path):
    tree = sample_tree()
    fingerprint, bad = checkpoint.inspect(tree)
    assert bad == []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        assert fingerprint[checkpoint.leaf_name(path)] == numpy_checksum(x), path
    # One changed word, or two swapped, changes the fingerprint.
    changed = dict(tree, w=tree["w"].at[2, 3].add(1e-6))
    swapped = dict(tree, w=tree["w"][::-1])
    for other in (changed, swapped):
        assert checkpoint.inspect(other)[0]["w"] != fingerprint["w"]
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(1, tree, {"method": "x"})
    ckpt.wait()
    assert ckpt.read_meta(1)["fingerprint"]["leaves"] == fingerprint
    restored = ckpt.restore(checkpoint.abstract_like(tree))
    assert checkpoint.inspect(restored)[0] == fingerprint
    ckpt.close()


def test_a_non_finite_state_is_never_saved(tmp_path):
    tree = dict(sample_tree(), queue=(jnp.full((3, 4), jnp.nan),))
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    with pytest.raises(checkpoint.NonFiniteError, match=r"Step 5.*queue/0"):
        ckpt.save(5, tree, {"method": "x"})
    ckpt.close()
    assert ckpt.all_steps() == []
    with pytest.raises(checkpoint.NonFiniteError, match=r"the step 5 state.*queue/0"):
        checkpoint.check_finite(tree, "the step 5 state")
    checkpoint.check_finite(sample_tree(), "fine")  # no error


# ------------------------------------------------------------------------------------------------
# Real runs: a good 4-step run (checkpoints 2 and 4), copied for each fault


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("good"))
    train_task.run(tiny_config(), workdir)
    with common.restore(tiny_config(), workdir) as run:
        state = jax.device_get(run.state)
    return workdir, state


def copy_run(good_run, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(good_run[0], workdir)
    return workdir


def steps_in(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def assert_same_state(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_nan_loss_stops_with_a_named_error_and_keeps_the_good_checkpoints(good_run, tmp_path):
    """Case 1: resumed over a finished good run with a diverging lr and a longer run; the
    error names the step, the loss terms and config.optim.lr; the good checkpoints stay."""
    workdir = copy_run(good_run, tmp_path)
    config = tiny_config(num_train_steps=12, keep_checkpoints=2, **{"optim.lr": 1e8})
    with pytest.raises(checkpoint.NonFiniteError,
                       match=r"step \d+\b.*loss.*config\.optim\.lr=100000000\.0"):
        train_task.run(config, workdir)
    steps = steps_in(workdir)
    assert 4 in steps and max(steps) < 12
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    for step in steps:  # every kept checkpoint verifies and is finite
        state = ckpt.restore(None, step=step)  # raw: still verified against its fingerprint
        checkpoint.check_finite(state, f"step {step}")
    ckpt.close()


def corrupt_largest_data_file(step_dir, how):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "random":
            f.seek(size // 2 - min(512, size // 4))
            f.write(np.random.default_rng(0).bytes(min(1024, size // 2)))
        else:
            f.truncate(size // 2)


@pytest.mark.parametrize("how", ["random", "truncate", "meta"])
def test_a_corrupted_checkpoint_is_skipped_and_moved_aside(good_run, tmp_path, how, capsys):
    """Case 2: the newest step is damaged; restore falls back to step 2 with a warning naming the
    folder, moves the damaged one aside (not deleted), and (random bytes) the resumed run saves
    step 4 again and ends bit-identical to the uninterrupted run."""
    workdir = copy_run(good_run, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    if how == "meta":
        meta = os.path.join(step_dir, "meta", "metadata")
        with open(meta, "r+b") as f:
            f.truncate(os.path.getsize(meta) // 2)
    else:
        corrupt_largest_data_file(step_dir, how)
    with common.restore(tiny_config(), workdir) as run:
        assert run.restored_step == 2
    warned = capsys.readouterr().err
    assert f"warning: skipping checkpoint: {step_dir}" in warned and "moved the damaged" in warned
    assert steps_in(workdir) == [2]
    assert len(glob.glob(os.path.join(workdir, "checkpoints", "corrupt-4-*"))) == 1
    if how == "random":
        train_task.run(tiny_config(), workdir)
        assert steps_in(workdir) == [2, 4]
        with common.restore(tiny_config(), workdir) as run:
            assert_same_state(jax.device_get(run.state), good_run[1])


def test_no_intact_checkpoint_names_every_folder_and_moves_nothing(good_run, tmp_path):
    workdir = copy_run(good_run, tmp_path)
    for step in (2, 4):
        corrupt_largest_data_file(os.path.join(workdir, "checkpoints", str(step)), "truncate")
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"(?s)No intact checkpoint.*checkpoints/4.*checkpoints/2.*backup"):
        common.restore(tiny_config(), workdir)
    assert steps_in(workdir) == [2, 4]


def test_incomplete_step_folders_are_skipped_for_train_and_evaluate(good_run, tmp_path, capsys):
    """Case 3: an empty checkpoints/12 and a checkpoints/8 without its state item."""
    workdir = copy_run(good_run, tmp_path)
    os.makedirs(os.path.join(workdir, "checkpoints", "12"))
    shutil.copytree(os.path.join(workdir, "checkpoints", "4", "meta"),
                    os.path.join(workdir, "checkpoints", "8", "meta"))
    with common.restore(tiny_config(task="evaluate"), workdir) as run:
        assert run.restored_step == 4
        assert_same_state(jax.device_get(run.state), good_run[1])
    warned = capsys.readouterr().err
    assert "checkpoints/12 is incomplete" in warned
    assert "checkpoints/8 is incomplete: no state" in warned
    assert steps_in(workdir) == [2, 4]
    assert len(glob.glob(os.path.join(workdir, "checkpoints", "incomplete-*"))) == 2


def test_state_shape_mismatch_names_the_config_field(tmp_path):
    """Case 7: OBoW resumed with another config.obow.num_words (shapes compared on the metadata
    tree before restoring, whatever Orbax would say)."""
    config = obow_multihost_worker.tiny_config(fast=True)
    info = data_info_for(config, load_split(config, "train"))
    state = jax.jit(create_method(config, info).init_state)(jax.random.key(0))
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(0, state, config)
    ckpt.wait()
    other = obow_multihost_worker.tiny_config(fast=True)
    other.obow.num_words = 64
    abstract = jax.eval_shape(create_method(other, info).init_state, jax.random.key(0))
    with pytest.raises(ValueError, match=r"config\.obow\.num_words: 32 -> 64.*Arrays"):
        ckpt.restore(abstract, other)
    ckpt.close()


# ------------------------------------------------------------------------------------------------
# One writer per workdir


HOLDER = ("import sys, time; from bow_jax.lib import lock\n"
          "with lock.WorkdirLock(sys.argv[1]):\n"
          "    print('locked', flush=True); time.sleep(120)\n")


def test_a_second_writer_fails_at_once_and_a_killed_holder_never_blocks(tmp_path):
    """Case 4: the refusal names the workdir and the holder's pid; after SIGKILL of the holder
    the lock is free (the kernel drops it with the process)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(lock.WorkdirLockedError,
                           match=rf"--workdir={tmp_path} is in use.*pid {holder.pid} on host"):
            with lock.WorkdirLock(str(tmp_path)):
                pass
        assert time.monotonic() - start < 2
        # A folder inside the held workdir (a BoWNet chain's stage, eval/) is the holder's too.
        with pytest.raises(lock.WorkdirLockedError,
                           match=rf"--workdir={tmp_path}/rotnet lies inside {tmp_path}, the "
                                 rf"workdir of another run: pid {holder.pid} on host"):
            with lock.WorkdirLock(str(tmp_path / "rotnet")):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with lock.WorkdirLock(str(tmp_path)):
        with lock.WorkdirLock(str(tmp_path)):  # re-entrant in one process
            with lock.WorkdirLock(str(tmp_path / "rotnet")):  # a stage of this process's run
                pass
    with lock.WorkdirLock(str(tmp_path / "rotnet")):  # the holder is gone: its lock file is free
        pass


def test_the_holders_command_keeps_its_start_and_its_last_overrides():
    """A refused run names the holder's command; a long one loses its middle, not its end,
    where the overrides that win are (a wrapper's defaults first, the user's last)."""
    command = ("python -m bow_jax.main --config=configs/obow_resnet50.py "
               + " ".join(f"--config.field_{i}=1" for i in range(60))
               + " --config.num_train_steps=40")
    short = lock.shortened(command)
    assert len(short) <= 600 and " ... " in short
    assert short.startswith("python -m bow_jax.main --config=configs/obow_resnet50.py")
    assert short.endswith("--config.field_59=1 --config.num_train_steps=40")
    assert lock.shortened("python -m bow_jax.main") == "python -m bow_jax.main"


# ------------------------------------------------------------------------------------------------
# Stops and run-ahead (single process)


def test_a_signal_sets_the_local_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with stop.AgreedStop() as stopper:
        assert not stopper.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is before


def slow_step(x):
    """~tens of ms of device work per call on CPU."""
    return jax.lax.fori_loop(0, 60, lambda i, a: jnp.tanh(a @ a.T) @ a, x)


@pytest.mark.parametrize("depth,bounded", [(2, True), (10**6, False)])
def test_run_ahead_keeps_at_most_depth_steps_in_flight(depth, bounded):
    """Case 6: the host waits for step N-2 before dispatching step N; without the bound (the
    control) the host queues many more steps than 2."""
    step = jax.jit(slow_step)
    x = jnp.ones((192, 192), jnp.float32) / 192
    step(x).block_until_ready()  # compiled
    run_ahead = loop.RunAhead(depth)
    most = 0
    for _ in range(8):
        run_ahead.before_dispatch()
        x = step(x)
        run_ahead.after_dispatch({"x": x})
        most = max(most, run_ahead.in_flight())
    jax.block_until_ready(x)
    assert (most <= 2) if bounded else (most > 2)


# ------------------------------------------------------------------------------------------------
# Two processes (jax.distributed on loopback, gloo): agreed stop and a dead peer


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two(workdir, mode, timeout=300):
    """Runs tests/fault_worker.py as processes 0 and 1; returns ([rc0, rc1], [out0, out1],
    seconds from start to process 0's exit)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    port = _free_port()
    logs = [open(os.path.join(workdir, f"log_{i}.txt"), "w+", encoding="utf-8")  # noqa: SIM115
            for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "fault_worker.py"), str(i),
                               str(port), workdir, mode], env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    exited = []
    try:
        for p in procs:
            p.wait(timeout=timeout)
            exited.append(time.time())
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"2-process '{mode}' run did not end in {timeout} s (hang)")
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    if not all(os.path.exists(os.path.join(workdir, f"started_{i}")) for i in range(2)):
        pytest.skip("jax.distributed processes could not start here:\n" + outs[0][-2000:])
    return [p.returncode for p in procs], outs, exited


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_resumes(tmp_path):
    """Case 5: SIGTERM to process 1 only after step 2; both save step 2 and exit 0; the same
    command then runs to the end (step 6)."""
    workdir = str(tmp_path)
    rcs, outs, _ = run_two(workdir, "term1")
    assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    for i in range(2):
        assert f"RESULT {i} 2" in outs[i], outs[i][-3000:]
    assert "Stop requested by process(es) [1]" in outs[0]
    assert steps_in(workdir) == [2]
    rcs, outs, _ = run_two(workdir, "train")
    assert rcs == [0, 0], outs[0][-3000:]
    assert "RESULT 0 6" in outs[0] and "RESULT 1 6" in outs[1]


def test_a_killed_process_makes_the_other_fail_within_the_heartbeat_bound(tmp_path):
    """SIGKILL of process 1 after step 2: process 0 exits non-zero with JAX's 'another task
    died' error within the heartbeat timeout (10 s in the worker) plus slack, never hangs."""
    rcs, outs, exited = run_two(str(tmp_path), "kill1", timeout=240)
    assert rcs[1] == -signal.SIGKILL
    assert rcs[0] != 0
    assert "another task died" in outs[0] or "heartbeat" in outs[0], outs[0][-3000:]
    killed = float(outs[1].split("KILLED 1 at ")[1].split()[0])
    assert exited[0] - killed < 10 + 30


def test_two_processes_monitor_and_evaluate_like_one(tmp_path):
    """The evaluation's multi-process path, for real: 2 processes x 2 devices train with the
    k-NN monitor every 3 steps, then score the run (features streamed by each process and
    gathered, the augmented-image linear probe sharded over both, few-shot, k-NN). The monitor's
    rows and the results equal those of one process with the same 4 devices."""
    rcs, outs, _ = run_two(str(tmp_path), "evaluate")
    assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    rows = writers.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    two_knn = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    assert sorted(two_knn) == [3, 6]
    with open(os.path.join(tmp_path, "eval", "results.json")) as f:
        two = json.load(f)["rotnet step 6"]

    one_dir = str(tmp_path / "one")
    mesh4 = sharding.make_mesh(jax.devices()[:4])
    with mock.patch.object(sharding, "make_mesh", lambda devices=None: mesh4):
        train_task.run(fault_worker.evaluated_config(), one_dir)
    rows = writers.read_jsonl(os.path.join(one_dir, "metrics.jsonl"))
    assert {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r} == pytest.approx(
        two_knn, abs=1e-6)
    with open(os.path.join(one_dir, "eval", "results.json")) as f:
        one = json.load(f)["rotnet step 6"]
    assert one["linear"]["top1"] == pytest.approx(two["linear"]["top1"], abs=0.02)
    assert one["knn"] == pytest.approx(two["knn"], abs=1e-6)
    for name, value in one["fewshot"].items():
        assert value["mean"] == pytest.approx(two["fewshot"][name]["mean"], abs=1e-6)
