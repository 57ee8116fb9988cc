"""OBoW: every piece of one training step against numpy, multi-device and multi-process equality,
exact resume, and fast clear failures. Real images: scikit-learn's digits; tiny ResNets."""
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.bow import vocabulary as voc
from bow_jax.data.splits import load_split
from bow_jax.lib import schedules, sharding
from bow_jax.methods import DataInfo, interface, create_method, data_info_for, obow
from bow_jax.tasks import common
from bow_jax.tasks import train as train_task

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import obow_multihost_worker as worker  # noqa: E402  (shared with the multi-process workers)


# ------------------------------------------------------------------------------------------------
# numpy references, written from the paper / official code formulas


def np_momentum(t, total, base=0.99):
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * t / total))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_targets(fmap, vocab, m, inv_delta, momentum=0.99, border=1):
    """(bow [B,K], m_new): border skip, squared L2 by differences, statistic before codes,
    softmax, max over locations, L1."""
    f = np.asarray(fmap, np.float64)[:, border:-border, border:-border]
    dist = ((f[..., None, :] - np.asarray(vocab, np.float64)) ** 2).sum(-1)
    m_new = momentum * m + (1 - momentum) * dist.min(-1).mean()
    codes = np_softmax(-(inv_delta / m_new) * dist)
    bow = codes.max(axis=(1, 2))
    return bow / bow.sum(-1, keepdims=True), m_new


def np_local_average_word(fmap, row, col, border=1):
    """The 3x3 average of the border-cropped map whose window starts at (row, col)."""
    f = np.asarray(fmap, np.float64)[border:-border, border:-border]
    return f[row:row + 3, col:col + 3].mean(axis=(0, 1))


def np_generator(p, words):
    """L2norm -> Linear(no bias) -> BN over the K words (batch stats) -> ReLU -> Linear -> L2norm."""
    h = np_l2n(np.asarray(words, np.float64)) @ np.asarray(p["fc1"]["kernel"], np.float64)
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    w = np.maximum(h, 0) @ np.asarray(p["fc2"]["kernel"], np.float64) + p["fc2"]["bias"]
    return np_l2n(w)


def np_soft_ce(logits, targets):
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -(targets * logp).sum(-1).mean()


def np_conv3x3(x, kernel):
    """Stride-1, pad-1 convolution of NHWC x with an HWIO kernel, by shifted sums."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1] - 2, x.shape[2] - 2
    out = 0
    for i in range(3):
        for j in range(3):
            out = out + x[:, i:i + h, j:j + w] @ np.asarray(kernel[i, j], np.float64)
    return out


def assert_trees_close(a, b, atol):
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------
# One step of the tiny config, shared by the tests below (compiled once on one device).


@pytest.fixture(scope="module")
def one_step():
    config = worker.tiny_config()
    data = load_split(config, "train")
    method = create_method(config, data_info_for(config, data))
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = jax.jit(worker.prepared_state(method, config))()
    views = worker.random_views(config)
    new_state, metrics = jax.jit(method.train_step)(
        jax.device_put(state, sharding.replicated(mesh)), sharding.shard_batch(views, mesh))
    return dict(config=config, method=method, state=jax.device_get(state), views=views,
                new_state=jax.device_get(new_state), metrics=jax.device_get(metrics))


def _student_groups_and_teacher(s, config):
    """The step's network inputs, by numpy (no photometric augmentation in this config):
    normalised views, crop groups flattened image-major; and the step's word-sampling key."""
    mean, std = (np.asarray(v, np.float32) for v in interface.normalization(config))
    norm = lambda v: ((v.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    views = s["views"]
    groups = [norm(views[k]).reshape((-1,) + views[k].shape[2:]) for k in ("crops", "patches")]
    copies = [views["crops"].shape[1], views["patches"].shape[1]]
    _, k_words = jax.random.split(jax.random.fold_in(s["state"].rng, s["state"].step))
    return norm(views["teacher"]), groups, copies, k_words


def test_step_matches_numpy(one_step):
    s = one_step
    config, cfg = s["config"], s["config"].obow
    state, new, metrics = s["state"], s["new_state"], s["metrics"]
    backbone = interface.backbone_from_config(config)
    levels = cfg.bow_levels
    total = worker.TOTAL_STEPS
    t = int(state.step)
    teacher_x, groups, copies, k_words = _student_groups_and_teacher(s, config)
    assert copies == [cfg.num_crops, cfg.num_patches]

    # Teacher: EMA of params with the pre-step student at momentum alpha_t.
    alpha = np_momentum(t, total)
    assert metrics["teacher_momentum"] == pytest.approx(alpha, abs=1e-7)
    want_teacher = jax.tree.map(lambda a, b: alpha * np.float64(a) + (1 - alpha) * np.float64(b),
                                state.teacher_params, state.params["backbone"])
    assert_trees_close(new.teacher_params, want_teacher, atol=1e-6)
    # Its params are not those of a plain copy: the test would see a missing EMA.
    assert not np.allclose(new.teacher_params["conv1"]["kernel"],
                           state.params["backbone"]["conv1"]["kernel"], atol=1e-4)

    apply = jax.jit(lambda v, x: backbone.apply(v, x, train=True, mutable=["batch_stats"]))
    feats, t_updates = apply({"params": new.teacher_params,
                              "batch_stats": state.teacher_batch_stats}, teacher_x)
    assert_trees_close(new.teacher_batch_stats, t_updates["batch_stats"], atol=1e-5)

    # Targets (statistic updated before the codes) and queue writes, per level.
    batch = config.batch_size
    targets = []
    for i, level in enumerate(levels):
        fmap = np.asarray(feats[level])
        bow, m_new = np_targets(fmap, state.vocabularies[i], float(state.mean_min_dist[i]),
                                cfg.inv_delta)
        targets.append(bow)
        assert float(new.mean_min_dist[i]) == pytest.approx(m_new, rel=1e-5)
        # Queue: one 3x3-averaged interior word per image, at the step's random locations,
        # written at the pointer (K - B here), which then wraps to 0; other rows unchanged.
        h = fmap.shape[1] - 2 * cfg.border - 2
        rows, cols = jax.device_get(voc.sample_locations(jax.random.fold_in(k_words, i),
                                                         batch, h, h))
        ptr = int(state.pointers[i])
        assert ptr == cfg.num_words - batch and int(new.pointers[i]) == 0
        want_queue = np.array(state.vocabularies[i], np.float64)
        for b in range(batch):
            want_queue[ptr + b] = np_local_average_word(fmap[b], rows[b], cols[b])
        np.testing.assert_allclose(new.vocabularies[i], want_queue, atol=1e-5)

    # Student: one BN pass per crop group, then the BoW head against the OLD vocabulary.
    pooled, stats = [], state.batch_stats["backbone"]
    for x in groups:
        out, upd = apply({"params": state.params["backbone"], "batch_stats": stats}, x)
        pooled.append(np.asarray(out["pooled"], np.float64))
        stats = upd["batch_stats"]
    assert_trees_close(new.batch_stats["backbone"], stats, atol=1e-5)
    head = state.params["bow_head"]
    weights = [np_generator(head[f"generator_{l}"], state.vocabularies[l])
               for l in range(len(levels))]
    group_losses = []
    for z, n in zip(pooled, copies):
        per_level = []
        for w, bow in zip(weights, targets):
            image_of_row = np.arange(len(z)) // n       # crops are flattened image-major
            per_level.append(np_soft_ce(cfg.kappa * z @ w.T, bow[image_of_row]))
        group_losses.append(np.mean(per_level))       # mean over levels
    assert metrics["loss_crops"] == pytest.approx(group_losses[0], rel=1e-4)
    assert metrics["loss_patches"] == pytest.approx(group_losses[1], rel=1e-4)
    assert metrics["loss"] == pytest.approx(sum(group_losses), rel=1e-4)  # sum over groups

    # The order matters and the test can see it: the statistic before its update, or the
    # vocabulary after the queue write, would give other targets.
    stale = np_targets(np.asarray(feats[levels[0]]), state.vocabularies[0], 10.0, cfg.inv_delta)[0]
    fresh = np_targets(np.asarray(feats[levels[0]]), state.vocabularies[0],
                       float(state.mean_min_dist[0]), cfg.inv_delta)[0]
    assert np.abs(stale - fresh).max() > 1e-3
    after_write = np_targets(np.asarray(feats[levels[0]]), new.vocabularies[0],
                             float(state.mean_min_dist[0]), cfg.inv_delta)[0]
    assert np.abs(after_write - targets[0]).max() > 1e-3

    # Learning rate at this step: OBoW's per-step warm-up then per-epoch cosine.
    spe, warm_epochs = config.steps_per_epoch, config.optim.warmup_epochs
    lr0, end = config.optim.lr, config.optim.end_lr
    assert t >= warm_epochs * spe  # past the warm-up (the R50 config test covers the warm-up)
    want_lr = end + (lr0 - end) * 0.5 * (1 + math.cos(
        math.pi * (t // spe - warm_epochs) / (total // spe - warm_epochs)))
    assert metrics["lr"] == pytest.approx(want_lr, rel=1e-6)
    assert int(new.step) == t + 1


def test_per_group_batch_norm_statistics_vs_numpy(one_step):
    """The stem BN's running mean/var after the step: updated once per crop group, in order,
    each time with that group's own batch statistics (numpy conv of the group's inputs)."""
    s = one_step
    config = s["config"]
    _, groups, _, _ = _student_groups_and_teacher(s, config)
    kernel = np.asarray(s["state"].params["backbone"]["conv1"]["kernel"])
    mean = np.asarray(s["state"].batch_stats["backbone"]["bn1"]["mean"], np.float64)
    var = np.asarray(s["state"].batch_stats["backbone"]["bn1"]["var"], np.float64)
    for x in groups:
        y = np_conv3x3(x, kernel).reshape(-1, kernel.shape[-1])
        mean = 0.9 * mean + 0.1 * y.mean(0)
        var = 0.9 * var + 0.1 * y.var(0, ddof=1)  # PyTorch: the unbiased batch variance
    got = s["new_state"].batch_stats["backbone"]["bn1"]
    np.testing.assert_allclose(got["mean"], mean, atol=1e-5)
    np.testing.assert_allclose(got["var"], var, rtol=1e-4)
    # One BN pass over both groups together would give other statistics.
    both = np.concatenate([np_conv3x3(x, kernel).reshape(-1, kernel.shape[-1]) for x in groups])
    together = 0.9 * np.asarray(s["state"].batch_stats["backbone"]["bn1"]["mean"]) + 0.1 * both.mean(0)
    assert np.abs(together - mean).max() > 1e-4


def test_eight_devices_give_the_same_state(one_step):
    s = one_step
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    new, metrics = jax.jit(s["method"].train_step)(
        jax.device_put(s["state"], sharding.replicated(mesh)),
        sharding.shard_batch(s["views"], mesh))
    assert_trees_close(jax.device_get(new), s["new_state"], atol=1e-5)
    for name, value in jax.device_get(metrics).items():
        assert value == pytest.approx(s["metrics"][name], rel=1e-5, abs=1e-6), name


def _collect(procs, timeout_s):
    """The outputs of `procs`; if any is still running after `timeout_s` (all together), every
    worker is killed and the test FAILS with their outputs: a hang is a bug, not a skip."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[0][-2000:] for p in procs]
        pytest.fail(f"multi-process workers hung: not finished after {timeout_s} s; outputs:\n"
                    + "\n---\n".join(tails))
    return outputs


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WORKER_TIMEOUT_S = 240


def _multiprocess_unsupported_reason():
    """Why this environment cannot run a 2-process JAX cluster at all, or None. The test runs
    everywhere else, and there a hang, a timeout or a crash is a failure, not a skip."""
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        return f"jax {jax.__version__} has no CPU collectives (jax_cpu_collectives_implementation)"
    try:
        _free_port()
    except OSError as e:
        return f"cannot bind a loopback port for the coordinator: {e}"
    return None


def test_two_processes_match_one(one_step, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on loopback, gloo) run the same step on the
    same global batch; each process's state equals the single-process one. A worker that hangs
    (past WORKER_TIMEOUT_S), crashes or never joins the cluster fails the test."""
    reason = _multiprocess_unsupported_reason()
    if reason:
        pytest.skip("this environment cannot run a multi-process JAX cluster: " + reason)
    s = one_step
    np.savez(tmp_path / "views.npz", **s["views"])
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "obow_multihost_worker.py"), str(i), str(port),
         str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = _collect(procs, WORKER_TIMEOUT_S)
    started = [(tmp_path / f"started_{i}").exists() for i in range(2)]
    for i, p in enumerate(procs):
        assert p.returncode == 0, (f"worker {i} (joined the cluster: {started[i]}) exited with "
                                   f"{p.returncode}:\n{outputs[i][-4000:]}")
    want = s["new_state"]
    for i in range(2):
        got = dict(np.load(tmp_path / f"state_{i}.npz"))
        leaves = worker.flat_state(want)
        assert sorted(got) == sorted(leaves)
        for name, value in leaves.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)


def test_a_hanging_worker_fails_the_multiprocess_test():
    """The negative control of the above: workers that never finish make `_collect` fail the
    test (pytest's Failed, not Skipped), and are killed."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    with pytest.raises(pytest.fail.Exception, match="hung: not finished after 1 s"):
        _collect(procs, 1)
    assert all(p.poll() is not None for p in procs)


# ------------------------------------------------------------------------------------------------
# Resume, configs, failures


def _run_dir(config, workdir):
    run = common.restore(config, workdir)
    run.close()
    return jax.device_get(run.state)


def test_resume_is_exact_queue_and_statistics_included(tmp_path):
    """A 4-step run keeps its step-2 checkpoint; resuming a copy of it from step 2 reaches the
    same state: teacher, queues, pointers, statistics, optimizer, everything."""
    config = worker.tiny_config(fast=True)
    config.num_train_steps = 4
    config.checkpoint_every_steps = 2
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_task.run(config, str(full))
    shutil.copytree(full / "checkpoints" / "2", resumed / "checkpoints" / "2")
    assert _run_dir(config, str(resumed)).step == 2
    train_task.run(config, str(resumed))
    want, got = _run_dir(config, str(full)), _run_dir(config, str(resumed))
    assert int(want.step) == int(got.step) == 4
    assert_trees_close(got, want, atol=1e-6)
    # K = 2 B: after 4 steps the pointer is back at 0 and every initial word was replaced.
    assert all(int(p) == 0 for p in want.pointers)
    init = jax.device_get(create_method(config, data_info_for(
        config, load_split(config, "train"))).init_state(jax.random.key(config.seed)))
    for q0, q in zip(init.vocabularies, want.vocabularies):
        assert not np.isclose(np.asarray(q0), np.asarray(q)).all(axis=1).any()
    assert all(float(m) != 0.5 for m in want.mean_min_dist)


def test_monitor_learns_from_labels_and_cannot_touch_the_backbones(tmp_path):
    """The loop delivers the batch's labels; the monitor head (on detached teacher features) adds
    its loss and accuracy to the metrics, and leaves student and teacher exactly as without it."""
    config = worker.tiny_config(fast=True)
    config.num_train_steps = 2
    plain = _run_dir_after_training(config, tmp_path / "plain")
    config.obow.monitor, config.obow.num_classes = True, 10
    watched = _run_dir_after_training(config, tmp_path / "watched")
    assert_trees_close(watched.params["backbone"], plain.params["backbone"], atol=1e-6)
    assert_trees_close(watched.params["bow_head"], plain.params["bow_head"], atol=1e-6)
    assert_trees_close(watched.teacher_params, plain.teacher_params, atol=1e-6)
    rows = [json.loads(line) for line in open(tmp_path / "watched" / "metrics.jsonl")]
    assert all(0.0 <= r["monitor_accuracy"] <= 1.0 and r["monitor_loss"] > 0 for r in rows)
    # The monitor's weights moved: it was trained on the labels.
    init = create_method(config, data_info_for(config, load_split(config, "train")))
    init = jax.device_get(init.init_state(jax.random.key(config.seed)))
    assert not np.allclose(watched.params["monitor"]["fc"]["kernel"],
                           init.params["monitor"]["fc"]["kernel"])


def test_checkpoint_of_another_state_shape_names_the_differing_fields(tmp_path):
    """A run trained without the monitor cannot be restored by a config with it (the state holds
    no monitor): the error names the config field, not Orbax's tree paths."""
    config = worker.tiny_config(fast=True)
    config.num_train_steps = 1
    train_task.run(config, str(tmp_path))
    config.obow.monitor, config.obow.num_classes = True, 10
    with pytest.raises(ValueError, match=r"another shape.*config\.obow\.monitor: False -> True"):
        common.restore(config, str(tmp_path))


def _run_dir_after_training(config, workdir):
    train_task.run(config, str(workdir))
    return _run_dir(config, str(workdir))


def _setup_error(tmp_path, **overrides):
    config = worker.tiny_config(fast=True)
    config.update_from_flattened_dict(overrides)
    start = time.time()
    with pytest.raises(ValueError) as err:
        common.restore(config, str(tmp_path))
    assert time.time() - start < 20
    assert not os.path.exists(tmp_path / "checkpoints" / "0")
    return str(err.value)


def test_queue_size_not_divisible_by_global_batch_fails_fast(tmp_path):
    msg = _setup_error(tmp_path, **{"obow.num_words": 40})
    assert "config.obow.num_words=40" in msg and "config.batch_size=16" in msg


def test_missing_or_too_small_levels_fail_fast(tmp_path):
    msg = _setup_error(tmp_path, **{"obow.bow_levels": ("layer3", "layer5")})
    assert "config.obow.bow_levels" in msg and "'layer5'" in msg
    # A 16x16 teacher gives layer3 4x4: the border skip + 3x3 words need 5x5.
    msg = _setup_error(tmp_path, **{"obow.teacher_size": 16})
    assert "config.obow.bow_levels" in msg and "4x4" in msg and "5x5" in msg
    msg = _setup_error(tmp_path, **{"obow.bow_levels": ("pooled",)})
    assert "config.obow.bow_levels" in msg and "not a spatial" in msg
    msg = _setup_error(tmp_path, **{"obow.vocabulary": "kmeans"})
    assert "config.obow.vocabulary" in msg


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_recipe_configs_build_and_carry_the_paper_numbers():
    load = _load_config
    r50 = load("obow_resnet50")
    assert (r50.optim.lr, r50.optim.end_lr, r50.optim.warmup_epochs, r50.optim.weight_decay,
            r50.batch_size, r50.num_epochs) == (0.03, 3e-5, 10, 1e-4, 256, 200)
    assert (r50.obow.kappa, r50.obow.inv_delta, r50.obow.num_words) == (8, 15, 8192)
    assert tuple(r50.obow.bow_levels) == ("layer3", "layer4")
    assert (r50.obow.monitor, r50.obow.num_classes) == (True, 1000)  # official monitor head
    # The R50 lr at chosen steps (5004 steps per epoch): 0 at step 0, linear warm-up per step,
    # then a cosine stepped per epoch that never reaches end_lr.
    spe = 5004
    info = DataInfo((224, 224, 3), spe * 256, spe, spe * 200)
    _, lr = interface.optimizer_from_config(r50, info)
    cos = lambda e: 3e-5 + (0.03 - 3e-5) * 0.5 * (1 + math.cos(math.pi * (e - 10) / 190))
    for step, want in ((0, 0.0), (spe, 0.003), (10 * spe - 1, 0.03 * (10 * spe - 1) / (10 * spe)),
                       (10 * spe, 0.03), (11 * spe - 1, cos(10)), (11 * spe, cos(11)),
                       (200 * spe - 1, cos(199))):
        assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
    # The R50 teacher momentum at chosen steps, per step over all 200 epochs.
    for step in (0, 1, 500_400, 1_000_799):
        assert float(schedules.teacher_momentum(step, info.total_steps, 0.99)) == pytest.approx(
            np_momentum(step, info.total_steps), abs=1e-7)
    for name, batch, levels, crops, patches in (
            ("obow_resnet18_in20_vanilla", 256, ("layer4",), 1, 0),
            ("obow_resnet18_in20_full", 128, ("layer3", "layer4"), 2, 5)):
        c = load(name)
        assert (c.batch_size, tuple(c.obow.bow_levels), c.obow.num_crops, c.obow.num_patches,
                c.obow.kappa, c.obow.inv_delta, c.optim.lr, c.optim.weight_decay,
                c.num_epochs) == (batch, levels, crops, patches, 5, 10, 0.05, 5e-4, 80)
    # The CIFAR configs pass the level-size and queue checks of `create`.
    for name in ("obow_cifar10_cpu", "obow_cifar10_resnet18"):
        c = load(name)
        obow.create(c, DataInfo((32, 32, 3), 50_000, 50_000 // c.batch_size,
                                c.num_epochs * (50_000 // c.batch_size)))


def test_imagenet_config_without_data_says_how_to_prepare(tmp_path):
    """The R50 recipe streams TFDS imagenet2012; unprepared, setup stops at once saying how."""
    config = _load_config("obow_resnet50")
    config.data.data_dir = str(tmp_path / "tfds")
    start = time.time()
    with pytest.raises(FileNotFoundError, match=r"imagenet2012.*tfds build imagenet2012"):
        common.restore(config, str(tmp_path / "work"))
    assert time.time() - start < 30
    assert not os.path.exists(tmp_path / "work" / "checkpoints" / "0")


# ------------------------------------------------------------------------------------------------
# Views and ablations


def test_views_shapes_and_shared_patch_draw():
    """Geometric views on the device; then per-crop photometric draws, one per image for patches
    (checked with random grayscale coins on colour images)."""
    config = worker.tiny_config(photometric=True)
    cfg = config.obow
    cfg.color_jitter_p = cfg.blur_p = 0.0
    cfg.grayscale_p = 0.5
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    method = obow.create(config, DataInfo(images.shape[1:], 256, 16, 32))
    sizes = jnp.full((16, 2), 16, jnp.int32)  # in-memory images are their own canvases
    views = jax.jit(method.make_views)(jnp.asarray(images), sizes, jax.random.key(0))
    assert views["teacher"].shape == (16, cfg.teacher_size, cfg.teacher_size, 3)
    assert views["crops"].shape == (16, cfg.num_crops, cfg.crop_size, cfg.crop_size, 3)
    assert views["patches"].shape == (16, cfg.num_patches, cfg.patch_size, cfg.patch_size, 3)
    assert all(v.dtype == jnp.uint8 for v in views.values())
    teacher, groups, copies = jax.jit(lambda k, b: obow.augment_views(
        k, b, cfg, (0., 0., 0.), (1., 1., 1.)))(jax.random.key(1), views)
    assert copies == [cfg.num_crops, cfg.num_patches]
    is_gray = lambda x: np.abs(x - x.mean(-1, keepdims=True)).max(axis=(-3, -2, -1)) < 1e-6
    patch_gray = is_gray(np.asarray(groups[1]).reshape(
        16, cfg.num_patches, cfg.patch_size, cfg.patch_size, 3))
    assert (patch_gray == patch_gray[:, :1]).all() and 0 < patch_gray[:, 0].sum() < 16
    crop_gray = is_gray(np.asarray(groups[0]).reshape(16, cfg.num_crops, cfg.crop_size,
                                                      cfg.crop_size, 3))
    assert (crop_gray[:, 0] != crop_gray[:, 1]).any()  # crops of an image draw independently
    # The teacher view gets no photometric change.
    np.testing.assert_allclose(teacher, np.asarray(views["teacher"]) / 255.0, atol=1e-6)


def test_views_of_a_canvas_are_the_views_of_the_image():
    """methods/obow.py has no TensorFlow: every view is cut on the device, from in-memory images
    and streamed canvases alike. An image in the top-left corner of a larger canvas (true size
    given) has exactly the views of the image itself, whatever lies outside it. Each patch is the
    grid cell (i, j) of its source, shifted by at most `patch_jitter` (read off a
    coordinate-coded image)."""
    code = ("import sys\nfrom bow_jax.methods import obow\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    config = worker.tiny_config()
    method = obow.create(config, DataInfo((40, 48, 3), 256, 16, 32))
    views = jax.jit(method.make_views)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    canvas = np.full((64, 64, 3), 255, np.uint8)  # anything outside the image must not show
    canvas[:40, :48] = image
    size = jnp.asarray([[40, 48]], jnp.int32)
    own = views(jnp.asarray(image[None]), size, jax.random.key(0))
    cut = views(jnp.asarray(canvas[None]), size, jax.random.key(0))
    assert sorted(own) == sorted(cut) == ["crops", "patches", "teacher"]
    for name, view in cut.items():
        assert view.dtype == jnp.uint8 and view.shape == own[name].shape, name
        np.testing.assert_array_equal(np.asarray(view), np.asarray(own[name]), err_msg=name)
    # Patches of a coordinate-coded 40x40 image on a canvas; the source crop is the whole image
    # at its own size (scale (1, 1)), so the patches are the image's pixels.
    s, p, jitter = 40, 12, 4
    config.obow.update(dict(patch_source_size=s, patch_source_scale=(1.0, 1.0), patch_size=p,
                            patch_jitter=jitter))
    method = obow.create(config, DataInfo((s, s, 3), 256, 16, 32))
    rows, cols = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    coded = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    canvas = np.full((64, 64, 3), 255, np.uint8)
    canvas[:s, :s] = coded
    patches = np.asarray(jax.jit(method.make_views)(
        jnp.asarray(canvas[None]), jnp.asarray([[s, s]], jnp.int32),
        jax.random.key(2))["patches"][0])
    step = (s - p - jitter) // 2
    tops, lefts = patches[:, 0, 0, 0].astype(int), patches[:, 0, 0, 1].astype(int)
    cells = {(t // step, l // step) for t, l in zip(tops, lefts)}
    assert patches.shape == (5, p, p, 3) and len(cells) == 5
    assert all(0 <= t - (t // step) * step <= jitter for t in tops)
    for k in range(5):
        np.testing.assert_array_equal(patches[k],
                                      coded[tops[k]:tops[k] + p, lefts[k]:lefts[k] + p])


def test_ablation_vocabularies_vs_numpy():
    """Online k-means (hard, with reseeding; Sinkhorn codes) and the queue's other word
    samplings, through `teacher_level_update`, against numpy."""
    rng = np.random.default_rng(0)
    fmap = jnp.asarray(np.maximum(rng.standard_normal((4, 6, 6, 3)), 0), jnp.float32)
    vocab = jnp.asarray(np.maximum(rng.standard_normal((8, 3)), 0), jnp.float32)
    cfg = obow.default_config()
    cfg.inv_delta = 10.0
    kmeans = {"ema_counts": jnp.ones(8), "ema_sums": vocab,
              "steps_since_used": jnp.zeros(8, jnp.int32)}
    key = jax.random.key(3)
    f = np.asarray(fmap, np.float64)[:, 1:-1, 1:-1].reshape(-1, 3)
    dist = ((f[:, None] - np.asarray(vocab, np.float64)) ** 2).sum(-1)

    # (a) hard k-means update with the pre-update vocabulary; targets as the queue's.
    cfg.vocabulary, cfg.kmeans_assignment = "online_kmeans", "hard"
    bow, (v, ptr, m, km), _ = obow.teacher_level_update(cfg, "l", fmap, vocab, jnp.int32(0),
                                                        jnp.float32(0.5), kmeans, key)
    want_bow, want_m = np_targets(fmap, vocab, 0.5, 10.0)
    np.testing.assert_allclose(bow, want_bow, atol=1e-5)
    onehot = np.eye(8)[dist.argmin(1)]
    counts = 0.99 + 0.01 * onehot.sum(0)
    sums = 0.99 * np.asarray(vocab) + 0.01 * onehot.T @ f
    np.testing.assert_allclose(km["ema_counts"], counts, rtol=1e-5)
    np.testing.assert_allclose(v, sums / counts[:, None], rtol=1e-4, atol=1e-6)

    # (b) Sinkhorn: balanced codes (cost dist / m_new, epsilon 1 / inv_delta) for the targets and
    # the k-means statistics.
    cfg.kmeans_assignment = "sinkhorn"
    bow, (v, _, m, km), _ = obow.teacher_level_update(cfg, "l", fmap, vocab, jnp.int32(0),
                                                      jnp.float32(0.5), kmeans, key)
    q = np.exp(-(dist / want_m) * 10.0)
    for _ in range(cfg.sinkhorn_iters):
        q = q / q.sum(0, keepdims=True) * (len(f) / 8)
        q = q / q.sum(1, keepdims=True)
    want = q.reshape(4, 4, 4, 8).max(axis=(1, 2))
    np.testing.assert_allclose(bow, want / want.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(km["ema_counts"], 0.99 + 0.01 * q.sum(0), rtol=1e-5)

    # Queue with global-average words, and with local features.
    cfg.vocabulary = "queue"
    for mode in ("global_average", "local_features"):
        cfg.word_sampling = mode
        _, (v, ptr, _, _), _ = obow.teacher_level_update(cfg, "l", fmap, vocab, jnp.int32(4),
                                                         jnp.float32(0.5), None, key)
        crop = np.asarray(fmap)[:, 1:-1, 1:-1]
        if mode == "global_average":
            words = crop.mean(axis=(1, 2))
        else:
            from bow_jax.bow.vocabulary import sample_locations
            r, c = sample_locations(key, 4, 4, 4)
            words = crop[np.arange(4), np.asarray(r), np.asarray(c)]
        np.testing.assert_allclose(v[4:], words, atol=1e-6)
        np.testing.assert_allclose(v[:4], vocab[:4])
        assert int(ptr) == 0

    # Cosine variant: the same maths on L2-normalised teacher features and words.
    cfg.word_sampling, cfg.teacher_distance = "global_average", "cosine"
    bow, (v, _, m, _), _ = obow.teacher_level_update(cfg, "l", fmap, vocab, jnp.int32(4),
                                                     jnp.float32(0.5), None, key)
    f_unit = np.asarray(fmap) / np.maximum(np.linalg.norm(fmap, axis=-1, keepdims=True), 1e-12)
    v_unit = np_l2n(np.asarray(vocab, np.float64))
    want_bow, want_m = np_targets(f_unit, v_unit, 0.5, 10.0)
    np.testing.assert_allclose(bow, want_bow, atol=1e-5)
    assert float(m) == pytest.approx(want_m, rel=1e-5)
    np.testing.assert_allclose(v[4:], np_l2n(f_unit[:, 1:-1, 1:-1].mean(axis=(1, 2))), atol=1e-6)
    np.testing.assert_allclose(v[:4], v_unit[:4], atol=1e-6)


def test_target_knn_script_targets_vs_numpy():
    """scripts/obow_target_knn.py: the queue holds the 3x3-averaged words of the first K training
    maps; the temperature statistic is their mean minimum distance; targets as in training."""
    spec = importlib.util.spec_from_file_location(
        "obow_target_knn", os.path.join(REPO, "scripts", "obow_target_knn.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = obow.default_config()
    cfg.num_words = 6
    rng = np.random.default_rng(0)
    train_map = np.maximum(rng.normal(size=(8, 6, 6, 3)), 0).astype(np.float32)
    test_map = np.maximum(rng.normal(size=(3, 6, 6, 3)), 0).astype(np.float32)
    got_train, got_test = script.bow_targets(cfg, train_map, test_map, "layer3")
    rows, cols = voc.sample_locations(jax.random.key(0), 6, 2, 2)
    vocab = np.stack([np_local_average_word(train_map[i], int(r), int(c))
                      for i, (r, c) in enumerate(zip(rows, cols))])
    cropped = train_map[:, 1:-1, 1:-1].astype(np.float64)
    m = ((cropped[..., None, :] - vocab) ** 2).sum(-1).min(-1).mean()
    for maps, got in ((train_map, got_train), (test_map, got_test)):
        want, _ = np_targets(maps, vocab, m, cfg.inv_delta, momentum=1.0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="num_words=6"):
        script.bow_targets(cfg, train_map[:5], test_map, "layer3")


def test_loss_helpers_vs_numpy():
    rng = np.random.default_rng(1)
    bow = rng.random((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(obow.expand_targets(bow, 2),
                                  np.stack([bow[0], bow[0], bow[1], bow[1], bow[2], bow[2]]))
    targets = [rng.dirichlet(np.ones(5), 3), rng.dirichlet(np.ones(7), 3)]
    logits = [[rng.standard_normal((6, 5)), rng.standard_normal((6, 7))],
              [rng.standard_normal((12, 5)), rng.standard_normal((12, 7))]]
    total, groups = obow.bow_prediction_loss(logits, targets, [2, 4])
    want = [np.mean([np_soft_ce(lg, t[np.arange(len(lg)) // n]) for lg, t in zip(lgs, targets)])
            for lgs, n in zip(logits, (2, 4))]
    np.testing.assert_allclose(groups, want, rtol=1e-5)
    assert float(total) == pytest.approx(sum(want), rel=1e-5)
    t, s = {"a": jnp.ones(3)}, {"a": jnp.zeros(3)}
    np.testing.assert_allclose(obow.ema_update(t, s, 0.75)["a"], 0.75)
