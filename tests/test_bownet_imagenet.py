"""The ImageNet recipes of the BoWNet paper end to end on streamed TFDS data: the RotNet teacher
(`configs/rotnet_resnet50_imagenet.py`) and the chain RotNet → vocabulary → BoWNet → evaluation
(`configs/bownet_resnet50_imagenet.py`, one round here), each from the command line on the
tiny ImageNet-shaped dataset of `scripts/tiny_tfds.py` (real digits as JPEGs of varying sizes,
`config.data.in_memory=False`), at width 4 with a few steps, small views and tiny evaluation
settings, scoring themselves; and the streamed vocabulary stage's bounds: only the kept vectors
of the chosen images' teacher views, cut on the device from streamed canvases, reach the host.

The two commands share a persistent XLA compilation cache (the chain's RotNet stage compiles the
programs the RotNet run compiled); about 2.6 minutes on the 2-core CPU machine."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bow_jax.bow import build
from bow_jax.config import get_recipe
from bow_jax.data import geometric, splits
from bow_jax.lib import errors
from bow_jax.methods import bownet, interface
from bow_jax.models import feature_dims
from bow_jax.tasks import bownet_chain

tfds = pytest.importorskip("tensorflow_datasets")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROTNET = os.path.join(REPO, "configs", "rotnet_resnet50_imagenet.py")
BOWNET = os.path.join(REPO, "configs", "bownet_resnet50_imagenet.py")

# Tiny settings shared by both commands: the digits are 40-96 pixels, so canvases of 128 hold
# them whole and 64-pixel views (Resize 72) stand for ImageNet's 224 (Resize 256).
DATA = {"data.name": "digits_jpeg", "data.canvas_size": 128}
EVAL = {"eval.image_size": 64, "eval.every_steps": 0, "eval.batch_size": 64,
        "eval.train_limit": 512, "eval.test_limit": 200, "eval.linear_epochs": 1,
        "eval.linear_batch_size": 64,
        "eval.fewshot_classes": "random:8:0", "eval.fewshot_ways": 5}
RUN = {"model.kwargs.width": 4, "batch_size": 16, "num_train_steps": 2, "log_every": 1}
ROTNET_VIEWS = {"rotnet.crop_size": 64}  # the recipe's RandomResizedCrop, at 64
# The chain: its RotNet stage is the RotNet run above (same settings), then one BoWNet round
# (the recipe's second round, a BoWNet teacher, runs the same code on the same data; the
# in-memory chain of tests/test_bownet.py runs two).
CHAIN = {**{f"bownet.rotnet.{k}": v for k, v in {**RUN, **ROTNET_VIEWS}.items()},
         "bownet.view_size": 64, "bownet.teacher_resize": 72, "bownet.num_words": 16,
         "bownet.vocab_images": 64, "bownet.vocab_max_vectors": 512,
         "bownet.kmeans_iters": 5, "bownet.rounds": 1}


def flags(settings: dict) -> list:
    return [f"--config.{key}={value}" for key, value in settings.items()]


def run_main(config_file: str, workdir: str, settings: dict, cache_dir: str):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               JAX_DISABLE_MOST_OPTIMIZATIONS="true")  # as conftest.py does in-process
    out = subprocess.run([sys.executable, "-m", "bow_jax.main", f"--config={config_file}",
                          f"--workdir={workdir}", *flags(settings)],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def read_json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_bownet")
    data_dir = str(root / "tfds")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "tiny_tfds.py"),
                    "--data_dir", data_dir], check=True, capture_output=True)
    data = {**DATA, "data.data_dir": data_dir}
    cache = str(root / "xla_cache")
    rotnet, chain = str(root / "rotnet"), str(root / "chain")
    rotnet_log = run_main(ROTNET, rotnet, {**data, **RUN, **ROTNET_VIEWS, **EVAL}, cache)
    chain_log = run_main(BOWNET, chain, {**data, **RUN, **CHAIN, **EVAL}, cache)
    return {"data": data, "rotnet": rotnet, "chain": chain, "rotnet_log": rotnet_log,
            "chain_log": chain_log}


def check_scores(result: dict) -> None:
    assert 0.0 <= result["linear"]["top1"] <= 1.0
    assert set(result["fewshot"]) == {"5way_1shot", "5way_5shot"}
    assert 0.0 <= result["knn"]["top1"] <= 1.0


def test_rotnet_resnet50_trains_on_streamed_imagenet_and_scores_itself(runs):
    workdir = runs["rotnet"]
    config = read_json(workdir, "config.json")
    assert config["model"] == {"name": "resnet50", "kwargs": {"width": 4}}
    assert config["rotnet"]["head"] == "residual" and config["data"]["in_memory"] is False
    result = read_json(workdir, "eval", "results.json")["rotnet step 2"]
    check_scores(result)
    assert 0.0 <= result["pretext"]["rotation_accuracy"] <= 1.0
    # Evaluated on Resize + CenterCrop of the streamed images (sizes vary).
    key = read_json(workdir, "eval", "features", "step_2", "pooled", "test.json")["key"]
    assert key["transform"] == "resize(73)+center_crop(64)" and key["source"] == "TfdsInput"


def test_bownet_chain_runs_every_stage_on_streamed_imagenet_and_scores_them(runs):
    workdir = runs["chain"]
    stages = read_json(workdir, "chain.json")["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [
        ("rotnet", "ran"), ("vocab_1", "ran"), ("bownet_1", "ran"), ("eval", "ran")]
    config = read_json(workdir, "config.json")
    assert config["task"] == "bownet_chain" and config["bownet"]["target"] == "binary"
    _, meta = build.read_vocabulary(os.path.join(workdir, "vocab_1", "vocabulary.npz"))
    assert meta["teacher_workdir"] == os.path.join(workdir, "rotnet")
    assert meta["streamed"] and meta["layer"] == "layer3" and meta["num_words"] == 16
    assert (meta["view_size"], meta["teacher_resize"]) == (64, 72)
    # 64 images x 8 of the 4x4 layer3 locations: the cap of 512 vectors.
    assert (meta["num_images"], meta["locations_per_image"], meta["num_vectors"]) == (64, 8, 512)
    results = read_json(workdir, "eval", "results.json")
    assert set(results) == {"rotnet (teacher) · pooled", "bownet_1 · pooled"}
    for row in results.values():
        check_scores(row)
    assert 0.0 <= results["bownet_1 · pooled"]["pretext"]["bow_top_word_hit"] <= 1.0
    # Every stage's features were streamed (Resize + CenterCrop) and cached in its workdir.
    for stage in ("rotnet", "bownet_1"):
        key = read_json(workdir, stage, "eval", "features", "step_2", "pooled", "train.json")
        assert key["key"]["transform"] == "resize(73)+center_crop(64)"


# ------------------------------------------------------------------------------------------------
# The streamed vocabulary stage


def chain_config(data: dict, **changes):
    config = get_recipe(BOWNET)
    config.update_from_flattened_dict({**data, **RUN, **CHAIN, **EVAL, **changes})
    return config


def decoded(data_dir: str, positions) -> list:
    """The training images at `positions` (stored order), decoded by Pillow from their JPEG bytes,
    as the official code's loader decodes them (the stream decodes them the same way)."""
    import io
    from PIL import Image
    builder = tfds.builder("digits_jpeg", data_dir=data_dir)
    files = [example["image"] for example in tfds.as_numpy(builder.as_dataset(
        split="train", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}))]
    return [np.asarray(Image.open(io.BytesIO(files[i])).convert("RGB")) for i in positions]


def test_streamed_vocabulary_keeps_only_the_sampled_vectors_of_streamed_teacher_views(
        runs, monkeypatch, tmp_path):
    config = chain_config(runs["data"], **{"bownet.vocab_images": 100})
    stage = bownet_chain.bownet_config(config, 1, runs["chain"])
    teacher_dir = stage.bownet.teacher_workdir

    def no_in_memory_copy(*args, **kwargs):
        raise AssertionError("the vocabulary stage read the split into memory")
    monkeypatch.setattr(splits, "tfds_to_arrays", no_in_memory_copy)
    streamed, stream = [], bownet_chain.vocabulary_canvases

    def spy_stream(source, count, positions, local_batch):
        for images, sizes, real in stream(source, count, positions, local_batch):
            streamed.append((images.shape, real, sizes[:real].copy()))
            yield images, sizes, real
    monkeypatch.setattr(bownet_chain, "vocabulary_canvases", spy_stream)
    kmeans_inputs = []

    def kmeans_input(key, vectors, num_words, **kwargs):  # the k-means is tested elsewhere
        kmeans_inputs.append((vectors, kwargs["num_vectors"]))
        return np.zeros((num_words, vectors.shape[1]), np.float32), {
            "num_vectors": kwargs["num_vectors"], "mean_sq_distance": 0.0, "kmeans_iters": 0}
    monkeypatch.setattr(build, "build_vocabulary", kmeans_input)

    meta = bownet_chain.build_stage_vocabulary(stage, teacher_dir, str(tmp_path / "v.npz"))
    # 100 images, streamed 64 canvases at a time (the last batch padded): 5 of the 16 layer3
    # locations each under the cap of 512, so 500 vectors: all the host gathered, in the one
    # buffer the k-means reads (its rows padded to the k-means chunk, zeros of weight 0).
    assert [(shape, real) for shape, real, _ in streamed] == [((64, 128, 128, 3), 64),
                                                              ((64, 128, 128, 3), 36)]
    assert (meta["num_images"], meta["locations_per_image"], meta["num_vectors"]) == (
        100, 5, 500)
    [(vectors, count)] = kmeans_inputs
    mesh_size = jax.device_count()
    assert count == 500 and vectors.shape == (build.padded_rows(500, 16, mesh_size), 64)
    assert not vectors[count:].any()

    # The same by hand: the streamed images are the training images at the chosen positions,
    # and each one's kept vectors are locations of the teacher's map of its unperturbed
    # teacher view (Resize 72 + CenterCrop 64).
    subset_key = jax.random.split(jax.random.fold_in(jax.random.key(stage.seed), 7), 3)[0]
    positions = bownet_chain.vocabulary_positions(subset_key, 1497, 100)
    images = decoded(runs["data"]["data.data_dir"], positions)
    sizes = np.concatenate([s for _, _, s in streamed])
    np.testing.assert_array_equal(sizes, [im.shape[:2] for im in images])
    step, teacher_config = bownet.teacher_checkpoint(teacher_dir)
    teacher = bownet.teacher_backbone(teacher_config)
    variables = bownet.load_teacher_variables(teacher_dir, step)
    mean, std = interface.normalization(stage)
    picked = (0, 63, 99)  # both batches
    views = []
    for i in picked:
        canvas = np.zeros((128, 128, 3), np.uint8)
        canvas[:images[i].shape[0], :images[i].shape[1]] = images[i]
        views.append(geometric.resize_center_crop(canvas, images[i].shape[:2], 72, (64, 64)))
    fmaps = jax.jit(lambda v, x: teacher.apply(v, interface.to_network_input(x, mean, std),
                                               train=False)["layer3"])(variables, np.stack(views))
    for i, fmap in zip(picked, np.asarray(fmaps)):
        locations = fmap.reshape(-1, 64)
        for vector in vectors[i * 5:(i + 1) * 5]:  # the nearest location, up to float noise
            nearest = locations[np.abs(locations - vector).max(axis=1).argmin()]
            np.testing.assert_allclose(vector, nearest, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("overrides, expected", [
    ({"bownet.vocab_images": 0, "bownet.vocab_max_vectors": 0}, "vocab_max_vectors=0 and "
                                                                "vocab_images=0 on streamed data"),
    ({"bownet.view_size": 0}, "config.bownet.view_size=0 takes the stored images' size"),
    ({"bownet.teacher_resize": 10}, "teacher_resize=10; expected both >= 0 and teacher_resize"),
    ({"bownet.num_words": 1000}, "num_words=1000 is more than the config.bownet.vocab_max_vectors"),
])
def test_the_chain_checks_the_bownet_stages_before_the_rotnet_trains(runs, tmp_path, overrides,
                                                                      expected):
    """Settings only the BoWNet stages read fail at once, not after the RotNet stage (days on
    ImageNet): nothing is written."""
    config = chain_config(runs["data"], **overrides)
    with pytest.raises(errors.InputError, match=expected):
        bownet_chain.run(config, str(tmp_path / "chain"))
    assert not os.path.exists(tmp_path / "chain")


def test_vocabulary_of_a_preallocated_buffer_equals_that_of_the_vectors():
    vectors = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    buffer = build.vector_buffer(300, 8, 6, jax.device_count())
    buffer[:300] = vectors
    key = jax.random.key(3)
    a, meta_a = build.build_vocabulary(key, vectors, 6, n_iter=10)
    b, meta_b = build.build_vocabulary(key, buffer, 6, n_iter=10, num_vectors=300)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert meta_b["num_vectors"] == 300 and meta_a["inertia"] == pytest.approx(meta_b["inertia"])
    with pytest.raises(errors.InputError, match="num_words"):
        build.build_vocabulary(key, buffer, 6, num_vectors=5)


def test_recipes_state_the_papers_settings():
    rotnet = get_recipe(ROTNET)
    assert (rotnet.batch_size, rotnet.num_epochs, rotnet.optim.lr) == (192, 50, 0.01)
    assert tuple(rotnet.optim.milestones) == (15, 30, 45) and rotnet.optim.nesterov
    r = rotnet.rotnet
    assert (r.view, r.crop_size, tuple(r.crop_scale)) == ("resized_crop", 224, (0.08, 1.0))
    c = get_recipe(BOWNET)
    assert c.task == "bownet_chain" and c.model.name == "resnet50"
    b = c.bownet
    assert (b.num_words, b.teacher_layer, b.target, b.rounds) == (20_000, "layer3", "binary", 2)
    assert (b.view_size, b.teacher_resize) == (224, 256)
    assert (c.batch_size, c.num_epochs, c.optim.lr, c.optim.weight_decay) == (256, 140, 0.03,
                                                                             1e-4)
    assert tuple(c.optim.milestones) == (60, 100, 130)
    assert b.rotnet.to_dict() == rotnet.to_dict()
    assert feature_dims(bownet.teacher_backbone(b.rotnet.to_dict()), (1, 224, 224, 3))[
        b.teacher_layer] == (1, 14, 14, 1024)


def test_a_vocabulary_of_other_views_is_not_reused(runs):
    """vocab_1 of the chain was built from Resize 72 + CenterCrop 64 teacher views: a run whose
    teacher views differ refuses it, naming the fields, instead of training on its words."""
    config = chain_config(runs["data"], **{"bownet.teacher_resize": 80})
    stage = bownet_chain.bownet_config(config, 1, runs["chain"])
    with pytest.raises(errors.InputError, match=r"teacher_resize=72, but this run has "
                                                r"config.bownet.view_size=64, teacher_resize=80"):
        bownet_chain.vocabulary_stage(stage, stage.bownet.teacher_workdir,
                                      stage.bownet.vocabulary)
    same = bownet_chain.bownet_config(chain_config(runs["data"]), 1, runs["chain"])
    assert bownet_chain.vocabulary_stage(same, same.bownet.teacher_workdir,
                                         same.bownet.vocabulary) == "reused"
