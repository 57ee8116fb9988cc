"""Every method trains from streamed TFDS data (config.data.in_memory=False): the host decodes each
image once into a canvas with its true size, the device cuts the views (`data/batches.py`).

Checked for RotNet, BoWNet and OBoW on a tiny TFDS split of real images (scikit-learn's digits,
upsampled to a different size each, some larger than the canvas so the host shrinks them):
* a method's views read only the true image of a canvas (the padding never reaches a view), so
  the streamed canvases and in-memory images give the same views;
* 1 device and 8 devices reach the same parameters;
* a run stopped and resumed reaches the uninterrupted run's state bit for bit.
"""
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bow_jax import pretrain
from bow_jax.bow import build
from bow_jax.config import base_config
from bow_jax.data.splits import load_split
from bow_jax.lib import sharding, stop
from bow_jax.lib.errors import InputError
from bow_jax.methods import create_method, data_info_for
from bow_jax.models import create_backbone, feature_dims
from bow_jax.tasks import common
from bow_jax.tasks import train as train_task
from loop_helpers import run_steps  # tests/ is on sys.path

tf = pytest.importorskip("tensorflow")
# The resumed runs compile the very same programs again: cached (conftest.py).
pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")
tfds = pytest.importorskip("tensorflow_datasets")

CANVAS = 24  # the larger digits below (up to 30 px) are shrunk by the host to fit
NUM_TRAIN = 48


def _digit_images(n, seed):
    """n real digits (8x8, scikit-learn), each upsampled (bicubic) to its own size in 10..30 px."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gray = np.uint8(np.clip(digits.images[i] * 255.0 / 16.0, 0, 255))
        h, w = (int(v) for v in rng.integers(10, 31, 2))
        out.append(np.asarray(Image.fromarray(gray).convert("RGB").resize(
            (w, h), Image.Resampling.BICUBIC)))
    return out, digits.target[:n]


@pytest.fixture(scope="module")
def digits_tfds(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    images, labels = _digit_images(NUM_TRAIN + 16, seed=3)

    def split(part):
        return tf.data.Dataset.from_generator(
            lambda: ({"image": images[i], "label": int(labels[i]),
                      "file_name": f"{labels[i]}_{i:04d}.JPEG"} for i in part),
            output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8),
                              "label": tf.TensorSpec((), tf.int64),
                              "file_name": tf.TensorSpec((), tf.string)})

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10),
        "file_name": tfds.features.Text()})  # as imagenet2012's, named in warnings
    tfds.dataset_builders.store_as_tfds_dataset(
        name="digits_sizes", version="1.0.0", features=features, data_dir=data_dir,
        split_datasets={"train": split(range(NUM_TRAIN)),
                        "test": split(range(NUM_TRAIN, NUM_TRAIN + 16))})
    assert max(max(im.shape[:2]) for im in images[:NUM_TRAIN]) > CANVAS  # some are shrunk
    return data_dir


def _streamed(c, data_dir):
    c.data.update(dict(source="tfds", name="digits_sizes", data_dir=data_dir, in_memory=False,
                       canvas_size=CANVAS, normalization="cifar"))
    c.batch_size = 16
    c.num_train_steps = 4
    c.steps_per_epoch = 2
    c.optim.lr = 0.05
    c.log_every = 1
    c.checkpoint_every_steps = 2
    c.eval.after_training = False
    return c


def _small_resnet(c, stage_sizes=(1, 1, 1, 1)):
    c.model.name = "resnet18"
    c.model.kwargs.width = 4
    c.model.kwargs.cifar_stem = True
    c.model.kwargs.stage_sizes = stage_sizes
    return c


def rotnet_config(data_dir):
    c = _small_resnet(_streamed(base_config("rotnet"), data_dir))
    c.rotnet.crop_size, c.rotnet.resize, c.rotnet.crop_padding = 16, 18, 0  # as 224 of 256
    return c


def obow_config(data_dir):
    c = _small_resnet(_streamed(base_config("obow"), data_dir))
    o = c.obow
    o.bow_levels, o.num_words, o.inv_delta, o.kappa = ("layer3",), 32, 10.0, 5.0
    o.teacher_size, o.teacher_resize = 20, 22  # Resize + CenterCrop, as 224 of 256
    o.crop_size, o.crop_scale = 12, (0.2, 0.6)
    o.patch_size, o.patch_source_size, o.patch_jitter, o.num_patches = 6, 16, 2, 3
    return c


def _bownet_teacher(workdir, data_dir):
    """A RotNet trained 1 step on the streamed split, and a vocabulary of its conv1 map (random
    words: the step under test reads it, whatever its quality)."""
    teacher = rotnet_config(data_dir)
    teacher.model = ml_collections.ConfigDict({"name": "nin",
                                               "kwargs": {"num_blocks": 3, "width": 12}})
    teacher.num_train_steps = 1
    teacher_dir = os.path.join(workdir, "rotnet")
    if not os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
        train_task.run(teacher, teacher_dir)
    path = os.path.join(workdir, "vocabulary.npz")
    if not os.path.isfile(path):
        channels = feature_dims(create_backbone("nin", num_blocks=3, width=12),
                                (1, 16, 16, 3))["conv1"][-1]
        words = np.random.default_rng(0).normal(size=(8, channels)).astype(np.float32)
        build.write_vocabulary(path, words, {"teacher_step": 1, "layer": "conv1", "border": 0,
                                             "num_words": 8})
    return teacher_dir, path


def bownet_config(data_dir, workdir):
    c = _streamed(base_config("bownet"), data_dir)
    c.model = ml_collections.ConfigDict({"name": "nin", "kwargs": {"num_blocks": 3, "width": 12}})
    b = c.bownet
    b.teacher_workdir, b.vocabulary = _bownet_teacher(workdir, data_dir)
    b.teacher_layer, b.num_words, b.target = "conv1", 8, "binary"
    b.view_size, b.teacher_resize = 16, 18  # as 224 of 256
    return c


@pytest.fixture(scope="module")
def configs(digits_tfds, tmp_path_factory):
    teacher_dir = str(tmp_path_factory.mktemp("bownet_teacher"))
    def rotnet_resized_crop():
        c = rotnet_config(digits_tfds)
        c.rotnet.view, c.rotnet.crop_scale = "resized_crop", (0.08, 1.0)  # the ImageNet view
        return c

    return {"rotnet": lambda: rotnet_config(digits_tfds),
            "rotnet_resized_crop": rotnet_resized_crop,
            "bownet": lambda: bownet_config(digits_tfds, teacher_dir),
            "obow": lambda: obow_config(digits_tfds)}


METHODS = ("rotnet", "bownet", "obow")


@pytest.mark.parametrize("name", METHODS + ("rotnet_resized_crop",))
def test_views_read_only_the_true_image_of_a_canvas(configs, name):
    """The same images, on their own (in-memory) or in the corner of a larger canvas whose
    padding is noise: the same views, bit for bit."""
    config = configs[name]()
    data = load_split(config, "train")
    method = create_method(config, data_info_for(config, data))
    from PIL import Image
    images = [np.asarray(Image.fromarray(im).resize((18, 14))) for im in _digit_images(4, 5)[0]]
    stored = jnp.asarray(np.stack(images))
    canvas = np.random.default_rng(1).integers(0, 256, (len(images), CANVAS, CANVAS, 3),
                                               dtype=np.uint8)
    canvas[:, :14, :18] = np.stack(images)
    sizes = jnp.full((len(images), 2), jnp.asarray([14, 18], jnp.int32))
    make = jax.jit(method.make_views)
    key = jax.random.key(7)
    on_their_own, on_canvas = make(stored, sizes, key), make(jnp.asarray(canvas), sizes, key)
    assert set(on_their_own) == set(on_canvas)
    for view in on_canvas:
        assert on_canvas[view].dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(on_canvas[view]), np.asarray(on_their_own[view]),
                                      err_msg=view)


@pytest.mark.parametrize("name, field", [("rotnet", "config.rotnet.resize=18"),
                                         ("bownet", "config.bownet.teacher_resize=18"),
                                         ("obow", "config.obow.teacher_resize=22")])
def test_a_canvas_smaller_than_the_views_is_warned_about(configs, name, field, capsys):
    """Streamed images shrunk to a canvas below a view's side are upscaled by every view: said
    once at the start, naming both fields (the fixture's canvas of 24 holds every view)."""
    config = configs[name]()
    create_method(config, data_info_for(config, load_split(config, "train")))
    assert "canvas_size" not in capsys.readouterr().err
    config.data.canvas_size = 12
    create_method(config, data_info_for(config, load_split(config, "train")))
    assert f"config.data.canvas_size=12 is smaller than {field}" in capsys.readouterr().err


# Steps compared. OBoW: one, as its in-memory test: from the second or third step on, the float
# rounding of 1 vs 8 devices (~1e-7) grows to ~1e-4 in these width-4 networks, in memory too,
# exactly as a 1e-7 relative perturbation of the initial weights does on one device (measured on
# the in-memory tiny config: both reach 1.39e-4 at step 4, where the losses still agree to 1e-6:
# the gradient crosses a kink), so it is the float chaos of training, not a multi-device error.
STEPS = {"rotnet": 2, "bownet": 2, "obow": 1}


@pytest.mark.parametrize("name", METHODS)
def test_streamed_one_and_eight_devices_give_the_same_parameters(configs, name):
    assert jax.device_count() == 8
    config = configs[name]()
    one = run_steps(config, sharding.make_mesh(jax.devices()[:1]), STEPS[name])
    eight = run_steps(config, sharding.make_mesh(), STEPS[name])
    assert int(one.step) == int(eight.step) == STEPS[name]
    for a, b in ((one.params, eight.params), (one.batch_stats, eight.batch_stats)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def _final_state(config, workdir):
    with common.restore(config, workdir) as run:
        return jax.device_get(run.state)


def _uninterrupted_and_resumed(config, tmp_path):
    """(final state of 4 steps in one go, final state of a run stopped by SIGTERM after step 2
    and resumed by the same command)."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_task.run(config, full)

    def sigterm_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(stop.Stopped, match="step 2/4"):
        train_task.run(config, split, hooks=[sigterm_at_2])
    train_task.run(config, split)
    return _final_state(config, full), _final_state(config, split)


@pytest.mark.parametrize("name", METHODS)
def test_streamed_resume_reaches_the_uninterrupted_state_exactly(configs, name, tmp_path):
    """4 steps in one go, or stopped by SIGTERM after step 2 and resumed (crossing an epoch of the
    stream: 48 images, 16 per step, 3 steps per epoch): the same state, bit for bit."""
    config = configs[name]()
    want, got = _uninterrupted_and_resumed(config, tmp_path)
    assert int(want.step) == int(got.step) == 4
    as_bits = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(as_bits(x)), np.asarray(as_bits(y)),
                                      err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------
# A broken file in a streamed dataset


def _break_records(data_dir, broken):
    """A copy of the digits_sizes dataset with the images of the train records at `broken`
    (stored order; {index: 'garbage' | 'truncated'}) replaced by random bytes or cut to a third:
    what a damaged download or disk leaves. Returns the copy's data_dir."""
    import shutil
    copy = data_dir + "_broken_" + "_".join(f"{i}{k[0]}" for i, k in sorted(broken.items()))
    if os.path.isdir(copy):
        return copy
    shutil.copytree(data_dir, copy)
    folder = os.path.join(copy, "digits_sizes", "1.0.0")
    (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if "-train.tfrecord" in f]
    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    for index, kind in broken.items():
        example = tf.train.Example.FromString(records[index])
        image = example.features.feature["image"].bytes_list.value[0]
        bad = (np.random.default_rng(index).bytes(len(image)) if kind == "garbage"
               else image[:len(image) // 3])
        example.features.feature["image"].bytes_list.value[0] = bad
        records[index] = example.SerializeToString()
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return copy


def test_unreadable_images_are_named_and_replaced_within_their_batch(digits_tfds):
    """A truncated and a garbage JPEG in the stream: each is named in a warning and replaced by
    another image of its batch (the batch keeps its size and boundaries); every other row is the
    unbroken dataset's row, bit for bit."""
    from bow_jax.data import pipeline
    broken_dir = _break_records(digits_tfds, {3: "truncated", 20: "garbage"})

    def first_epoch(data_dir):
        builder = tfds.builder("digits_sizes", data_dir=data_dir)
        it = pipeline.tfds_canvases(builder, "train", global_batch=16, seed=0, canvas_size=CANVAS)
        return [next(it) for _ in range(NUM_TRAIN // 16)]

    clean = first_epoch(digits_tfds)
    with pytest.warns(UserWarning, match=r"cannot decode \d_\d{4}\.JPEG \(1 of the") as w:
        damaged = first_epoch(broken_dir)
    named = {str(x.message).split("cannot decode ")[1].split(" ")[0] for x in w
             if "cannot decode" in str(x.message)}
    assert len(named) == 2  # each file named once, by its file_name
    changed = 0
    for a, b in zip(clean, damaged):
        assert set(a) == set(b) == {"image", "size", "label"}
        rows = [i for i in range(16) if not np.array_equal(a["image"][i], b["image"][i])]
        changed += len(rows)
        for i in rows:  # a copy of another row of the same batch, label included
            j = next(j for j in range(16) if j != i and np.array_equal(b["image"][i], b["image"][j]))
            assert b["label"][i] == b["label"][j] and (b["size"][i] == b["size"][j]).all()
    assert changed == 2


def test_a_dataset_of_unreadable_images_stops_naming_the_field(digits_tfds):
    from bow_jax.data import pipeline
    broken_dir = _break_records(digits_tfds, {i: "garbage" for i in range(NUM_TRAIN)})
    builder = tfds.builder("digits_sizes", data_dir=broken_dir)
    it = pipeline.tfds_canvases(builder, "train", global_batch=16, seed=0, canvas_size=CANVAS)
    with pytest.raises(InputError, match=r"digits_sizes split 'train': images cannot be decoded: "
                                         r"16 of the 16 images read so far .*"
                                         r"config.data.max_unreadable_fraction"):
        next(it)


def test_the_unreadable_share_carries_over_a_resume(digits_tfds):
    """The counts live in a dict the caller keeps (a run saves it with each checkpoint): one
    epoch counts its 48 images and 2 broken ones into it; handed back with a share already
    over the limit (as a restarted run's checkpoint would), the first broken image stops the
    stream, where fresh counts would only warn."""
    from bow_jax.data import pipeline
    builder = tfds.builder("digits_sizes",
                           data_dir=_break_records(digits_tfds, {3: "truncated", 20: "garbage"}))

    def one_epoch(counts):
        it = pipeline.tfds_canvases(builder, "train", global_batch=16, seed=0,
                                    canvas_size=CANVAS, unreadable_counts=counts)
        for _ in range(NUM_TRAIN // 16):
            next(it)

    counts = {}
    with pytest.warns(UserWarning, match="cannot decode"):
        one_epoch(counts)
    assert counts == {"read": NUM_TRAIN, "unreadable": 2}
    with pytest.raises(InputError, match=r"images cannot be decoded: 111 of the 20\d\d images "
                                         r"read so far \(at most 5\.0%"):
        one_epoch({"read": 2000, "unreadable": 110})


def test_streamed_training_resumes_exactly_past_an_unreadable_image(digits_tfds, tmp_path):
    """RotNet on the stream with a broken file: it trains past it, and a run stopped after step 2
    and resumed reaches the uninterrupted state (the replaced row does not move the batches)."""
    broken_dir = _break_records(digits_tfds, {3: "truncated", 20: "garbage"})
    config = rotnet_config(broken_dir)
    with pytest.warns(UserWarning, match="cannot decode"):
        want, got = _uninterrupted_and_resumed(config, tmp_path)
    for x, y in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The share of unreadable images goes on from the checkpoint's counts (a restart must not
    # start it again): both runs counted the 64 images of their 4 steps, broken ones included.
    metas = [common.open_checkpointer(config, str(tmp_path / name)).read_meta()
             for name in ("full", "split")]
    counts = [meta[pretrain.UNREADABLE_META] for meta in metas]
    assert counts[0] == counts[1] and counts[0]["read"] == 64 and counts[0]["unreadable"] >= 1
    assert [meta[pretrain.DEVICES_META] for meta in metas] == [8, 8]


def test_a_damaged_record_file_is_named_by_training_and_evaluation(digits_tfds):
    """One flipped byte in a train shard (a record's checksum fails: TensorFlow's DataLossError):
    the training stream and the evaluation pass each stop with one InputError naming the
    dataset, its directory and what to do, not a TensorFlow traceback."""
    import shutil
    from bow_jax.data import eval_input, pipeline
    copy = digits_tfds + "_flipped_byte"
    if not os.path.isdir(copy):
        shutil.copytree(digits_tfds, copy)
        folder = os.path.join(copy, "digits_sizes", "1.0.0")
        (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if "-train.tfrecord" in f]
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    want = (r"digits_sizes split 'train': a record file of the prepared dataset is damaged "
            r"\(corrupted record at \d+\); its files in .*_flipped_byte.* were cut short or "
            r"altered\. Prepare the dataset again")
    builder = tfds.builder("digits_sizes", data_dir=copy)
    it = pipeline.tfds_canvases(builder, "train", global_batch=16, seed=0, canvas_size=CANVAS)
    with pytest.raises(InputError, match=want):
        for _ in range(NUM_TRAIN // 16):
            next(it)
    config = rotnet_config(copy)
    config.eval.image_size = 16
    with pytest.raises(InputError, match=want):
        for _ in eval_input.evaluation_input(config, "train").read(0, NUM_TRAIN, 16):
            pass


def test_the_evaluation_pass_names_and_leaves_out_an_unreadable_image(digits_tfds):
    """Evaluation, as for image folders: a file that cannot be decoded comes as a zero image with
    label -1 (left out by the feature pass, up to max_unreadable_fraction) and is named in one
    warning; every other row is the unbroken dataset's (so one broken training image does not
    stop the evaluation after a long run)."""
    from bow_jax.data import datasets, eval_input
    from bow_jax.protocols import cache

    def read_all(data_dir):
        config = rotnet_config(data_dir)
        config.eval.image_size = 16
        data = eval_input.evaluation_input(config, "train")
        parts = list(data.read(0, NUM_TRAIN, 16))
        return data, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    _, clean_images, clean_labels = read_all(digits_tfds)
    with pytest.warns(datasets.UnreadableImagesWarning,
                      match=r"digits_sizes split 'train': 2 images cannot be decoded and are left "
                            r"out of the evaluation:\n  \d_\d{4}\.JPEG\n  \d_\d{4}\.JPEG$"):
        data, images, labels = read_all(_break_records(digits_tfds, {3: "truncated",
                                                                     20: "garbage"}))
    broken = [3, 20]
    assert (labels[broken] == -1).all() and not images[broken].any()
    keep = np.setdiff1d(np.arange(NUM_TRAIN), broken)
    np.testing.assert_array_equal(images[keep], clean_images[keep])
    np.testing.assert_array_equal(labels[keep], clean_labels[keep])
    # The feature pass leaves them out, and stops past the fraction, naming the field.
    rows = {"feats": np.zeros((NUM_TRAIN, 2), np.float32), "labels": labels}
    assert len(cache._without_unreadable(rows, data, 0.05)["labels"]) == NUM_TRAIN - 2
    with pytest.raises(datasets.UnreadableImageError, match="2 of 48 images cannot be decoded"):
        cache._without_unreadable(rows, data, 0.01)
