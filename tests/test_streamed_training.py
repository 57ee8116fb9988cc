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
from jax.experimental.compilation_cache import compilation_cache

from bow_jax.bow import build
from bow_jax.config import base_config
from bow_jax.data.splits import load_split
from bow_jax.lib import sharding, stop
from bow_jax.methods import create_method, data_info_for
from bow_jax.models import create_backbone, feature_dims
from bow_jax.tasks import common
from bow_jax.tasks import train as train_task
from loop_helpers import run_steps  # tests/ is on sys.path

tf = pytest.importorskip("tensorflow")
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
            lambda: ({"image": images[i], "label": int(labels[i])} for i in part),
            output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8),
                              "label": tf.TensorSpec((), tf.int64)})

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="digits_sizes", version="1.0.0", features=features, data_dir=data_dir,
        split_datasets={"train": split(range(NUM_TRAIN)),
                        "test": split(range(NUM_TRAIN, NUM_TRAIN + 16))})
    assert max(max(im.shape[:2]) for im in images[:NUM_TRAIN]) > CANVAS  # some are shrunk
    return data_dir


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    """The resumed runs compile the very same programs again: cache them."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    compilation_cache.reset_cache()
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


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
    return {"rotnet": lambda: rotnet_config(digits_tfds),
            "bownet": lambda: bownet_config(digits_tfds, teacher_dir),
            "obow": lambda: obow_config(digits_tfds)}


METHODS = ("rotnet", "bownet", "obow")


@pytest.mark.parametrize("name", METHODS)
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


# Steps compared. OBoW: one, as its in-memory test: from the second or third step on, the float
# rounding of 1 vs 8 devices (~1e-7) grows to ~1e-4 in these width-4 networks, in memory too.
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


@pytest.mark.parametrize("name", METHODS)
def test_streamed_resume_reaches_the_uninterrupted_state_exactly(configs, name, tmp_path):
    """4 steps in one go, or stopped by SIGTERM after step 2 and resumed (crossing an epoch of the
    stream: 48 images, 16 per step, 3 steps per epoch): the same state, bit for bit."""
    config = configs[name]()
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_task.run(config, full)

    def sigterm_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(stop.Stopped, match="step 2/4"):
        train_task.run(config, split, hooks=[sigterm_at_2])
    train_task.run(config, split)
    want, got = _final_state(config, full), _final_state(config, split)
    assert int(want.step) == int(got.step) == 4
    as_bits = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(as_bits(x)), np.asarray(as_bits(y)),
                                      err_msg=jax.tree_util.keystr(path))
