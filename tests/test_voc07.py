"""Pascal VOC07 SVM classification (`protocols.voc07`) against a reference written here from the
benchmark's description (fair_self_supervision_benchmark `tools/svm/`), multi-label targets
through the streamed, cached feature path (`data.eval_input`, `protocols.cache`) on a tiny
TFDS dataset shaped like `voc/2007`, the 'resize_whole' transform and the k x k pooled features."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from bow_jax.config import base_config, get_recipe
from bow_jax.data import eval_input
from bow_jax.lib.errors import InputError
from bow_jax.methods import interface
from bow_jax.protocols import cache, voc07

# ------------------------------------------------------------------------------------------------
# The protocol against an independent reference.


def _reference_ap(scores, targets):
    """The benchmark's AP, written out: rank by score, per-rank P/R, envelope, sum at changes."""
    keep = targets != -1
    s, t = scores[keep], (targets[keep] > 0).astype(float)
    t = t[np.argsort(-s, kind="stable")]
    tp, fp = np.cumsum(t), np.cumsum(1 - t)
    prec, rec = tp / (tp + fp), tp / t.sum()
    mrec, mpre = np.r_[0.0, rec, 1.0], np.r_[0.0, prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    changes = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in changes))


def _reference_svm(xtr, ttr, xte, tte, costs):
    norm = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)  # noqa: E731
    xtr, xte = norm(xtr.astype(np.float64)), norm(xte.astype(np.float64))
    aps, chosen = [], []
    for c in range(ttr.shape[1]):
        y = np.where(ttr[:, c] == 1, 1, -1)

        def svm(cost):
            return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty="l2",
                             loss="squared_hinge", dual=True, tol=1e-4, max_iter=2000,
                             random_state=0)
        cv = [cross_val_score(svm(k), xtr, y, cv=3, scoring="average_precision").mean()
              for k in costs]
        best = costs[int(np.argmax(cv))]
        chosen.append(best)
        aps.append(_reference_ap(svm(best).fit(xtr, y).decision_function(xte), tte[:, c]))
    return aps, chosen


def _multilabel_data(n, rng, classes=4, dim=8):
    """Features with a weak per-class signal; targets 1 / 0 and some -1 (difficult only)."""
    present = rng.random((n, classes)) < 0.35
    present[np.arange(classes) % n, np.arange(classes)] = True
    targets = present.astype(np.int8)
    targets[(rng.random((n, classes)) < 0.1) & ~present] = -1
    signal = np.zeros((classes, dim))
    signal[np.arange(classes), np.arange(classes)] = 1.0
    feats = rng.normal(size=(n, dim)) * 0.8 + present @ signal + 0.5
    return feats.astype(np.float32), targets


def test_voc07_svm_matches_reference():
    rng = np.random.default_rng(0)
    xtr, ttr = _multilabel_data(60, rng)
    xte, tte = _multilabel_data(40, rng)
    costs = voc07.COSTS
    got = voc07.voc07_svm(xtr, ttr, xte, tte, costs=costs, n_jobs=1)
    aps, chosen = _reference_svm(xtr, ttr, xte, tte, costs)
    np.testing.assert_allclose(got["per_class_ap"], aps, atol=1e-6)
    assert got["costs"] == chosen
    assert abs(got["mAP"] - np.mean(aps)) < 1e-6 and 0.5 < got["mAP"] <= 1.0
    assert len(costs) == 23 and costs == tuple(sorted(costs))


def test_voc_average_precision_hand_example_leaves_difficult_out():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    targets = np.array([1, 0, -1, 1, 0, 1])
    # Ranked without the difficult image: P N P N P; recall steps of 1/3 at precisions
    # 1, 2/3, 3/5 (envelope unchanged): AP = (1 + 2/3 + 3/5) / 3 = 34/45.
    assert voc07.voc_average_precision(scores, targets) == pytest.approx(34 / 45, abs=1e-12)
    # Counted as a negative it would rank P N N P N P: (1 + 1/2 + 1/2) / 3.
    assert voc07.voc_average_precision(scores, np.where(targets == -1, 0, targets)) == \
        pytest.approx(2 / 3, abs=1e-12)
    with pytest.raises(InputError):
        voc07.voc_average_precision(scores, np.zeros(6, int))


def test_voc07_svm_rejects_bad_targets():
    rng = np.random.default_rng(1)
    x, t = _multilabel_data(20, rng)
    with pytest.raises(InputError, match="targets"):
        voc07.voc07_svm(x, t[:, 0], x, t)
    few = t.copy()
    few[:, 2] = 0
    few[0, 2] = 1
    with pytest.raises(InputError, match=r"classes \[2\]"):
        voc07.voc07_svm(x, few, x, t)


# ------------------------------------------------------------------------------------------------
# Pooled features.


def test_adaptive_avg_pool_matches_torch_and_named_feature():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for side, k in ((7, 2), (14, 3), (5, 3)):
        x = rng.normal(size=(2, side, side, 4)).astype(np.float32)
        want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), k)
        got = np.asarray(interface.adaptive_avg_pool(jnp.asarray(x), k))
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-6)

    class Backbone:  # outputs a fixed map, whatever the input
        def apply(self, variables, images, train):
            return {"layer4": jnp.asarray(x), "pooled": jnp.asarray(x).mean(axis=(1, 2))}
    images = np.zeros((2, 4, 4, 3), np.uint8)
    got = interface.encode_with(Backbone(), None, images, "layer4_pool3", (0.0,) * 3, (1.0,) * 3)
    assert got.shape == (2, 3 * 3 * 4)
    np.testing.assert_allclose(got.reshape(2, 3, 3, 4),
                               interface.adaptive_avg_pool(jnp.asarray(x), 3), atol=1e-6)
    with pytest.raises(InputError, match="config.eval.feature"):
        interface.encode_with(Backbone(), None, images, "layer4_pool6", (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(InputError, match="config.eval.feature"):
        interface.encode_with(Backbone(), None, images, "layer9_pool2", (0.0,) * 3, (1.0,) * 3)


# ------------------------------------------------------------------------------------------------
# A tiny TFDS dataset with voc/2007's features, streamed and cached.

# Per split: (labels, labels_no_difficult) of each example; its image is filled with 10·id.
VOC_TINY = {
    "train": [([0, 3, 3], [3]), ([19], [19]), ([], [])],
    "validation": [([5, 0], [5, 0]), ([7], [])],
    "test": [([1, 2], [2]), ([4], [4]), ([0, 19, 19], [19])],
}


def _expected_targets(labels, clean):
    """1: a non-difficult instance, -1: only difficult instances, 0: absent (20 classes)."""
    out = np.zeros(20, np.int8)
    out[list(labels)] = -1
    out[list(clean)] = 1
    return out


def store_voc_like(name, data_dir, examples):
    """Writes a TFDS dataset `name` with voc/2007's features into `data_dir`: `examples` maps a
    split to a list of (image uint8 [H, W, 3], labels, labels_no_difficult)."""
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")

    def split(rows):
        def gen():
            for image, labels, clean in rows:
                yield {"image": image, "labels": np.array(labels, np.int64),
                       "labels_no_difficult": np.array(clean, np.int64)}
        return tf.data.Dataset.from_generator(gen, output_signature={
            "image": tf.TensorSpec((None, None, 3), tf.uint8),
            "labels": tf.TensorSpec((None,), tf.int64),
            "labels_no_difficult": tf.TensorSpec((None,), tf.int64)})

    label = tfds.features.ClassLabel(num_classes=20)
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", data_dir=str(data_dir),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "labels": tfds.features.Sequence(label),
            "labels_no_difficult": tfds.features.Sequence(label)}),
        split_datasets={s: split(rows) for s, rows in examples.items()})


@pytest.fixture(scope="module")
def voc_tiny(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("voc_tfds")
    ids = iter(range(1, 100))
    examples = {s: [(next(ids), *e) for e in rows] for s, rows in VOC_TINY.items()}
    store_voc_like("voc_tiny", data_dir, {
        s: [(np.full((12 + i % 3, 15, 3), 10 * i, np.uint8), lab, clean) for i, lab, clean in rows]
        for s, rows in examples.items()})
    by_value = {10 * i: _expected_targets(lab, clean)
                for rows in examples.values() for i, lab, clean in rows}
    return str(data_dir), by_value


def _voc_config(data_dir, **evals):
    c = base_config("rotnet")
    c.eval.data.update(dict(source="tfds", name="voc_tiny", data_dir=data_dir, in_memory=False))
    c.eval.update(dict(dict(image_size=8, resize_shorter=10, transform="resize_whole",
                            train_split="train+validation", test_split="test"), **evals))
    return c


def _pixel_mean(images):
    return images.astype(jnp.float32).mean(axis=(1, 2, 3))[:, None] * jnp.ones((1, 2))


def test_multilabel_targets_streamed_and_cached(voc_tiny, tmp_path):
    data_dir, by_value = voc_tiny
    config = _voc_config(data_dir)
    train = eval_input.evaluation_input(config, "train")
    assert (train.split, len(train), train.num_classes, train.label_shape) == \
        ("train+validation", 5, 20, (20,))
    assert train.transform == eval_input.Transform("resize_whole", 10, 8)
    # Examples [1, 4) cross the train / validation boundary: train[1:3]+validation[0:1].
    assert eval_input.tfds_slice(train.split, 1, 4, {"train": 3, "validation": 2}) == \
        "train[1:3]+validation[0:1]"
    for split, count in (("train", 5), ("test", 3)):
        inp = eval_input.evaluation_input(config, split)
        got = cache.split_features(_pixel_mean, inp, 8, workdir=str(tmp_path), tag="step_1",
                                   feature="pooled")
        assert got.labels.dtype == np.int8 and got.labels.shape == (count, 20) and got.multi_label
        want = np.stack([by_value[round(v)] for v in got.feats[:, 0]])  # uniform images
        np.testing.assert_array_equal(got.labels, want)

        def fail(images):
            raise AssertionError("the cached features must be read back, not recomputed")
        again = cache.split_features(fail, inp, 8, workdir=str(tmp_path), tag="step_1",
                                     feature="pooled")
        np.testing.assert_array_equal(again.labels, want)
        np.testing.assert_array_equal(again.feats, got.feats)
    header = json.load(open(os.path.join(again.where, "test.json")))
    assert header["label_shape"] == [20] and header["key"]["labels"] == "multilabel[20]"
    assert os.path.exists(os.path.join(again.where, "train+validation_labels.npy"))


def test_resize_whole_transform(voc_tiny):
    tf = pytest.importorskip("tensorflow")
    from PIL import Image
    image = np.random.default_rng(3).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    # Reference: shorter side 20 (torchvision Resize(20): 20 x int(20·45/30) = 20 x 30), then
    # the whole image to 16 x 16, Pillow bilinear both times.
    step = Image.fromarray(image).resize((30, 20), Image.Resampling.BILINEAR)
    want = np.asarray(step.resize((16, 16), Image.Resampling.BILINEAR)).astype(int)
    transform = eval_input.Transform("resize_whole", 20, 16)
    np.testing.assert_array_equal(transform.pil(image), want)
    got = transform.tf(tf.constant(image)).numpy().astype(int)
    assert got.shape == (16, 16, 3) and np.abs(got - want).mean() < 2.0
    config = _voc_config(voc_tiny[0], transform="resize_crop")
    with pytest.raises(InputError, match="config.eval.transform"):
        eval_input.evaluation_input(config, "test")
    with pytest.raises(InputError, match="config.eval.train_split"):
        eval_input.evaluation_input(_voc_config(voc_tiny[0], train_split="train+val"), "train")


# ------------------------------------------------------------------------------------------------
# From the command line: `--config.task=evaluate --config.eval.protocols=voc07_svm` on a tiny
# TFDS dataset with voc/2007's features, streamed, cached, and the SVMs of the cached features.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cyclic_rows(count, offset):
    """Examples j = offset .. offset + count - 1, each a positive of classes j, j + 7 and j + 13
    (mod 20): over 20 consecutive j every class is a positive 3 times (the protocol needs 3 to
    cross-validate); every 4th example also holds a difficult-only instance of class j + 3."""
    rows = []
    for j in range(offset, offset + count):
        clean = [j % 20, (j + 7) % 20, (j + 13) % 20]
        rows.append((clean + ([(j + 3) % 20] if j % 4 == 0 else []), clean))
    return rows


@pytest.fixture(scope="module")
def voc_cli(tmp_path_factory):
    """(data_dir of `voc_cli`: train 12 + validation 12 + test 20 examples of varying sizes and
    random pixels, a workdir holding the demo network's initial state as a step-1 checkpoint)."""
    from bow_jax.tasks import common  # pylint: disable=import-outside-toplevel
    rows = {"train": _cyclic_rows(12, 0), "validation": _cyclic_rows(12, 12),
            "test": _cyclic_rows(20, 5)}
    rng = np.random.default_rng(0)
    data_dir = str(tmp_path_factory.mktemp("voc_cli_tfds"))
    store_voc_like("voc_cli", data_dir, {s: [
        (rng.integers(0, 256, (int(rng.integers(18, 30)), int(rng.integers(18, 30)), 3),
                      dtype=np.uint8), lab, clean) for lab, clean in split_rows]
        for s, split_rows in rows.items()})
    workdir = str(tmp_path_factory.mktemp("voc_cli_run"))
    config = get_recipe(os.path.join(REPO, "configs", "demo_rotnet.py"))
    config.model.kwargs.width = 4
    with common.restore(config, workdir) as run:  # the initial state, saved as step 1
        run.checkpointer.save(1, run.state.replace(step=np.int32(1)), config)
    return data_dir, workdir, config


def test_voc07_svm_from_the_command_line_streamed_and_cached(voc_cli):
    """`python -m bow_jax.main ... --config.task=evaluate --config.eval.protocols=('voc07_svm',)`
    scores the checkpoint on the TFDS data, streamed: its features and [N, 20] targets are cached
    in the workdir, and results.json holds the mAP and costs of `voc07.voc07_svm` on them (the
    cache is read back without a feature pass in test_multilabel_targets_streamed_and_cached)."""
    data_dir, workdir, config = voc_cli
    flags = ["--config.task=evaluate", "--config.eval.protocols=('voc07_svm',)",
             "--config.eval.data.source=tfds", "--config.eval.data.name=voc_cli",
             f"--config.eval.data.data_dir={data_dir}", "--config.eval.data.in_memory=False",
             "--config.eval.train_split=train+validation", "--config.eval.test_split=test",
             "--config.eval.transform=resize_whole", "--config.eval.image_size=16",
             "--config.eval.batch_size=8", "--config.eval.feature=pooled",
             "--config.eval.random_init=False", "--config.model.kwargs.width=4"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "-m", "bow_jax.main", "--config=configs/demo_rotnet.py",
               f"--workdir={workdir}", *flags]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "VOC07 mAP" in first.stdout
    folder = os.path.join(workdir, "eval", "features", "step_1", "pooled")
    feats = {s: np.load(os.path.join(folder, f"{s}.npy")) for s in ("train+validation", "test")}
    targets = {s: np.load(os.path.join(folder, f"{s}_labels.npy")) for s in feats}
    assert targets["test"].shape == (20, 20) and targets["test"].dtype == np.int8
    want = voc07.voc07_svm(feats["train+validation"], targets["train+validation"], feats["test"],
                           targets["test"], n_jobs=1)
    with open(os.path.join(workdir, "eval", "results.json"), encoding="utf-8") as f:
        got = json.load(f)["rotnet step 1"]["voc07_svm"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-9) and got["costs"] == want["costs"]
