"""Data sources and the host input pipeline.

References: the shared CIFAR-10 npz (the README says jpeg.npz decodes to it exactly), Pillow for
decoding and resizing, scikit-learn's digits, numpy set arithmetic for the data order, and the
torchvision transform definitions written out in numpy for the views of canvases.
"""
import io
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from PIL import Image

from bow_jax.data import datasets as D
from bow_jax.data import geometric as G
from bow_jax.data import pipeline as P


def _png_bytes(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _config(**fields):
    return types.SimpleNamespace(**fields)


# ------------------------------------------------------------------------------------------------
# In-memory sources.


def test_load_npz_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    labels = np.array([0, 3, 1, 1, 2, 0, 3], np.int64)
    np.savez_compressed(tmp_path / "train.npz", images=images, labels=labels)
    ds = D.load_npz(tmp_path / "train.npz")
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int32 and ds.num_classes == 4 and len(ds) == 7
    sub = ds.subset([4, 1])
    np.testing.assert_array_equal(sub.images, images[[4, 1]])
    np.testing.assert_array_equal(sub.labels, [2, 3])
    # Through the config: a folder holding <split>.npz.
    via_config = D.load_dataset(_config(source="npz", path=str(tmp_path)), "train")
    np.testing.assert_array_equal(via_config.images, images)
    with pytest.raises(FileNotFoundError, match=r"config\.data\.path: .*test\.npz does not exist"):
        D.load_dataset(_config(source="npz", path=str(tmp_path)), "test")


def test_load_jpeg_npz_synthetic(tmp_path):
    # PNG is lossless, so the decoded images must equal the originals bit for bit.
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    blobs = [np.frombuffer(_png_bytes(im), np.uint8) for im in images]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
    np.savez(tmp_path / "jpeg.npz", test_jpeg=np.concatenate(blobs), test_offsets=offsets,
             test_labels=np.arange(5))
    ds = D.load_jpeg_npz(tmp_path / "jpeg.npz", "test")
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, np.arange(5))
    assert len(D.load_jpeg_npz(tmp_path / "jpeg.npz", "test", limit=2)) == 2
    with pytest.raises(ValueError, match="train_jpeg"):
        D.load_jpeg_npz(tmp_path / "jpeg.npz", "train")


@pytest.fixture(scope="module")
def cifar10_train(cifar10_dir):
    return D.load_dataset(_config(source="npz", path=str(cifar10_dir)), "train")


def test_cifar10_npz(cifar10_train):
    assert cifar10_train.images.shape == (50000, 32, 32, 3)
    assert cifar10_train.images.dtype == np.uint8 and cifar10_train.num_classes == 10
    np.testing.assert_array_equal(np.bincount(cifar10_train.labels), [5000] * 10)


def test_cifar10_jpeg_matches_npz(cifar10_dir, cifar10_train):
    jpeg = D.load_dataset(_config(source="jpeg_npz", path=str(cifar10_dir), limit=200), "train")
    np.testing.assert_array_equal(jpeg.images, cifar10_train.images[:200])
    np.testing.assert_array_equal(jpeg.labels, cifar10_train.labels[:200])
    test_npz = D.load_npz(cifar10_dir / "test.npz")
    test_jpeg = D.load_jpeg_npz(cifar10_dir / "jpeg.npz", "test", limit=50)
    np.testing.assert_array_equal(test_jpeg.images, test_npz.images[:50])
    np.testing.assert_array_equal(test_jpeg.labels, test_npz.labels[:50])


def test_digits():
    from sklearn.datasets import load_digits
    ref = load_digits()
    train, test = D.load_digits("train", image_size=8), D.load_digits("test", image_size=8)
    assert train.images.shape[1:] == (8, 8, 3) and train.images.dtype == np.uint8
    assert len(train) + len(test) == 1797 and train.num_classes == 10
    # The split is by position: indices recover the originals; disjoint and complete.
    train_idx, test_idx = D.digits_split(ref.target, "train"), D.digits_split(ref.target, "test")
    assert not set(train_idx) & set(test_idx)
    assert sorted(np.concatenate([train_idx, test_idx])) == list(range(1797))
    np.testing.assert_array_equal(
        np.bincount(train.labels) + np.bincount(test.labels), np.bincount(ref.target))
    np.testing.assert_array_equal(np.bincount(test.labels), np.bincount(ref.target) // 5)
    gray = np.round(ref.images[test_idx] / 16 * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(test.images[..., c], gray)
    np.testing.assert_array_equal(test.labels, ref.target[test_idx])
    # Deterministic, and the upsampled version is Pillow's bilinear resize of the 8x8 image.
    np.testing.assert_array_equal(D.load_digits("test", image_size=8).images, test.images)
    big = D.load_digits("test", image_size=16)
    assert big.images.shape == (len(test), 16, 16, 3)
    pil = np.asarray(Image.fromarray(test.images[3]).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(big.images[3], pil)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    root = tmp_path / "train"
    for cls, count in (("zebra", 2), ("ant", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(wide).save(root / cls / f"{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    ds = D.load_dataset(_config(source="image_folder", path=str(tmp_path), image_size=16), "train")
    assert ds.images.shape == (3, 16, 16, 3) and ds.num_classes == 2
    np.testing.assert_array_equal(ds.labels, [0, 1, 1])  # 'ant' < 'zebra'
    # Reference: shorter side 20 -> 16 (so 40 -> 32), then the centre 16 columns.
    ref = np.asarray(Image.fromarray(wide).resize((32, 16), Image.Resampling.BILINEAR))[:, 8:24]
    np.testing.assert_array_equal(ds.images[0], ref)
    with pytest.raises(FileNotFoundError, match="config.data.path"):
        D.load_dataset(_config(source="image_folder", path=str(tmp_path), image_size=16), "test")


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.data\.path: .*images uint8"):
        D.load_dataset(_config(source="npz", path=str(tmp_path / "x" / "train.npz")), "train")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.path"):
        D.load_dataset(_config(source="jpeg_npz", path=str(tmp_path / "jpeg.npz")), "train")
    with pytest.raises(ValueError, match="valid: .*'npz'.*'tfds'"):
        D.load_dataset(_config(source="parquet"), "train")
    with pytest.raises(ValueError, match=r"config\.data\.path must be set"):
        D.load_dataset(_config(source="npz"), "train")


def test_in_memory_path_does_not_import_tensorflow(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from bow_jax.data import datasets as D, pipeline as P\n"
        "ds = D.load_digits('train', image_size=16)\n"
        "batch = next(iter(P.IndexLoader(len(ds), 32, 0, process_index=0, process_count=1,"
        " labels=ds.labels)))\n"
        "assert batch['index'].shape == (32,)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------
# Data order.


def test_epoch_permutation():
    a = P.epoch_permutation(3, 1, 50)
    np.testing.assert_array_equal(a, P.epoch_permutation(3, 1, 50))
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    assert not np.array_equal(a, P.epoch_permutation(3, 2, 50))
    assert not np.array_equal(a, P.epoch_permutation(4, 1, 50))


def test_batch_indices_cover_epoch_and_split_over_processes():
    n, gb = 103, 12  # 8 steps per epoch, 7 examples dropped each epoch
    assert P.steps_per_epoch(n, gb) == 8
    for epoch in range(2):
        steps = range(epoch * 8, epoch * 8 + 8)
        seen = np.concatenate([P.batch_indices(5, s, n, gb) for s in steps])
        assert len(set(seen.tolist())) == 96  # each index at most once
        np.testing.assert_array_equal(seen, P.epoch_permutation(5, epoch, n)[:96])
        for s in steps:
            whole = P.batch_indices(5, s, n, gb)
            parts = [P.batch_indices(5, s, n, gb, p, 3) for p in range(3)]
            assert all(part.dtype == np.int32 and part.shape == (4,) for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_index_loader_resume():
    labels = np.arange(30)[::-1] % 7
    full = P.IndexLoader(30, 8, seed=9, process_index=1, process_count=2, labels=labels)
    batches = [next(full) for _ in range(10)]
    resumed = P.IndexLoader(30, 8, seed=9, start_step=6, process_index=1, process_count=2,
                            labels=labels)
    for step in range(6, 10):
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], batches[step]["index"])
        np.testing.assert_array_equal(got["index"], P.batch_indices(9, step, 30, 8, 1, 2))
        np.testing.assert_array_equal(got["label"], labels[got["index"]])
    assert resumed.step == 10


def test_order_errors():
    with pytest.raises(ValueError, match="config.batch_size=64"):
        P.steps_per_epoch(10, 64)
    with pytest.raises(ValueError, match="number of processes"):
        P.batch_indices(0, 0, 100, 10, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        P.IndexLoader(100, 10, 0, process_index=2, process_count=2)


# ------------------------------------------------------------------------------------------------
# View helpers (torchvision semantics): views of canvases, cut on the device.

# TensorFlow is optional (the GPU machine has none): only the tests below need it.
try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
except ImportError:
    tf = tfds = None
needs_tf = pytest.mark.skipif(tf is None, reason="tensorflow / tensorflow_datasets not installed")


def _key(i):
    return jax.random.fold_in(jax.random.key(11), i)


def _canvas(image, side, fill=255):
    """`image` in the top-left corner of a canvas of `side`, the rest `fill` (which no view of the
    true image may show)."""
    canvas = np.full((side, side, 3), fill, np.uint8)
    canvas[:image.shape[0], :image.shape[1]] = image
    return canvas


def test_canvas_random_crop_pad_and_flip():
    """RandomCrop(8, padding=2) + RandomHorizontalFlip of an image on a canvas (the RotNet view,
    cut on the device from its true size): always a window of the zero-padded true image."""
    image = np.random.default_rng(3).integers(1, 256, (8, 8, 3), dtype=np.uint8)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    canvas = _canvas(image, 13)
    crop = jax.jit(lambda k: G.random_crop_with_padding(k, canvas, 8, 2,
                                                        true_size=np.array([8, 8], np.int32)))
    flip = jax.jit(lambda k: G.random_flip(k, canvas[:8, :8]))
    offsets, flips = set(), []
    for i in range(60):
        out = np.asarray(crop(_key(i)))
        # Locate the window: the output must be exactly some 8x8 window of the zero-padded image.
        found = [(t, l) for t in range(5) for l in range(5)
                 if np.array_equal(padded[t:t + 8, l:l + 8], out)]
        assert len(found) == 1
        offsets.add(found[0])
        out = np.asarray(flip(_key(i)))
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
        flips.append(np.array_equal(out, image[:, ::-1]))
    assert len(offsets) > 10  # many of the 25 offsets are drawn
    assert 0.2 < np.mean(flips) < 0.8
    np.testing.assert_array_equal(np.asarray(crop(_key(4))), np.asarray(crop(_key(4))))


def test_canvas_random_resized_crop_box():
    """torchvision RandomResizedCrop boxes of a canvas's true size, traced (known only on the
    device)."""
    box = jax.jit(lambda k, h, w, scale: G.random_resized_crop_params(k, h, w, scale,
                                                                      (0.5, 2.0)),
                  static_argnums=3)
    fractions = []
    for i in range(80):
        top, left, h, w = (int(v) for v in box(_key(i), np.int32(40), np.int32(30), (0.2, 0.6)))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30
        # Rounding w and h moves area and aspect by at most about one pixel row/column.
        assert 0.2 * 1200 - (h + w) <= h * w <= 0.6 * 1200 + (h + w) + 1
        assert 0.5 - 1 / h - 1e-6 <= w / h <= 2.0 + 2 / h + 1e-6
        fractions.append(h * w / 1200)
    assert np.mean(fractions) == pytest.approx(0.4, abs=0.06)
    # No box can have area > the image: torchvision's fallback is the centred box with the
    # aspect clamped to the ratio range. 40x10 (w/h = 0.25 < 3/4): w = 10, h = round(10 / 0.75).
    box = jax.jit(lambda k, h, w: G.random_resized_crop_params(k, h, w, (2.0, 3.0),
                                                               (3 / 4, 4 / 3)))
    top, left, h, w = (int(v) for v in box(_key(0), np.int32(40), np.int32(10)))
    assert (h, w) == (round(10 / 0.75), 10) and (top, left) == ((40 - 13) // 2, 0)
    top, left, h, w = (int(v) for v in box(_key(0), np.int32(10), np.int32(40)))
    assert (h, w) == (10, round(10 * 4 / 3)) and (top, left) == (0, (40 - 13) // 2)


def test_resize_ops_match_pil():
    """The evaluation's host resize (`tf_center_crop_resize`) and the device's views of a canvas
    against PIL."""
    rng = np.random.default_rng(4)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
                        .resize((100, 74), Image.Resampling.BILINEAR))  # 74 x 100
    # torchvision: Resize(32) -> 32 x int(32 * 100 / 74) = 32 x 43; top/left = round((size-28)/2).
    ref = np.asarray(Image.fromarray(smooth).resize((43, 32), Image.Resampling.BILINEAR))
    ref = ref[2:30, 8:36].astype(int)
    if tf is not None:
        out = P.tf_center_crop_resize(smooth, 32, 28).numpy()
        assert out.shape == (28, 28, 3) and out.dtype == np.uint8
        assert np.abs(out - ref).max() <= 1
    canvas = _canvas(smooth, 128)
    out = np.asarray(jax.jit(lambda x: G.resize_center_crop(x, (74, 100), 32, 28))(canvas))
    assert out.shape == (28, 28, 3) and out.dtype == np.uint8
    assert np.abs(out - ref).max() <= 1
    # Scale and ratio pinned to 1 on a square image: the crop is the whole image, resized.
    square = smooth[:74, :74]
    out = np.asarray(jax.jit(lambda k, x: G.random_resized_crop(
        k, x, 24, (1.0, 1.0), (1.0, 1.0), size=(74, 74)))(_key(0), _canvas(square, 96)))
    ref = np.asarray(Image.fromarray(square).resize((24, 24), Image.Resampling.BILINEAR))
    assert out.dtype == np.uint8 and np.abs(out - ref.astype(int)).max() <= 1


@needs_tf
def test_tf_canvas_holds_the_decoded_image_and_its_size():
    """tf_canvas: the image in the top-left corner of a zero canvas and its (h, w); an image with
    a longer side above the canvas is shrunk to fit (aspect kept) by area averaging: at an exact
    factor of 2, the rounded means of 2x2 blocks."""
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    out = P.tf_canvas(tf.constant(image), 64)
    canvas, size = out["image"].numpy(), out["size"].numpy()
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    assert size.dtype == np.int32 and tuple(size) == (37, 50)
    np.testing.assert_array_equal(canvas[:37, :50], image)
    assert not canvas[37:].any() and not canvas[:, 50:].any()
    large = rng.integers(0, 256, (74, 100, 3), dtype=np.uint8)
    out = P.tf_canvas(tf.constant(large), 50)  # 74 x 100 -> 37 x 50
    canvas, size = out["image"].numpy(), out["size"].numpy()
    assert canvas.shape == (50, 50, 3) and tuple(size) == (37, 50)
    ref = np.round(large.reshape(37, 2, 50, 2, 3).astype(np.float64).mean((1, 3)))
    np.testing.assert_array_equal(canvas[:37], ref.astype(np.uint8))
    assert not canvas[37:].any()


# ------------------------------------------------------------------------------------------------
# TFDS.


@needs_tf
def test_unprepared_tfds_fails_fast(tmp_path):
    start = time.time()
    with pytest.raises(FileNotFoundError, match=r"tfds build cifar10 --data_dir="):
        D.load_dataset(_config(source="tfds", name="cifar10", data_dir=str(tmp_path)), "train")
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_train\.tar.*downloads/manual"):
        D.tfds_builder("imagenet2012", str(tmp_path))
    assert time.time() - start < 5
    with pytest.raises(ValueError, match="no dataset 'no_such_dataset_xyz'"):
        D.tfds_builder("no_such_dataset_xyz", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"config.data.data_dir=.*missing: no such folder"):
        D.tfds_builder("digits_jpeg", str(tmp_path / "missing"))


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


@needs_tf
def test_tfds_mock_canvases(tmp_path):
    """Canvases per (seed, step): the same batches again, from any resumed step; epochs differ."""
    with tfds.testing.mock_data(num_examples=24):
        source = D.load_dataset(_config(source="tfds", name="cifar10", data_dir=str(tmp_path),
                                        num_examples=24, canvas_size=40), "train")
        assert source.num_examples == 24 and source.num_classes == 10
        assert source.canvas_size == 40

        def canvases(start_step=0):
            return P.tfds_canvases(source.builder, source.split, global_batch=8, seed=1,
                                   canvas_size=source.canvas_size, start_step=start_step,
                                   process_index=0, process_count=1,
                                   num_examples=source.num_examples, shuffle_buffer=24)

        full = _take(canvases(), 6)  # 3 steps per epoch: two epochs
        assert full[0]["image"].shape == (8, 40, 40, 3) and full[0]["image"].dtype == np.uint8
        assert full[0]["label"].shape == (8,) and full[0]["label"].dtype == np.int32
        assert full[0]["size"].shape == (8, 2) and full[0]["size"].dtype == np.int32
        again = _take(canvases(), 4)
        resumed = _take(canvases(start_step=4), 2)  # mid-epoch 1
    for b in full:  # CIFAR's 32x32 images in the corner, zeros around
        assert (b["size"] == 32).all()
        assert not b["image"][:, 32:].any() and not b["image"][:, :, 32:].any()
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(full[0]["image"], full[3]["image"])  # epochs differ


@needs_tf
def test_tfds_process_shards_are_disjoint(tmp_path):
    # A real (tiny) prepared TFDS dataset, where each label is the example's id: mock_data ignores
    # split slicing, so this is where per-process sharding is visible. Images of several sizes.
    n = 40
    rng = np.random.default_rng(5)
    shapes = [(32, 32), (20, 36), (36, 12), (48, 24)]  # the last is shrunk into the canvas
    images = [rng.integers(0, 256, shapes[i % 4] + (3,), dtype=np.uint8) for i in range(n)]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=n)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_ids", version="1.0.0", features=features, data_dir=str(tmp_path),
        split_datasets={"train": tf.data.Dataset.from_generator(
            lambda: ({"image": im, "label": i} for i, im in enumerate(images)),
            output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8),
                              "label": tf.TensorSpec((), tf.int64)})})
    source = D.load_dataset(_config(source="tfds", name="tiny_ids", data_dir=str(tmp_path),
                                    canvas_size=40), "train")
    assert source.num_examples == n and source.num_classes == n

    def ids(process, start_step=0, steps=4):
        it = P.tfds_canvases(source.builder, source.split, global_batch=8, seed=2,
                             canvas_size=source.canvas_size, start_step=start_step,
                             process_index=process, process_count=2)
        batches = _take(it, steps)
        for b in batches:  # the canvas holds the stored image of that id, and its true size
            for canvas, size, label in zip(b["image"], b["size"], b["label"]):
                h, w = images[label].shape[:2]
                if max(h, w) <= 40:
                    assert tuple(size) == (h, w)
                    np.testing.assert_array_equal(canvas[:h, :w], images[label])
                else:  # shrunk to fit, aspect kept: 48x24 -> 40x20
                    assert tuple(size) == (40, 20)
                assert not canvas[size[0]:].any() and not canvas[:, size[1]:].any()
        return [b["label"] for b in batches]

    p0, p1 = ids(0, steps=5), ids(1, steps=5)  # 40 // 8 = 5 steps per epoch
    seen0, seen1 = np.concatenate(p0), np.concatenate(p1)
    assert len(set(seen0)) == 20 and len(set(seen1)) == 20
    assert not set(seen0) & set(seen1)
    resumed = ids(1, start_step=3, steps=3)
    for a, b in zip(resumed[:2], p1[3:]):
        np.testing.assert_array_equal(a, b)
    next_epoch = np.concatenate(ids(1, start_step=5, steps=5))
    assert set(next_epoch) == set(seen1) and not np.array_equal(next_epoch, seen1)
