"""Semi-supervised fine-tuning: the labelled subset (file and seed, class-balanced), the two
learning rates against a hand-computed SGD step, and a tiny real run on digits above chance."""
import functools
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from bow_jax.config import base_config
from bow_jax.data import batches as batch_source
from bow_jax.data import datasets, pipeline
from bow_jax.protocols import semisupervised as ft
from bow_jax.tasks import finetune as finetune_task
from bow_jax.lib import checkpoint, stop, writers
from bow_jax.lib.state import TrainState
from bow_jax.models import ResNet


def small_backbone(stages=(1,), width=4):
    """A ResNet with one block per stage: the same code paths, a much faster compile."""
    return ResNet(stage_sizes=stages, width=width, cifar_stem=True)


# ------------------------------------------------------------------------------------------------
# The labelled subset.


def test_balanced_subset_takes_the_percentage_of_every_class():
    labels = np.repeat(np.arange(4), [200, 100, 50, 7])
    np.random.default_rng(0).shuffle(labels)
    subset = ft.balanced_subset(labels, 10, seed=3)
    counts = np.bincount(labels[subset], minlength=4)
    np.testing.assert_array_equal(counts, [20, 10, 5, 1])  # round(10% of 7) = 1
    assert len(np.unique(subset)) == len(subset) and np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(subset, ft.balanced_subset(labels, 10, seed=3))
    assert not np.array_equal(subset, ft.balanced_subset(labels, 10, seed=4))
    # Every class keeps one example even when its share rounds to 0.
    assert np.bincount(labels[ft.balanced_subset(labels, 0.1)], minlength=4).min() == 1
    with pytest.raises(ValueError, match="percent=0"):
        ft.balanced_subset(labels, 0)


def test_subset_file_of_indices_and_of_image_folder_names(tmp_path):
    (tmp_path / "idx.txt").write_text("5\n\n2\n 9 \n")
    np.testing.assert_array_equal(ft.read_subset_file(tmp_path / "idx.txt", 10), [5, 2, 9])
    np.testing.assert_array_equal(
        ft.labelled_subset(np.zeros(10), subset_file=str(tmp_path / "idx.txt")), [5, 2, 9])
    (tmp_path / "bad.txt").write_text("3\n10\n")
    with pytest.raises(ValueError,
                       match=r"subset_file=.*bad.txt: line 2: index 10 is outside .*\[0, 10\)"):
        ft.read_subset_file(tmp_path / "bad.txt", 10)
    with pytest.raises(FileNotFoundError, match=r"config\.finetune\.subset_file=.*nope\.txt: no "
                                                 r"such file"):
        ft.read_subset_file(tmp_path / "nope.txt", 10)
    (tmp_path / "twice.txt").write_text("3\n3\n")
    with pytest.raises(ValueError, match="listed twice"):
        ft.read_subset_file(tmp_path / "twice.txt", 10)

    # An image folder: SimCLR-style bare file names (and class/file) map to load_image_folder's
    # example order.
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for cls, names in (("b_cls", ["n2_1.JPEG", "n2_0.JPEG"]), ("a_cls", ["n1_5.png"])):
        (root / cls).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(
                root / cls / name, format="PNG")
    (root / "a_cls" / "notes.txt").write_text("not an image")
    data = datasets.load_image_folder(root, 4)
    names = list(data.filenames)
    assert names == ["a_cls/n1_5.png", "b_cls/n2_0.JPEG", "b_cls/n2_1.JPEG"]
    assert len(names) == len(data) and list(data.labels) == [0, 1, 1]
    (tmp_path / "1percent.txt").write_text("n2_1.JPEG\na_cls/n1_5.png\n")
    np.testing.assert_array_equal(ft.read_subset_file(tmp_path / "1percent.txt", 3, names),
                                  [2, 0])
    (tmp_path / "unknown.txt").write_text("n9_9.JPEG\n")
    with pytest.raises(ValueError, match="unknown.txt:1: 'n9_9.JPEG' is not a file"):
        ft.read_subset_file(tmp_path / "unknown.txt", 3, names)
    with pytest.raises(ValueError, match="needs an image-folder|file names need"):
        ft.read_subset_file(tmp_path / "1percent.txt", 3)


def test_recipe_presets_and_overrides():
    cfg = finetune_task.default_config()
    r = ft.recipe(cfg)
    assert (r["percent"], r["epochs"], r["milestones"]) == (1.0, 40, (24, 32))
    assert (r["lr_trunk"], r["lr_head"], r["momentum"], r["weight_decay"], r["decay"],
            r["batch_size"]) == (2e-4, 0.5, 0.9, 0.0, 0.2, 256)
    cfg.preset = "10percent"
    assert (ft.recipe(cfg)["percent"], ft.recipe(cfg)["milestones"]) == (10.0, (12, 16))
    cfg.epochs = 5  # milestones scale with the epochs
    assert ft.recipe(cfg)["milestones"] == (3, 4)
    cfg.preset = "5percent"
    with pytest.raises(ValueError, match="config.finetune.preset='5percent'"):
        ft.recipe(cfg)


# ------------------------------------------------------------------------------------------------
# The two learning rates.


def test_two_learning_rates_reach_the_right_parameters():
    """One step from zero momentum is p - lr * (g + wd * p) per group (PyTorch SGD), with the
    gradient from an independently written loss."""
    backbone = small_backbone((1, 1))
    model = ft.FinetuneNet(backbone, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    variables = model.init(jax.random.key(1), x, train=False)
    lr_trunk, lr_head, wd = 2e-4, 0.5, 1e-3
    tx = ft.finetune_optimizer(lr_trunk, lr_head, momentum=0.9, weight_decay=wd)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]), rng=jax.random.key(2))
    new_state, _ = jax.jit(lambda s: ft.finetune_update(model, tx, s, x, labels))(state)

    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(variables["params"]))
    old = traverse_util.flatten_dict(variables["params"])
    new = traverse_util.flatten_dict(new_state.params)
    assert {k[0] for k in old} == {"backbone", "head"}
    for k in old:
        lr = lr_head if k[0] == "head" else lr_trunk
        g = np.asarray(grads[k], np.float64) + wd * np.asarray(old[k], np.float64)
        assert np.abs(g).max() > 0, k
        # atol: new - old cancels in float32 (|p| ~ 0.3, ulp ~ 3e-8); the two rates differ 2500x.
        np.testing.assert_allclose(np.asarray(new[k]) - np.asarray(old[k]), -lr * g,
                                   rtol=1e-4, atol=1e-7, err_msg=str(k))
    assert ft.param_groups(variables["params"])["head"]["fc"]["kernel"] == "head"
    assert ft.param_groups(variables["params"])["backbone"]["conv1"]["kernel"] == "trunk"


def test_views_are_random_resized_crops_and_flips():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 12, 12, 3), np.uint8))
    sizes = jnp.full((4, 2), 12, jnp.int32)  # in-memory images are their own canvases
    views = jax.jit(lambda k, x, s: batch_source.crop_flip_views(x, s, k, crop=8,
                                                                 scale=(0.5, 1.0)))(
        jax.random.key(0), images, sizes)["image"]
    assert views.shape == (4, 8, 8, 3) and views.dtype == jnp.uint8
    full = jax.jit(lambda x: ft.eval_views(x, 8))(images)
    assert full.shape == (4, 8, 8, 3) and full.dtype == jnp.uint8
    assert ft.eval_views(images, 12) is images


# ------------------------------------------------------------------------------------------------
# A tiny real run.


def test_tiny_finetune_on_digits_beats_chance(tmp_path, capsys):
    train = datasets.load_digits("train", image_size=8)
    test = datasets.load_digits("test", image_size=8)
    backbone = small_backbone((1, 1), width=8)
    variables = jax.jit(lambda k: backbone.init(k, jnp.zeros((1, 8, 8, 3)), train=False))(
        jax.random.key(0))
    cfg = finetune_task.default_config()
    cfg.preset = "10percent"
    cfg.epochs = 10
    cfg.batch_size = 16
    cfg.crop_scale = (1.0, 1.0)  # 8x8 digits: random aspect ratio only
    cfg.flip = False  # digits are not mirror-symmetric
    cfg.eval_every = 5
    logs = []
    result = ft.finetune(backbone, jax.device_get(variables), train, test.subset(np.arange(200)),
                         cfg, (0.5,) * 3, (0.25,) * 3, seed=0, log=logs.append)
    assert result["num_labelled"] == len(ft.balanced_subset(train.labels, 10))
    assert 9.5 < result["percent"] < 10.5
    assert [e for e, _, _ in result["history"]] == [5, 10] and logs == []  # nothing resumed
    rows = [line for line in capsys.readouterr().out.splitlines() if "test_top1=" in line]
    assert len(rows) == 2 and all(line.startswith("finetune: step ") for line in rows)
    assert result["top5"] >= result["top1"]
    assert result["milestones"] == [6, 8]
    assert result["top1"] > 0.3, result  # chance is 0.1

    finetune_task.write_finetune_results(str(tmp_path), "rotnet step 3", "10%", result)
    results = finetune_task.write_finetune_results(str(tmp_path), "rotnet step 3", "1%",
                                        dict(result, top1=0.25))
    saved = json.loads((tmp_path / "eval" / "finetune.json").read_text())
    assert saved == json.loads(json.dumps(results)) and set(saved["rotnet step 3"]) == {"10%", "1%"}
    table = (tmp_path / "eval" / "finetune.md").read_text()
    assert "| rotnet step 3 | " in table and "25.00" in table
    assert not [f for f in os.listdir(tmp_path / "eval") if f.endswith(".tmp")]


class Stop(Exception):
    """A crash in the middle of the fine-tuning (raised by a test hook)."""


def _saved_state(folder, step):
    """The raw state tree saved at `step` in the checkpoint folder `folder` (keys as key data)."""
    ckpt = checkpoint.Checkpointer(str(folder))
    try:
        state = ckpt.restore(None, step=step)
    finally:
        ckpt.close()
    is_key = lambda x: jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else np.asarray(x), state)


def _digits_run(tmp_path):
    """(fine-tune(folder, hooks=..., **config changes) -> result) on 10% of 8x8 digits:
    2 epochs of 8 steps (batch 16, 143 labelled), scored after each epoch."""
    train = datasets.load_digits("train", image_size=8)
    test = datasets.load_digits("test", image_size=8).subset(np.arange(100))
    backbone = small_backbone((1,), width=4)
    variables = jax.device_get(jax.jit(
        lambda k: backbone.init(k, jnp.zeros((1, 8, 8, 3)), train=False))(jax.random.key(0)))

    def run(folder, hooks=(), seed=0, **changes):
        cfg = finetune_task.default_config()
        cfg.update({**dict(preset="10percent", epochs=2, batch_size=16, crop_scale=(0.5, 1.0),
                           eval_every=1), **changes})
        return ft.finetune(backbone, variables, train, test, cfg, (0.5,) * 3, (0.25,) * 3,
                           seed=seed, log=lambda _: None, checkpoint_dir=str(tmp_path / folder / "checkpoints"),
                           hooks=hooks)
    return run


def test_finetune_stopped_by_sigterm_resumes_bit_for_bit(tmp_path):
    """A SIGTERM after step 11 of 16 (epoch 2 of 2): step 11 is saved beside epoch 1's, the
    rerun resumes at 11 (the loader from step 11, epoch 1's score kept) and ends with the
    parameters, top-1, top-5 and history of a run straight through; a finished run is read back
    without training; a damaged newest checkpoint falls back on the previous one; checkpoints of
    other settings are refused, naming them."""
    run = _digits_run(tmp_path)
    through = run("a")
    assert through["num_labelled"] == 143 and [e for e, _, _ in through["history"]] == [1, 2]
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["16", "8"]  # the last 2 kept
    rows = writers.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))  # a row per epoch
    assert [r["step"] for r in rows] == [8, 16]
    assert [[r["test_top1"], r["test_top5"]] for r in rows] == [h[1:] for h in through["history"]]

    def sigterm_at_11(done):
        if done == 11:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(stop.Stopped, match="step 11/16, saved in .*same command resumes"):
        run("b", hooks=[sigterm_at_11])
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["11", "8"]
    # A damaged newest checkpoint: the rerun falls back on epoch 1's (its history with it).
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "checkpoints" / "11" / "meta")
    seen = []
    assert run("c", hooks=[seen.append]) == through and seen == list(range(9, 17))
    seen.clear()
    assert run("b", hooks=[seen.append]) == through
    assert seen == list(range(12, 17))
    want = _saved_state(tmp_path / "a" / "checkpoints", 16)
    got = _saved_state(tmp_path / "b" / "checkpoints", 16)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # The comparison can fail: training changed the parameters.
    early = _saved_state(tmp_path / "b" / "checkpoints", 11)
    assert not np.array_equal(early["params"]["head"]["fc"]["kernel"],
                              want["params"]["head"]["fc"]["kernel"])
    seen.clear()
    assert run("b", hooks=[seen.append]) == through and seen == []  # finished: nothing to train

    with pytest.raises(ValueError, match=r"config.finetune.epochs: 2 -> 3.*Remove .*b"):
        run("b", epochs=3)
    with pytest.raises(ValueError, match=r"config.seed: 0 -> 1"):
        run("b", seed=1)
    with pytest.raises(ValueError, match=r"config.finetune.subset_seed: 0 -> 1.*labelled subset"):
        run("b", subset_seed=1)


def test_batch_larger_than_the_subset_is_a_clear_error():
    train = datasets.load_digits("train", image_size=8).subset(np.arange(100))
    backbone = small_backbone()
    cfg = finetune_task.default_config()  # 1% of 100 images, batch 256
    with pytest.raises(ValueError, match="config.finetune.batch_size=256 is larger than"):
        ft.finetune(backbone, None, train, train, cfg, (0.5,) * 3, (0.25,) * 3)


# ------------------------------------------------------------------------------------------------
# scripts/compare_runs.py: one table of several runs' results.


def _compare_runs_module():
    import importlib.util
    import sys
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "compare_runs.py")
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_runs"] = module
    spec.loader.exec_module(module)
    return module


def test_compare_runs_prints_one_side_by_side_table(tmp_path, capsys):
    compare_runs = _compare_runs_module()
    fewshot = lambda m: {"mean": m, "ci95": 0.01}
    runs = {
        "rotnet": {"rotnet step 100": {"feature_dim": 64, "linear": {"top1": 0.5},
                                       "fewshot": {"5way_1shot": fewshot(0.4)},
                                       "knn": {"top1": 0.45}},
                   "random init": {"feature_dim": 64, "linear": {"top1": 0.3},
                                   "knn": {"top1": 0.2}}},
        "obow": {"obow step 200": {"feature_dim": 64, "linear": {"top1": 0.61234},
                                   "fewshot": {"5way_1shot": fewshot(0.5),
                                               "5way_5shot": fewshot(0.7)}}},
    }
    for name, results in runs.items():
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "results.json").write_text(json.dumps(results))
    finetune_task.write_finetune_results(str(tmp_path / "obow"), "obow step 200", "1%", {"top1": 0.333})

    assert compare_runs.main([str(tmp_path / "rotnet"), str(tmp_path / "obow"),
                              "--output", str(tmp_path / "table.md")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("| run: network | linear top-1 | 5way_1shot | k-NN top-1 | 5way_5shot "
                        "| fine-tune 1% top-1 |")
    rot, obow = str(tmp_path / "rotnet"), str(tmp_path / "obow")
    assert lines[2] == f"| {rot}: rotnet step 100 | 50.00 | 40.00 | 45.00 | – | – |"
    assert lines[3] == f"| {rot}: random init | 30.00 | – | 20.00 | – | – |"
    assert lines[4] == f"| {obow}: obow step 200 | 61.23 | 50.00 | – | 70.00 | 33.30 |"
    assert len(lines) == 5
    assert (tmp_path / "table.md").read_text().strip().splitlines() == lines
    with pytest.raises(SystemExit, match="nothing/eval/results.json does not exist"):
        compare_runs.main([str(tmp_path / "nothing")])


# ------------------------------------------------------------------------------------------------
# Streamed: a TFDS split with a `file_name` feature (as imagenet2012), a SimCLR-style subset file.

try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
except ImportError:
    tf = tfds = None
needs_tf = pytest.mark.skipif(tf is None, reason="tensorflow / tensorflow_datasets not installed")

NAMED = 24  # training examples of the tiny dataset; label of example i: i (ids) or i % 2


def _names(n, prefix):
    return [f"{prefix}{i % 3:08d}_{i}.JPEG" for i in range(n)]


def named_tfds(data_dir, label_of=lambda i: i, num_classes=NAMED):
    """A prepared TFDS dataset 'tiny_named': train (NAMED images, 16x16, PNG) and test (10),
    each example with 'image', 'label' and imagenet2012's 'file_name'. Returns (images, names)."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (NAMED, 16, 16, 3), dtype=np.uint8)
    labels = np.asarray([label_of(i) for i in range(NAMED)])
    images[labels == 1] //= 4  # a class a network can tell apart: darker images
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=num_classes),
        "file_name": tfds.features.Text()})
    names = _names(NAMED, "n")
    split = lambda k: tf.data.Dataset.from_tensor_slices(
        {"image": images[:k], "label": labels[:k], "file_name": names[:k]})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_named", version="1.0.0", features=features, data_dir=str(data_dir),
        split_datasets={"train": split(NAMED), "test": split(10)})
    return images, names


def _source(data_dir):
    return datasets.load_dataset(ml_collections.ConfigDict(dict(
        source="tfds", name="tiny_named", data_dir=str(data_dir))), "train")


@needs_tf
def test_subset_file_of_tfds_file_names_selects_exactly_those(tmp_path):
    images, names = named_tfds(tmp_path / "data")
    source = _source(tmp_path / "data")
    chosen = [17, 3, 8, 22, 0, 11, 5, 14]
    (tmp_path / "1percent.txt").write_text("\n".join(names[i] for i in chosen) + "\n")
    r = ft.recipe(ml_collections.ConfigDict(dict(finetune_task.default_config(),
                                                 subset_file=str(tmp_path / "1percent.txt"))))
    positions = ft.tfds_subset_positions(source, r, log=lambda _: None)
    # Positions in the split's stored order (TFDS shuffles examples when it writes them).
    stored = pipeline.tfds_feature_values(source.builder, source.split, "file_name")
    assert sorted(stored) == sorted(names)
    assert [stored[p] for p in positions] == [names[i] for i in chosen]

    def epoch(process, count=2, seed=3, start_step=0):  # 8 examples / global batch 4: 2 steps
        it = pipeline.tfds_subset_canvases(source.builder, source.split, positions,
                                           global_batch=4, seed=seed, canvas_size=20,
                                           start_step=start_step, process_index=process,
                                           process_count=2)
        batches = [next(it) for _ in range(count)]
        for b in batches:  # each canvas holds the stored image of its id (label), zeros around
            assert b["image"].shape == (2, 20, 20, 3) and (b["size"] == 16).all()
            np.testing.assert_array_equal(b["image"][:, :16, :16], images[b["label"]])
            assert not b["image"][:, 16:].any() and not b["image"][:, :, 16:].any()
        return np.concatenate([b["label"] for b in batches])

    p0, p1 = epoch(0), epoch(1)
    assert len(p0) == len(p1) == 4 and not set(p0) & set(p1)
    assert set(p0) | set(p1) == set(chosen)  # exactly the file's examples, each once
    np.testing.assert_array_equal(epoch(0), p0)  # a function of (seed, step)
    np.testing.assert_array_equal(epoch(0, count=1, start_step=1), p0[2:])
    assert set(epoch(0, count=4)[4:]) | set(epoch(1, count=4)[4:]) == set(chosen)  # epoch 2

    # With a cache: the same batches, and once filled the split's own files are not read again.
    def cached(process):
        it = pipeline.tfds_subset_canvases(source.builder, source.split, positions,
                                           global_batch=4, seed=3, canvas_size=20,
                                           process_index=process, process_count=2,
                                           cache_dir=str(tmp_path / "cache"))
        return np.concatenate([next(it)["label"] for _ in range(4)])

    first = cached(0)
    np.testing.assert_array_equal(first[:4], p0)
    records = list((tmp_path / "data" / "tiny_named" / "1.0.0").glob("*-train.tfrecord*"))
    assert records
    for record in records:
        record.unlink()
    np.testing.assert_array_equal(cached(0), first)


@needs_tf
def test_unknown_tfds_file_names_fail_before_training(tmp_path, monkeypatch):
    _, names = named_tfds(tmp_path / "data")
    (tmp_path / "10percent.txt").write_text(
        f"{names[4]}\nn09999999_1.JPEG\n{names[2]}\nn09999999_2.JPEG\nn09999999_3.JPEG\n")
    config = streamed_config(tmp_path, "10percent.txt")
    monkeypatch.setattr(finetune_task, "pretrained_backbone",
                        lambda config, workdir: (small_backbone(), None, "random init"))
    monkeypatch.setattr(ft, "finetune_streamed", lambda *a, **k: pytest.fail("it trained"))
    with pytest.raises(ValueError) as error:
        finetune_task.run(config, str(tmp_path / "work"))
    message = str(error.value)
    assert message.startswith(f"config.finetune.subset_file={tmp_path / '10percent.txt'}: "
                              f"3 of 5 entries are not in the training split")
    for line, name in ((2, "n09999999_1.JPEG"), (4, "n09999999_2.JPEG"),
                       (5, "n09999999_3.JPEG")):
        assert f"10percent.txt:{line}: {name!r} is not a file of tiny_named split 'train'" \
            in message
    assert names[4] not in message


def streamed_config(tmp_path, subset_file):
    """A config streaming 'tiny_named' (config.data.in_memory=False), fine-tuning on
    `subset_file` for 2 epochs of batch 8, scored on 16x16 centre crops."""
    config = base_config("rotnet")
    config.data.update(dict(source="tfds", name="tiny_named", data_dir=str(tmp_path / "data"),
                            in_memory=False, normalization="cifar"))
    config.eval.image_size = 16
    config.finetune.update(dict(subset_file=str(tmp_path / subset_file), epochs=2, batch_size=8,
                                eval_every=1, crop_scale=(0.5, 1.0)))
    return config


def _streamed_random_init(tmp_path, monkeypatch):
    """A tiny named TFDS dataset (2 classes), subset.txt listing its first 16 file names, and the
    task's pre-trained network replaced by a small one at random init ("random init")."""
    _, names = named_tfds(tmp_path / "data", label_of=lambda i: i % 2, num_classes=2)
    (tmp_path / "subset.txt").write_text("\n".join(names[:16]) + "\n")
    backbone = small_backbone()
    variables = jax.device_get(jax.jit(
        lambda k: backbone.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(jax.random.key(0)))
    monkeypatch.setattr(finetune_task, "pretrained_backbone",
                        lambda config, workdir: (backbone, variables, "random init"))


@needs_tf
def test_streamed_finetune_task_end_to_end(tmp_path, monkeypatch):
    _streamed_random_init(tmp_path, monkeypatch)
    # Nothing is loaded whole: the in-memory readers must not be called.
    monkeypatch.setattr(finetune_task, "load_split", _streamed_only(finetune_task.load_split))
    seen = []
    monkeypatch.setattr(ft, "streamed_accuracy", _recording(ft.streamed_accuracy, seen))
    config = streamed_config(tmp_path, "subset.txt")
    config.eval.data.source = "digits"  # the probes' other dataset: not the fine-tuning's test
    result = finetune_task.run(config, str(tmp_path / "work"))
    assert result["num_labelled"] == 16 and result["percent"] == pytest.approx(100 * 16 / 24)
    assert [e for e, _, _ in result["history"]] == [1, 2] and 0.0 <= result["top1"] <= 1.0
    assert len(seen) == 2 and seen[0].num_examples == 10  # the test split, streamed in batches
    assert seen[0].transform.describe() == "resize(18)+center_crop(16)"
    saved = json.loads((tmp_path / "work" / "eval" / "finetune.json").read_text())
    assert saved["random init"]["subset.txt"]["top1"] == result["top1"]


def _streamed_only(load_split):
    def guarded(config, split):
        assert split == "train", "the test split must be streamed (evaluation_input)"
        out = load_split(config, split)
        assert isinstance(out, datasets.TfdsSource), "the training split was loaded into memory"
        return out
    return guarded


def _recording(function, seen):
    def wrapper(logits_fn, variables, test, batch_size, mesh):
        seen.append(test)
        return function(logits_fn, variables, test, batch_size, mesh)
    return wrapper


def test_top1_top5_match_torch():
    """The fine-tuning scores (the OBoW paper reports its semi-supervised results as top-5)
    against torch.topk, ties excluded by continuous random logits; fewer than 5 classes: top-5
    counts every class."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 12)).astype(np.float32), rng.integers(0, 12, 200)
    top5 = torch.topk(torch.from_numpy(logits), 5, dim=1).indices.numpy()
    expected5 = np.mean(np.any(top5 == labels[:, None], axis=1))
    expected1 = np.mean(logits.argmax(1) == labels)
    assert ft.top1_top5(logits, labels) == pytest.approx((expected1, expected5))
    assert ft.top1_top5(logits[:, :3], labels % 3)[1] == 1.0


@needs_tf
def test_streamed_finetune_task_resumes_after_a_crash(tmp_path, monkeypatch):
    """The task on a streamed TFDS split (2 epochs of 2 steps), crashed after step 3: the rerun
    resumes from epoch 1's checkpoint in <workdir>/eval/finetune/random_init/subset.txt/
    checkpoints (network/subset), streams from step 2 on, and ends with the parameters and
    result of an uninterrupted run."""
    _streamed_random_init(tmp_path, monkeypatch)
    config = streamed_config(tmp_path, "subset.txt")
    config.finetune.cache_subset = False
    through = finetune_task.run(config, str(tmp_path / "a"))
    folder = lambda work: (tmp_path / work / "eval" / "finetune" / "random_init" / "subset.txt"
                           / "checkpoints")
    assert sorted(os.listdir(folder("a"))) == ["2", "4"]

    def crash_at_3(done):
        if done == 3:
            raise Stop

    streamed, seen = ft.finetune_streamed, []
    monkeypatch.setattr(ft, "finetune_streamed", functools.partial(streamed, hooks=[crash_at_3]))
    with pytest.raises(Stop):
        finetune_task.run(config, str(tmp_path / "b"))
    assert sorted(os.listdir(folder("b"))) == ["2"]
    monkeypatch.setattr(ft, "finetune_streamed", functools.partial(streamed, hooks=[seen.append]))
    resumed = finetune_task.run(config, str(tmp_path / "b"))
    assert seen == [3, 4]
    assert resumed == through and [e for e, _, _ in resumed["history"]] == [1, 2]
    jax.tree.map(np.testing.assert_array_equal, _saved_state(folder("b"), 4),
                 _saved_state(folder("a"), 4))
