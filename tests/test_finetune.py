"""Semi-supervised fine-tuning: the labelled subset (file and seed, class-balanced), the two
learning rates against a hand-computed SGD step, and a tiny real run on digits above chance."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from bow_jax.data import datasets
from bow_jax.evaluate import finetune as ft
from bow_jax.tasks import finetune as finetune_task
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
    with pytest.raises(ValueError, match=r"bad.txt:2: index 10 is outside .*\[0, 10\)"):
        ft.read_subset_file(tmp_path / "bad.txt", 10)
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
    views = jax.jit(lambda k, x: ft.train_views(k, x, 8, (0.5, 1.0), flip=True))(
        jax.random.key(0), images)
    assert views.shape == (4, 8, 8, 3) and views.dtype == jnp.uint8
    full = jax.jit(lambda x: ft.eval_views(x, 8))(images)
    assert full.shape == (4, 8, 8, 3) and full.dtype == jnp.uint8
    assert ft.eval_views(images, 12) is images


# ------------------------------------------------------------------------------------------------
# A tiny real run.


def test_tiny_finetune_on_digits_beats_chance(tmp_path):
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
    assert [e for e, _ in result["history"]] == [5, 10] and len(logs) == 2
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
