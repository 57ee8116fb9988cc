"""Streamed, sharded, cached evaluation features (`evaluate.cache`, `data.eval_input`): equal to
in-memory extraction on the same images for arrays, image folders and TFDS; the cache reused and
a damaged one recomputed; the evaluate task end to end on a streamed TFDS split."""
import json
import os
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax import tasks
from bow_jax.config import base_config
from bow_jax.data import datasets, eval_input
from bow_jax.protocols import cache, features, fewshot, runner
from bow_jax.lib import sharding
from bow_jax.tasks import common

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

SIZE = 8  # the toy encoder's image side


def _toy_encoder(traces, side=SIZE, dim=6):
    """A fixed random projection of the pixels; `traces` counts its traces (one per pass)."""
    proj = jnp.asarray(np.random.default_rng(13).normal(size=(side * side * 3, dim)), jnp.float32)

    def encode(images):
        traces.append(images.shape)
        x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
        return x @ proj

    return encode


def _arrays(n, rng, side=SIZE, classes=3):
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return datasets.ArrayDataset(images, (np.arange(n) % classes).astype(np.int32), classes, "toy")


def _input(data, split="train"):
    return runner.as_input(data, split)


def test_arrays_stream_equals_in_memory_with_flip():
    data = _arrays(27, np.random.default_rng(0))
    traces = []
    encode = _toy_encoder(traces)
    got = cache.split_features(encode, _input(data), 16, sharding.make_mesh(), flip=True)
    # One compile for all batches (centre and flip traced in one call); the (1, ...) trace is
    # the shape probe of the feature dimension.
    assert [t for t in traces if t[0] != 1] == [(16, SIZE, SIZE, 3)] * 2
    want, want_flip = features.extract_features(encode, data.images, 16, flip=True)
    np.testing.assert_array_equal(got.feats, want)
    np.testing.assert_array_equal(got.labels, data.labels)
    # The flip features are the features of the flipped images (numpy reference).
    proj = np.random.default_rng(13).normal(size=(3 * SIZE ** 2, 6))
    flipped = data.images[:, :, ::-1].astype(np.float64).reshape(27, -1) / 255.0
    np.testing.assert_allclose(got.flip_feats, flipped @ proj, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got.flip_feats, got.feats)


@pytest.mark.parametrize("n,count,batch", [(10, 3, 4), (2, 4, 2), (16, 2, 8)])
def test_process_shards_cover_the_split_once_with_equal_batch_counts(n, count, batch):
    """Every process runs the same number of batches (padding rows: index -1, zero images), and
    the processes' real rows are the split, each example once, in its own image."""
    data = _arrays(n, np.random.default_rng(1))
    runs = [list(eval_input.local_batches(_input(data), batch, p, count)) for p in range(count)]
    assert len({len(r) for r in runs}) == 1
    index = np.concatenate([b.index for r in runs for b in r])
    assert sorted(index[index >= 0]) == list(range(n))
    for b in (b for r in runs for b in r):
        real = b.index >= 0
        np.testing.assert_array_equal(b.images[real], data.images[b.index[real]])
        np.testing.assert_array_equal(b.labels[real], data.labels[b.index[real]])
        assert not b.images[~real].any() and (b.labels[~real] == -1).all()


def _image_folder(root, rng, per_class=(4, 3)):
    from PIL import Image
    for c, count in enumerate(per_class):
        os.makedirs(root / "train" / f"class{c}")
        for i in range(count):
            h, w = rng.integers(9, 15, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "train" / f"class{c}" / f"{i}.png")


def _config(**data):
    c = base_config("rotnet")
    c.data.update(data)
    return c


def test_image_folder_stream_equals_load_image_folder(tmp_path):
    _image_folder(tmp_path, np.random.default_rng(2))
    config = _config(source="image_folder", path=str(tmp_path), image_size=SIZE)
    inp = eval_input.evaluation_input(config, "train")
    assert isinstance(inp, eval_input.ImageFolderInput) and len(inp) == 7
    encode = _toy_encoder([])
    got = cache.split_features(encode, inp, 8)
    loaded = datasets.load_image_folder(tmp_path / "train", SIZE)
    np.testing.assert_array_equal(got.labels, loaded.labels)
    np.testing.assert_array_equal(got.feats, features.extract_features(encode, loaded.images, 8))


def test_torchvision_resize_center_crop_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image
    image = np.random.default_rng(3).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    want = np.asarray(tv.CenterCrop(16)(tv.Resize(18)(Image.fromarray(image))))
    np.testing.assert_array_equal(eval_input.torchvision_resize_center_crop(image, 18, 16), want)


# ------------------------------------------------------------------------------------------- TFDS

N_TRAIN, N_TEST, CLASSES = 24, 18, 3


def _tfds_images(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, tuple(rng.integers(17, 24, 2)) + (3,), dtype=np.uint8)
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A prepared TFDS dataset of images of several sizes (as ImageNet), built offline."""
    data_dir = tmp_path_factory.mktemp("tfds")
    images = {"train": _tfds_images(N_TRAIN, 4), "test": _tfds_images(N_TEST, 5)}

    def split(name):
        def gen():
            for i, image in enumerate(images[name]):
                yield {"image": image, "label": i % CLASSES}
        return tf.data.Dataset.from_generator(gen, output_signature={
            "image": tf.TensorSpec((None, None, 3), tf.uint8),
            "label": tf.TensorSpec((), tf.int64)})

    feats = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                        "label": tfds.features.ClassLabel(num_classes=CLASSES)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_sizes", version="1.0.0", features=feats, data_dir=str(data_dir),
        split_datasets={"train": split("train"), "test": split("test")})
    return str(data_dir), images


def _tfds_config(data_dir, **evals):
    c = _config(source="tfds", name="tiny_sizes", data_dir=data_dir, in_memory=False)
    c.eval.update(evals)
    return c


def test_tfds_stream_equals_in_memory_transform(tiny_tfds):
    data_dir, images = tiny_tfds
    inp = eval_input.evaluation_input(_tfds_config(data_dir, image_size=SIZE, resize_shorter=10),
                                      "test")
    assert inp.transform == eval_input.Transform("resize_center_crop", 10, SIZE)
    encode = _toy_encoder([])
    got = cache.split_features(encode, inp, 8)
    # In memory: the whole split read in the dataset's order (TFDS stores examples in its own
    # order, not the generator's), each image transformed on its own.
    whole = list(tfds.as_numpy(inp.source.builder.as_dataset(split="test", shuffle_files=False)))
    assert sorted(x["image"].tobytes() for x in whole) == sorted(x.tobytes()
                                                                for x in images["test"])
    reference = np.stack([inp.transform.tf(tf.constant(x["image"])).numpy() for x in whole])
    np.testing.assert_array_equal(got.labels, [x["label"] for x in whole])
    np.testing.assert_array_equal(got.feats, features.extract_features(encode, reference, 8))
    # Each of 4 processes reads its slice split[start:stop] of the same fixed order.
    rows = [b for p in range(4) for b in eval_input.local_batches(inp, 2, p, 4)]
    index = np.concatenate([b.index for b in rows])
    assert sorted(index[index >= 0]) == list(range(N_TEST))
    for b in rows:
        real = b.index >= 0
        np.testing.assert_array_equal(b.images[real], reference[b.index[real]])


def test_tfds_images_of_several_sizes_default_to_imagenet_transform(tiny_tfds):
    inp = eval_input.evaluation_input(_tfds_config(tiny_tfds[0]), "train")
    assert inp.transform == eval_input.Transform("resize_center_crop", 256, 224)
    assert inp.image_shape == (224, 224, 3) and len(inp) == N_TRAIN


# ------------------------------------------------------------------------------------------ cache

def test_cache_is_reused_and_a_truncated_file_recomputed(tmp_path, monkeypatch):
    data = _arrays(20, np.random.default_rng(6))
    encode = _toy_encoder([])
    passes, stream = [], cache._stream

    def counted(*args, **kwargs):  # the extractor's passes over a split (compiled once)
        passes.append(1)
        return stream(*args, **kwargs)

    monkeypatch.setattr(cache, "_stream", counted)
    encoded = lambda: len(passes)

    kwargs = dict(workdir=str(tmp_path), tag="step_3", feature="pooled")
    first = cache.split_features(encode, _input(data), 8, flip=True, **kwargs)
    paths = cache.cache_paths(str(tmp_path), "step_3", "pooled", "train")
    first_feats, first_flip = np.array(first.feats), np.array(first.flip_feats)  # off the map
    assert first.where == paths["folder"] and encoded() == 1
    header = json.loads(open(paths["header"]).read())
    assert header["num_examples"] == 20 and header["feature_dim"] == 6 and header["flip"]
    assert not [f for f in os.listdir(paths["folder"]) if f.endswith(".tmp")]

    again = cache.split_features(encode, _input(data), 8, **kwargs)  # centre only: a subset
    assert encoded() == 1, "the cache was not reused"
    np.testing.assert_array_equal(again.feats, first_feats)
    np.testing.assert_array_equal(again.labels, data.labels)

    size = os.path.getsize(paths["feats"])
    with open(paths["feats"], "r+b") as f:
        f.truncate(size - 24)  # a partial write
    redone = cache.split_features(encode, _input(data), 8, flip=True, **kwargs)
    assert encoded() == 2 and os.path.getsize(paths["feats"]) == size
    np.testing.assert_array_equal(redone.feats, first_feats)
    np.testing.assert_array_equal(redone.flip_feats, first_flip)

    other = _arrays(20, np.random.default_rng(7))   # another source of the same size, new name
    other = datasets.ArrayDataset(other.images, other.labels, 3, "other")
    cache.split_features(encode, _input(other), 8, **kwargs)
    assert encoded() == 3, "a cache of another source was trusted"


def test_streamed_pass_memory_is_bounded(tmp_path):
    """Host memory of the cached pass (rows go to a memory map) does not grow with the split:
    from 256 to 2048 images its tracemalloc peak grows by far less than the 2048 x 1024 float32
    features (8 MiB) that the in-memory `extract_features` holds (twice: chunks + result)."""
    encode = _toy_encoder([], side=16, dim=1024)

    def peak(fn):
        tracemalloc.start()
        fn()
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result / 2**20

    def streamed(n):
        data = _arrays(n, np.random.default_rng(n), side=16)
        return peak(lambda: cache.split_features(encode, _input(data), 64, workdir=str(tmp_path),
                                                 tag=str(n), feature="f"))

    small, large = streamed(256), streamed(2048)
    images = _arrays(2048, np.random.default_rng(8), side=16).images
    in_memory = peak(lambda: features.extract_features(encode, images, 64))
    print(f"tracemalloc peak: streamed 256: {small:.2f} MiB, 2048: {large:.2f} MiB; "
          f"in memory 2048: {in_memory:.2f} MiB")
    assert large - small < 1.0 and in_memory > large + 8.0


# --------------------------------------------------------------------------------------- few-shot

def test_fewshot_imagenet_protocol_50_way_one_query():
    """OBoW's ImageNet low-shot protocol: 50-way, 1 and 5 shots, 1 query, 200 episodes, with the
    95% interval; checked against numpy prototypes."""
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(60, 16)) * 1.2
    labels = np.repeat(np.arange(60), 7)
    feats = (centres[labels] + rng.normal(size=(labels.size, 16))).astype(np.float32)
    out = fewshot.evaluate_fewshot(feats, labels, (1, 5), n_way=50, n_query=1, n_episodes=200)
    for shot in (1, 5):
        s_idx, q_idx, q_labels = fewshot.sample_episodes(labels, 50, shot, 1, 200, 0)
        assert s_idx.shape == (200, 50 * shot) and q_idx.shape == (200, 50)
        accs = []
        for s, q, ql in zip(s_idx, q_idx, q_labels):
            sup = feats[s] / np.linalg.norm(feats[s], axis=1, keepdims=True)
            protos = sup.reshape(50, shot, -1).mean(1)
            protos /= np.linalg.norm(protos, axis=1, keepdims=True)
            accs.append(np.mean((feats[q] @ protos.T).argmax(1) == ql))
        accs = np.asarray(accs)
        assert 0.05 < accs.mean() < 0.999 and accs.std() > 0
        np.testing.assert_allclose(out[shot]["mean"], accs.mean(), rtol=1e-6)
        np.testing.assert_allclose(out[shot]["ci95"], 1.96 * accs.std() / np.sqrt(200), rtol=1e-5)
    assert out[5]["mean"] > out[1]["mean"]


# ------------------------------------------------------------------------------- evaluate task

def test_evaluate_task_on_streamed_tfds_writes_results(tiny_tfds, tmp_path, monkeypatch):
    """OBoW (tiny ResNet) on a TFDS split with config.data.in_memory=False and images of several
    sizes: the evaluate task streams both splits, caches their features (with the flip features
    of the imagenet_r18_obow protocol) and writes the results; a second run reuses the cache.
    Nothing is patched on the way in: the real evaluation checks accept a streamed TFDS split."""
    import obow_multihost_worker  # tests/ is on sys.path: the tiny OBoW setting
    c = obow_multihost_worker.tiny_config(fast=True)
    c.data.update(dict(source="tfds", name="tiny_sizes", data_dir=tiny_tfds[0], in_memory=False,
                       limit=0))
    c.eval.update(dict(image_size=16, resize_shorter=18, batch_size=8,
                       linear_protocol="imagenet_r18_obow", linear_epochs=1, fewshot_ways=3,
                       fewshot_queries=2, fewshot_shots=(1,), fewshot_episodes=5, knn_k=3,
                       test_limit=15))
    c.task = "evaluate"
    with common.restore(c, str(tmp_path)) as run:
        run.checkpointer.save(0, run.state, c)
    # The first run extracts through the one compiled extractor, `features.iter_features` (the
    # name cache.py calls): counted here, so that "no call" on the second run means something.
    calls, extract = [], features.iter_features
    monkeypatch.setattr(features, "iter_features",
                        lambda *a, **k: calls.append(1) or extract(*a, **k))
    results = tasks.run(c, str(tmp_path))
    assert len(calls) >= 2  # train (with its flip features) and test were extracted
    row = results["obow step 0"]
    assert set(row) >= {"linear", "fewshot", "knn"} and 0 <= row["linear"]["top1"] <= 1
    folder = cache.cache_paths(str(tmp_path), "step_0", "pooled", "train")["folder"]
    assert sorted(os.listdir(folder)) == ["test.json", "test.npy", "test_labels.npy",
                                          "train.json", "train.npy", "train_flip.npy",
                                          "train_labels.npy"]
    assert np.load(os.path.join(folder, "test.npy")).shape[0] == 15
    assert json.loads(open(tmp_path / "eval" / "results.json").read()) == results
    calls.clear()
    monkeypatch.setattr(features, "iter_features", lambda *a, **k: calls.append(1) or iter(()))
    assert tasks.run(c, str(tmp_path)) == results and not calls
