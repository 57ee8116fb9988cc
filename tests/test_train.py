"""The generic training loop: multi-device equivalence, exact resume (also after SIGTERM),
checkpoints, and fast clear failures on bad input. Real images: scikit-learn's digits."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from bow_jax import pretrain, tasks
from bow_jax.tasks import common
from bow_jax.tasks import train as train_task
from bow_jax.protocols import api, runner
from bow_jax.data.splits import load_split
from bow_jax.lib import sharding, stop, writers
from bow_jax.config import base_config
from loop_helpers import run_steps  # tests/ is on sys.path (pytest's rootdir import mode)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    c = base_config("rotnet")
    c.model.name = "resnet18"
    c.model.kwargs.width = 4
    c.model.kwargs.cifar_stem = True
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.limit = 256
    c.rotnet.crop_padding = 1
    c.batch_size = 16
    c.num_train_steps = 4
    c.optim.schedule = "step"
    c.steps_per_epoch = 2
    c.optim.milestones = (1,)  # a decay inside the run: the step count must resume too
    c.optim.nesterov = True
    c.log_every = 1
    c.checkpoint_every_steps = 2
    c.eval.after_training = False
    c.update_from_flattened_dict(overrides)
    return c


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_one_and_eight_devices_give_the_same_parameters():
    assert jax.device_count() == 8
    config = tiny_config()
    one = run_steps(config, sharding.make_mesh(jax.devices()[:1]), 3)
    eight = run_steps(config, sharding.make_mesh(), 3)
    assert int(one.step) == int(eight.step) == 3
    assert_trees_close(one.params, eight.params, atol=1e-5)
    assert_trees_close(one.batch_stats, eight.batch_stats, atol=1e-5)


def final_state(config, workdir):
    with common.restore(config, workdir) as run:
        return jax.device_get(run.state)


def test_resume_and_sigterm_reach_the_uninterrupted_result(tmp_path):
    config = tiny_config()
    full = str(tmp_path / "full")
    train_task.run(config, full)

    # Stopped by the step budget after 2 steps, then resumed for 2 more.
    split = str(tmp_path / "split")
    train_task.run(tiny_config(num_train_steps=2), split)
    train_task.run(config, split)

    # Stopped by SIGTERM after step 1 (a checkpoint is written there), then resumed.
    term = str(tmp_path / "term")

    def sigterm_at_1(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(stop.Stopped, match="step 1/4, saved in"):
        train_task.run(config, term, hooks=[sigterm_at_1])
    assert final_state(config, term).step == 1
    train_task.run(config, term)

    want = final_state(config, full)
    assert int(want.step) == 4
    want_metrics = {r["step"]: r for r in writers.read_jsonl(os.path.join(full, "metrics.jsonl"))}
    for workdir in (split, term):
        got = final_state(config, workdir)
        assert int(got.step) == 4
        assert_trees_close(got.params, want.params, atol=1e-6)
        assert_trees_close(got.opt_state, want.opt_state, atol=1e-6)
        metrics = {r["step"]: r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
        for step in (3, 4):
            for name in ("loss", "rotation_accuracy", "lr"):
                assert metrics[step][name] == pytest.approx(want_metrics[step][name], abs=1e-6)


def test_resuming_on_another_number_of_devices_says_so(capsys):
    """The checkpoint records its device count (`pretrain.DEVICES_META`); resuming it on
    another count is a valid run but not bit for bit the same: one warning says so."""
    common.warn_device_change({pretrain.DEVICES_META: 8}, 12, 8)
    common.warn_device_change({}, 12, 1)  # a new run, or a checkpoint that did not record it
    assert capsys.readouterr().err == ""
    common.warn_device_change({pretrain.DEVICES_META: 8}, 12, 1)
    assert ("warning: resuming step 12, saved by a run on 8 devices, on 1: the same batches"
            in capsys.readouterr().err)


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    """A crash after the last checkpoint leaves metric rows (and maybe a torn line) for steps
    that the resumed run repeats; the file must end with each step once, as logged on resume."""
    config = tiny_config()
    workdir = str(tmp_path)
    train_task.run(tiny_config(num_train_steps=2), workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a", encoding="utf-8") as f:  # what the crashed run had logged past step 2
        f.write('{"step": 3, "loss": 123.0}\n{"step": 4, "lo')
    train_task.run(config, workdir)
    rows = writers.read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] != 123.0


def test_checkpoints_keep_last_n_plus_every_kth(tmp_path):
    config = tiny_config(num_train_steps=8, checkpoint_every_steps=1, keep_checkpoints=2,
                         keep_every_steps=3)
    train_task.run(config, str(tmp_path))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [3, 6, 7, 8]


def test_checkpoint_from_another_model_is_refused(tmp_path):
    train_task.run(tiny_config(num_train_steps=1), str(tmp_path))
    with pytest.raises(ValueError, match="config.model"):
        common.restore(tiny_config(**{"model.kwargs.width": 8}), str(tmp_path))


def test_batch_that_does_not_divide_over_devices_fails_fast(tmp_path):
    with pytest.raises(ValueError, match=r"config.batch_size=12 .*number of devices \(8\)"):
        common.restore(tiny_config(batch_size=12), str(tmp_path))


def test_missing_dataset_names_the_field(tmp_path):
    config = tiny_config(**{"data.source": "npz", "data.path": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="config.data.path"):
        common.restore(config, str(tmp_path))


def test_unknown_task_and_method_are_named(tmp_path):
    with pytest.raises(ValueError, match="config.task"):
        tasks.run(tiny_config(task="fly"), str(tmp_path))
    with pytest.raises(ValueError, match="config.method"):
        common.restore(tiny_config(method="simclr"), str(tmp_path))


def test_command_line_rejects_an_unknown_config_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bow_jax.main", "--config=configs/demo.py",
         f"--workdir={tmp_path}", "--config.optim.lrr=0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0
    assert "lrr" in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_evaluate_task_scores_the_latest_checkpoint(tmp_path):
    config = tiny_config(num_train_steps=2)
    train_task.run(config, str(tmp_path))
    config = tiny_config(task="evaluate")
    config.eval.linear_epochs = 2
    config.eval.fewshot_episodes = 10
    config.eval.fewshot_shots = (1,)
    config.eval.fewshot_queries = 5
    config.eval.test_limit = 100
    config.eval.random_init = True
    results = tasks.run(config, str(tmp_path))
    assert set(results) == {"rotnet step 2", "random init"}
    for scores in results.values():
        assert 0 <= scores["linear"]["top1"] <= 1 and 0 <= scores["knn"]["top1"] <= 1
        assert 0 <= scores["fewshot"]["5way_1shot"]["mean"] <= 1
        assert 0 <= scores["pretext"]["rotation_accuracy"] <= 1
    with open(tmp_path / "eval" / "results.md", encoding="utf-8") as f:
        assert "| rotnet step 2 |" in f.read()


def test_evaluate_task_scores_chosen_checkpoints_as_a_learning_curve(tmp_path):
    """eval.checkpoint_steps: one row per kept checkpoint, each equal to scoring that step's state
    directly; eval.train_limit fits the probes on the first N training images; a step that was
    not kept is a clear error naming the kept ones."""
    config = tiny_config(num_train_steps=4, checkpoint_every_steps=1, keep_checkpoints=1,
                         keep_every_steps=2)
    train_task.run(config, str(tmp_path))
    config = tiny_config(task="evaluate", keep_checkpoints=1, keep_every_steps=2)
    config.eval.protocols = ("knn",)
    config.eval.test_limit, config.eval.train_limit = 100, 128
    config.eval.checkpoint_steps = (2, 4)
    results = tasks.run(config, str(tmp_path))
    assert list(results) == ["rotnet step 2", "rotnet step 4"]
    assert results["rotnet step 2"] != results["rotnet step 4"]

    with common.restore(config, str(tmp_path)) as run:
        data = load_split(config, "train")
        direct = runner.score(api.Encoder(run.method.encode, run.state),
                              data.subset(np.arange(128)), load_split(config, "test"), config,
                              run.mesh, pretext_scores=run.method.pretext_scores)
    assert results["rotnet step 4"] == direct

    config.eval.checkpoint_steps = (3,)
    with pytest.raises(ValueError, match=r"checkpoint_steps.*\[3\].*kept: \[2, 4\]"):
        tasks.run(config, str(tmp_path))


def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tasks.run(tiny_config(task="evaluate"), str(tmp_path))
