"""Data you can trust: unreadable files named, non-data entries ignored, one class index for
every split, images as a viewer shows them, TFDS's odd JPEGs, and evaluation settings checked
before training.

References: images are built with Pillow and the expected pixels computed with numpy from the
formulas (alpha compositing over white, 16-bit scaling v * 255 / 65535, CMYK -> RGB, EXIF
orientation as numpy rotations/flips); k-NN accuracy on mean colours is checked by hand.
"""
import io
import re
import types

import numpy as np
import pytest
from PIL import Image

from bow_jax.config import base_config
from bow_jax.data import datasets as D
from bow_jax.data import splits
from bow_jax.protocols import checks, knn


def _save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, **kwargs)


def _colour(rgb, size=6):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (size, size, 3)).copy()


def _folder(root, classes, per_class=2, size=6):
    """root/<class>/<i>.png, class c in a colour of its own."""
    for c, cls in enumerate(classes):
        for i in range(per_class):
            _save(root / cls / f"{i}.png", _colour((40 * c + i, 100, 200 - 30 * c), size))


def _data_config(path, **fields):
    return types.SimpleNamespace(**{"source": "image_folder", "path": str(path), "image_size": 6,
                                    **fields})


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
        buf, format="JPEG")
    path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])


# ------------------------------------------------------------------------------------------------
# Files that cannot be decoded.


def test_truncated_jpeg_is_named_and_skipped_with_a_count(tmp_path):
    _folder(tmp_path / "train", ["a", "b"], per_class=10)
    bad = tmp_path / "train" / "a" / "cut.jpg"
    _truncated_jpeg(bad)
    with pytest.raises(D.UnreadableImageError, match=re.escape(f"{bad}: cannot decode")):
        D.decode_image(bad.read_bytes(), str(bad))
    # 1 of 21 files (< 5%): skipped, named, counted.
    with pytest.warns(D.UnreadableImagesWarning,
                      match=r"1 of 21 images[\s\S]*" + re.escape(str(bad))):
        ds = D.load_dataset(_data_config(tmp_path), "train")
    assert len(ds) == 20 and "a/cut.jpg" not in ds.filenames
    np.testing.assert_array_equal(ds.labels, [0] * 10 + [1] * 10)
    # A strict run (no file may fail) stops, naming it.
    with pytest.raises(D.UnreadableImageError, match=r"1 of 21[\s\S]*" + re.escape(str(bad))):
        D.load_dataset(_data_config(tmp_path, max_unreadable_fraction=0.0), "train")


def test_non_image_file_is_named_and_a_mostly_broken_folder_is_an_error(tmp_path):
    _folder(tmp_path / "train", ["a"], per_class=2)
    fake = tmp_path / "train" / "a" / "fake.png"
    fake.write_text("<html>not an image</html>")
    with pytest.raises(D.UnreadableImageError,
                       match=re.escape(str(fake)) + r": cannot decode .*UnidentifiedImageError"):
        D.decode_image(fake.read_bytes(), str(fake))
    # 1 of 3 files fails (33% > 5%): an error, not a silent skip.
    with pytest.raises(D.UnreadableImageError, match=r"1 of 3 images[\s\S]*fake\.png"):
        D.load_dataset(_data_config(tmp_path), "train")


def test_jpeg_npz_entry_that_cannot_be_decoded_is_named(tmp_path):
    blob = np.frombuffer(b"garbage", np.uint8)
    np.savez(tmp_path / "jpeg.npz", test_jpeg=blob, test_offsets=[0, len(blob)], test_labels=[0])
    with pytest.raises(D.UnreadableImageError, match=r"jpeg\.npz:test\[0\]: cannot decode"):
        D.load_jpeg_npz(tmp_path / "jpeg.npz", "test")


# ------------------------------------------------------------------------------------------------
# What is (not) part of the dataset; one class index.


def test_hidden_and_metadata_entries_are_neither_images_nor_classes(tmp_path):
    train = tmp_path / "train"
    _folder(train, ["cat", "dog"], per_class=2)
    junk = [train / ".ipynb_checkpoints" / "0-checkpoint.png", train / "__MACOSX" / "cat" / "x.png",
            train / "cat" / ".hidden.png", train / "cat" / "._0.png",
            train / "cat" / ".ipynb_checkpoints" / "1.png", train / "dog" / "@eaDir" / "t.png"]
    for path in junk:
        _save(path, _colour((1, 2, 3)))
    (train / "cat" / "Thumbs.db").write_bytes(b"\0\1")
    (train / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (train / "dog" / "labels.csv").write_text("a,b\n")
    (train / "dog" / "notes.txt").write_text("not data")
    listing = D.list_image_folder(train)
    assert listing.classes == ("cat", "dog")
    assert listing.names == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    ds = D.load_dataset(_data_config(tmp_path), "train")
    assert ds.num_classes == 2 and len(ds) == 4
    assert ds.filenames == tuple(listing.names)
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])


def test_splits_share_the_training_class_index(tmp_path):
    _folder(tmp_path / "train", ["ant", "bee", "cow"], per_class=2)
    _folder(tmp_path / "test", ["ant", "cow"], per_class=1)  # 'bee' absent: fine
    test = D.load_dataset(_data_config(tmp_path), "test")
    assert test.num_classes == 3
    np.testing.assert_array_equal(test.labels, [0, 2])  # cow keeps the training label 2
    assert test.filenames == ("ant/0.png", "cow/0.png")
    # A class the training split does not have: named.
    _folder(tmp_path / "test", ["dog"], per_class=1)
    with pytest.raises(ValueError, match=r"classes \['dog'\] are not classes of the training"):
        D.load_dataset(_data_config(tmp_path), "test")


def test_empty_training_class_and_mixed_layout_are_errors(tmp_path):
    _folder(tmp_path / "train", ["a"], per_class=1)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folders \['b'\] hold no image files"):
        D.load_dataset(_data_config(tmp_path), "train")
    mixed = tmp_path / "mixed"
    _folder(mixed, ["a", "test"], per_class=1)
    with pytest.raises(ValueError, match=r"holds split folders \['test'\] but no train/"):
        D.load_dataset(_data_config(mixed), "train")


def _mean_colour(images):
    return images.reshape(len(images), -1, 3).mean(1)


def test_knn_stays_perfect_with_a_hidden_folder(tmp_path):
    # Two separable classes; a stray notebook checkpoint folder in train/ must not shift labels.
    for split, count in (("train", 4), ("test", 3)):
        for i in range(count):
            _save(tmp_path / split / "blue" / f"{i}.png", _colour((10 + i, 20, 230)))
            _save(tmp_path / split / "red" / f"{i}.png", _colour((230, 20 + i, 10)))
    _save(tmp_path / "train" / ".ipynb_checkpoints" / "0.png", _colour((230, 20, 10)))
    train = D.load_dataset(_data_config(tmp_path), "train")
    test = D.load_dataset(_data_config(tmp_path), "test")
    assert train.num_classes == test.num_classes == 2
    acc = knn.knn_accuracy(_mean_colour(train.images), train.labels, _mean_colour(test.images),
                           test.labels, train.num_classes, k=3)
    assert acc == 1.0


# ------------------------------------------------------------------------------------------------
# Every image as a viewer shows it.


def _decode(tmp_path, name, array, mode=None, **save):
    path = tmp_path / name
    _save(path, array, mode, **save)
    out = D.decode_image(path.read_bytes(), str(path))
    assert out.dtype == np.uint8 and out.shape == array.shape[:2] + (3,)
    return out


def _over_white(rgb, alpha):
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + 255 * (1 - a)


def test_modes_decode_to_viewer_rgb(tmp_path):
    rng = np.random.default_rng(7)
    gray = rng.integers(0, 256, (5, 4), np.uint8)
    rgb = rng.integers(0, 256, (5, 4, 3), np.uint8)
    alpha = rng.integers(0, 256, (5, 4), np.uint8)
    np.testing.assert_array_equal(_decode(tmp_path, "l.png", gray), np.stack([gray] * 3, -1))
    la = _decode(tmp_path, "la.png", np.stack([gray, alpha], -1), "LA")
    assert np.abs(la - _over_white(np.stack([gray] * 3, -1), alpha)).max() <= 1
    rgba = _decode(tmp_path, "rgba.png", np.dstack([rgb, alpha]))
    assert np.abs(rgba - _over_white(rgb, alpha)).max() <= 1
    # CMYK (lossless TIFF): R = 255 (1 - C/255)(1 - K/255), and likewise G, B.
    cmyk = rng.integers(0, 256, (5, 4, 4), np.uint8)
    ref = 255 * (1 - cmyk[..., :3] / 255) * (1 - cmyk[..., 3:] / 255)
    assert np.abs(_decode(tmp_path, "cmyk.tif", cmyk, "CMYK") - ref).max() <= 1


def test_palette_with_transparency_shows_white(tmp_path):
    index = np.array([[0, 1], [2, 1]], np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    for fmt in ("PNG", "GIF"):
        path = tmp_path / f"p.{fmt.lower()}"
        image.save(path, format=fmt, transparency=1)
        out = D.decode_image(path.read_bytes(), str(path))
        np.testing.assert_array_equal(out, [[[255, 0, 0], [255, 255, 255]],
                                            [[0, 0, 255], [255, 255, 255]]])


def test_16bit_and_32bit_and_float_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768], [40000, 65280, 65535]], np.uint16)
    expected = np.round(values / 257.0).astype(np.uint8)  # 65535 -> 255, 257 k -> k
    assert expected[1, 2] == 255 and expected[0, 1] == 1
    out = _decode(tmp_path, "sixteen.png", values)  # Pillow reads it as 'I;16'
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    np.testing.assert_array_equal(out, np.stack([expected] * 3, -1))
    out = _decode(tmp_path, "int.tif", values.astype(np.int32))  # mode 'I'
    np.testing.assert_array_equal(out, np.stack([expected] * 3, -1))
    floats = np.array([[0.0, 0.25, 0.5], [1.0, 1.5, -0.2]], np.float32)  # mode 'F', [0, 1]
    out = _decode(tmp_path, "float.tif", floats)
    np.testing.assert_array_equal(out[..., 0], [[0, 64, 128], [255, 255, 0]])


@pytest.mark.parametrize("orientation,transform", [
    (2, lambda a: a[:, ::-1]),             # mirrored
    (3, lambda a: a[::-1, ::-1]),          # rotated 180
    (6, lambda a: np.rot90(a, -1)),        # stored rotated: turn 90 degrees clockwise to show
    (8, lambda a: np.rot90(a, 1)),         # turn 90 degrees counter-clockwise to show
])
def test_exif_orientation_is_applied(tmp_path, orientation, transform):
    stored = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(stored).save(path, exif=exif)
    out = D.decode_image(path.read_bytes(), str(path))
    np.testing.assert_array_equal(out, transform(stored))


def test_png_named_jpeg_and_cmyk_jpeg_in_an_image_folder(tmp_path):
    colour = _colour((200, 30, 60), 16)
    _save(tmp_path / "train" / "a" / "png_inside.JPEG", colour, format="PNG")
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "train" / "a" / "cmyk.jpg",
                                                 quality=100)
    ds = D.load_image_folder(tmp_path / "train", 16)
    assert ds.filenames == ("a/cmyk.jpg", "a/png_inside.JPEG")
    np.testing.assert_array_equal(ds.images[1], colour)
    assert np.abs(ds.images[0].astype(int) - colour).max() <= 12  # JPEG, but not inverted


# ------------------------------------------------------------------------------------------------
# TFDS decodes ImageNet's odd files: tfds.features.Image decodes with tf.image.decode_image,
# which reads the format from the bytes.

try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
except ImportError:
    tf = tfds = None


@pytest.mark.skipif(tf is None, reason="tensorflow / tensorflow_datasets not installed")
def test_tfds_decodes_cmyk_jpeg_and_png_bytes_in_a_jpeg_dataset(tmp_path):
    from bow_jax.data import pipeline as P
    colours = np.array([(200, 30, 60), (10, 220, 90)], np.uint8)
    encoded = []
    for i, fmt in enumerate(("cmyk", "png")):
        buf = io.BytesIO()
        image = Image.fromarray(_colour(colours[i], 16))
        if fmt == "cmyk":
            image.convert("CMYK").save(buf, format="JPEG", quality=100)
        else:
            image.save(buf, format="PNG")  # a PNG stored where JPEG is declared
        encoded.append(buf.getvalue())
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(16, 16, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=2)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="odd_jpegs", version="1.0.0", features=features, data_dir=str(tmp_path),
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(
            {"image": encoded, "label": [0, 1]})})
    source = D.load_dataset(types.SimpleNamespace(source="tfds", name="odd_jpegs",
                                                  data_dir=str(tmp_path)), "train")
    # The in-memory path (splits.tfds_to_arrays) and the streamed one (pipeline) both decode.
    arrays = splits.tfds_to_arrays(source)
    batch = next(P.tfds_canvases(source.builder, source.split, global_batch=2, seed=0,
                                 canvas_size=source.canvas_size, process_index=0,
                                 process_count=1))
    assert (batch["size"] == 16).all()  # the decoded 16x16 image in the canvas's corner
    streamed = batch["image"][:, :16, :16]
    for images, labels in ((arrays.images, arrays.labels), (streamed, batch["label"])):
        for image, label in zip(images, labels):
            assert np.abs(image.astype(int) - colours[label]).max() <= 12


# ------------------------------------------------------------------------------------------------
# Evaluation settings checked before training.


def _eval_config(path, **eval_fields):
    c = base_config("rotnet")
    c.data.source, c.data.path, c.data.image_size = "image_folder", str(path), 6
    c.eval.batch_size = 8
    c.eval.fewshot_shots, c.eval.fewshot_ways, c.eval.fewshot_queries = (1, 2), 3, 2
    for name, value in eval_fields.items():
        c.eval[name] = value
    return c


@pytest.fixture
def eval_folder(tmp_path):
    _folder(tmp_path / "train", ["a", "b", "c"], per_class=10)
    _folder(tmp_path / "test", ["a", "b", "c"], per_class=4)
    return tmp_path


def test_check_passes_on_satisfiable_settings(eval_folder):
    assert checks.check_evaluation_data(_eval_config(eval_folder)) is None
    train, test = checks.evaluation_splits(_eval_config(eval_folder, train_limit=25))
    assert (train.num_examples, test.num_examples) == (25, 12)
    np.testing.assert_array_equal(np.bincount(train.labels), [10, 10, 5])


def test_missing_test_split_is_found_before_training(tmp_path):
    _folder(tmp_path / "train", ["a", "b"], per_class=10)
    with pytest.raises(checks.MissingSplitError, match=r"config\.data\.path: .*test"):
        checks.check_evaluation_data(_eval_config(tmp_path))
    with pytest.raises(ValueError):  # also a ValueError, as every failed check
        checks.check_evaluation_data(_eval_config(tmp_path))


@pytest.mark.parametrize("fields,message", [
    (dict(fewshot_ways=4), r"config\.eval\.fewshot_ways=4 exceeds the 3 classes"),
    (dict(fewshot_queries=3), r"config\.eval\.fewshot_shots=\(1, 2\) with "
                              r"config\.eval\.fewshot_queries=3: 2-shot episodes need 5 "
                              r"examples of each class; the test split .* has 4"),
    (dict(test_limit=8), r"config\.eval\.fewshot_ways=3 exceeds the 2 classes .*first 8 by "
                         r"config\.eval\.test_limit"),
    (dict(test_limit=13), r"config\.eval\.test_limit=13 is larger than the test split .* 12 "
                          r"examples"),
    (dict(train_limit=31), r"config\.eval\.train_limit=31 is larger than the training split"),
    (dict(train_limit=19, protocols=("linear", "knn")), r"config\.eval\.knn_k=20: k-NN with k=20 .* has 19"),
    (dict(batch_size=12), r"config\.eval\.batch_size=12: .* multiple of 8"),
    (dict(linear_protocol="nope"), r"config\.eval\.linear_protocol='nope'; expected one of"),
    (dict(linear_epochs=-1), r"config\.eval\.linear_epochs=-1"),
    (dict(fewshot_shots=()), r"config\.eval\.fewshot_shots=\(\)"),
])
def test_each_unsatisfiable_setting_is_named(eval_folder, fields, message):
    with pytest.raises(ValueError, match=message):
        checks.check_evaluation_data(_eval_config(eval_folder, **fields))
    # Disabling the protocol the setting belongs to (where it has one) lifts the error.
    protocol = {"fewshot_ways": "fewshot", "fewshot_queries": "fewshot", "fewshot_shots":
                "fewshot", "linear_protocol": "linear", "linear_epochs": "linear"}
    names = {protocol[f] for f in fields if f in protocol}
    if names:
        others = tuple(p for p in ("linear", "fewshot", "knn") if p not in names)
        checks.check_evaluation_data(_eval_config(eval_folder, **fields, protocols=others))


def test_npz_test_labels_outside_the_training_classes(tmp_path):
    images = np.zeros((30, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=np.arange(30) % 3)
    np.savez(tmp_path / "test.npz", images=images[:12], labels=np.arange(12) % 4)
    c = _eval_config(tmp_path, protocols=("linear", "knn"))
    c.data.source = "npz"
    with pytest.raises(ValueError,
                       match=r"labels in \[0, 3\], but .*train\.npz\) defines 3 classes"):
        checks.check_evaluation_data(c)


@pytest.mark.skipif(tf is None, reason="tensorflow / tensorflow_datasets not installed")
def test_tfds_split_of_several_image_sizes_passes_the_check(tmp_path):
    """The evaluation streams TFDS splits through its transform (data/eval_input.py), so images
    of several sizes no longer stop it (tests/test_streamed_eval.py evaluates such a split)."""
    encoded = []
    for size in (8, 12):
        buf = io.BytesIO()
        Image.fromarray(_colour((1, 2, 3), size)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(),
                                           "label": tfds.features.ClassLabel(num_classes=2)})
    examples = tf.data.Dataset.from_tensor_slices({"image": encoded, "label": [0, 1]})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="two_sizes", version="1.0.0", features=features, data_dir=str(tmp_path),
        split_datasets={"train": examples, "test": examples})
    c = _eval_config(tmp_path, protocols=())
    c.data.source, c.data.name, c.data.data_dir = "tfds", "two_sizes", str(tmp_path)
    c.data.num_examples = 2
    checks.check_evaluation_data(c)  # no error
