"""BoWNet: targets (eq. 1, 3, 4 and the spatial pyramid), the cosine head (eq. 5) and loss (eq. 6),
CutMix target mixing, 1 vs 8 devices, and the RotNet → vocabulary → BoWNet x2 → eval chain on
scikit-learn's digits (stages run, are reused, and resume after an interruption).

Every formula is checked against numpy written from the paper. The chain uses a 3-block NIN on
8x8 digits so that its many small compiles fit the time budget; a module-scoped persistent
compilation cache lets the resumed stage, round 2 and the re-runs reuse the programs compiled
once (they are the same programs).
"""
import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bow_jax import tasks
from bow_jax.bow import build
from bow_jax.config import get_recipe
from bow_jax.tasks import bownet_chain
from bow_jax.data import augment
from bow_jax.data.splits import load_split
from bow_jax.lib import sharding, stop
from bow_jax.config import base_config
from bow_jax.methods import bownet, create_method, data_info_for
from loop_helpers import run_steps  # tests/ is on sys.path (pytest's rootdir import mode)

# Resumed stages, round 2 and re-runs compile the very same programs again: cached (conftest.py).
pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# numpy references, written from the paper


def np_words(fmap, vocab, border=0):
    """Eq. 1: index of the nearest word (squared Euclidean distance) per location [B,h,w]."""
    if border:
        fmap = fmap[:, border:-border, border:-border]
    d = ((fmap[..., None, :] - vocab[None, None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def np_bow(words, k, mode):
    """Eq. 3 (counts) or eq. 4 (presence) over the locations of `words` [B,...], L1-normalised."""
    flat = words.reshape(words.shape[0], -1)
    counts = np.stack([np.bincount(w, minlength=k) for w in flat]).astype(np.float64)
    y = counts if mode == "histogram" else (counts > 0).astype(np.float64)
    return y / y.sum(1, keepdims=True)


def np_pyramid(words, k, mode):
    """Sp-BoW: the whole map, then the 2x2 cells (TL, TR, BL, BR) of an even-sized map."""
    _, h, w = words.shape
    cells = [words] + [words[:, i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2]
                       for i in range(2) for j in range(2)]
    return np.stack([np_bow(c, k, mode) for c in cells], axis=1)


def bownet_cfg(**overrides):
    cfg = bownet.default_config()
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------
# Targets, head, loss, CutMix


@pytest.mark.parametrize("mode", ["histogram", "binary"])
@pytest.mark.parametrize("border", [0, 1])
def test_targets_match_paper_equations(mode, border):
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(3, 6, 6, 4)).astype(np.float32)
    vocab = rng.normal(size=(7, 4)).astype(np.float32)
    got = bownet.bow_targets(jnp.asarray(fmap), jnp.asarray(vocab),
                             bownet_cfg(target=mode, border=border))
    want = np_bow(np_words(fmap, vocab, border), 7, mode)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    assert got.shape == (3, 7)


@pytest.mark.parametrize("mode", ["histogram", "binary"])
def test_spatial_pyramid_targets_match_numpy(mode):
    rng = np.random.default_rng(1)
    fmap = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    vocab = rng.normal(size=(6, 3)).astype(np.float32)
    got = bownet.bow_targets(jnp.asarray(fmap), jnp.asarray(vocab),
                             bownet_cfg(target=mode, pyramid=True))
    want = np_pyramid(np_words(fmap, vocab), 6, mode)
    assert got.shape == (2, 5, 6)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


class TinyBackbone(nn.Module):
    """A conv and its global average: enough to drive the head."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.relu(nn.Conv(5, (3, 3))(x))
        return {"map": h, "pooled": h.mean(axis=(1, 2))}


@pytest.mark.parametrize("num_bows", [1, 5])
def test_cosine_head_logits_and_loss_match_numpy(num_bows):
    model = bownet.BoWNetModel(backbone=TinyBackbone(), num_words=6, num_bows=num_bows,
                               gamma_init=2.5)
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    # A different gamma per head, to see each head uses its own.
    names = ["bow_head"] if num_bows == 1 else [f"bow_head_{i}" for i in range(num_bows)]
    params = jax.tree.map(lambda a: a, variables["params"])
    for i, name in enumerate(names):
        params[name]["gamma"] = jnp.float32(0.5 + i)
    logits, features = model.apply({"params": params}, x, train=False)
    phi = np.asarray(features["pooled"], np.float64)
    want = []
    for i, name in enumerate(names):
        w = np.asarray(params[name]["kernel"], np.float64)  # [C, K]: columns are the w_k
        want.append((0.5 + i) * phi @ (w / np.linalg.norm(w, axis=0, keepdims=True)))  # eq. 5
    want = want[0] if num_bows == 1 else np.stack(want, axis=1)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-6)

    # Eq. 6: -sum_k y_k log softmax_k, averaged over images (and the pyramid's BoWs).
    targets = np.random.default_rng(2).dirichlet(np.ones(6), size=want.shape[:-1])
    logp = want - np.log(np.exp(want).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(bownet.bow_loss(logits, jnp.asarray(targets, jnp.float32))),
                               -(targets * logp).sum(-1).mean(), rtol=1e-5)


@pytest.mark.parametrize("pyramid", [False, True])
def test_cutmix_mixes_targets_by_pasted_area(pyramid):
    rng = np.random.default_rng(3)
    b, h, w, k = 6, 8, 8, 5
    images = rng.uniform(size=(b, h, w, 3)).astype(np.float32)  # distinct pixels everywhere
    shape = (b, 5, k) if pyramid else (b, k)
    targets = rng.dirichlet(np.ones(k), size=shape[:-1]).astype(np.float32)
    checked = 0
    mix = jax.jit(lambda key: bownet.cutmix_bows(key, jnp.asarray(images), jnp.asarray(targets),
                                                 1.0))
    for seed in range(6):
        mixed, got = mix(jax.random.key(seed))
        mixed, got = np.asarray(mixed), np.asarray(got)
        pasted = np.any(mixed != images, axis=-1)  # [b, h, w]: pixels taken from the partner
        for i in range(b):
            if not pasted[i].any():
                continue  # empty box, or the image drew itself as partner
            # The partner is the image whose pixels fill the pasted box.
            partner = [j for j in range(b) if np.array_equal(mixed[i][pasted[i]],
                                                             images[j][pasted[i]])]
            assert len(partner) == 1
            lam = 1.0 - pasted[i].sum() / (h * w)  # 1 - lam = pasted area / image area
            want = lam * targets[i] + (1 - lam) * targets[partner[0]]
            np.testing.assert_allclose(got[i], want, atol=1e-6)
            checked += 1
    assert checked >= 6


def test_student_views_are_uint8_crops_and_teacher_view_is_unperturbed(chain_run):
    config = chain_run["stage"]
    data = load_split(config, "train")
    method = create_method(config, data_info_for(config, data))
    sizes = jnp.broadcast_to(jnp.asarray(data.images.shape[1:3], jnp.int32), (4, 2))
    views = jax.jit(method.make_views)(jnp.asarray(data.images[:4]), sizes, jax.random.key(0))
    assert views["student"].dtype == jnp.uint8 and views["teacher"].dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(views["teacher"]), data.images[:4])
    assert views["student"].shape == data.images[:4].shape
    assert not np.array_equal(np.asarray(views["student"]), data.images[:4])


# ------------------------------------------------------------------------------------------------
# The chain on digits (shared by the tests below)


def tiny_chain_config(**overrides):
    model = ml_collections.ConfigDict({"name": "nin", "kwargs": {"num_blocks": 3, "width": 12}})
    r = base_config("rotnet")
    r.model = model
    r.rotnet.crop_padding = 1
    r.rotnet.flip = False
    r.batch_size = 16
    r.num_train_steps = 2
    r.log_every = 1
    c = base_config("bownet")
    c.task = "bownet_chain"
    c.model = model
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.limit = 128
    c.batch_size = 16
    c.num_train_steps = 3
    c.log_every = 1
    c.checkpoint_every_steps = 100  # only the final (and the SIGTERM) checkpoints
    b = c.bownet
    b.rotnet = r
    b.teacher_layer = "conv1"  # 4x4 on 8x8 inputs
    b.num_words = 8
    b.kmeans_iters = 100
    b.kmeans_tol = 0.0  # Lloyd runs to its fixed point (checked below)
    b.flip = False
    b.rounds = 2
    c.eval.feature = "pooled"
    c.eval.batch_size = 64
    c.eval.linear_epochs = 1
    c.eval.fewshot_shots = (1,)
    c.eval.fewshot_queries = 5
    c.eval.fewshot_episodes = 5
    c.eval.test_limit = 256
    c.update_from_flattened_dict(overrides)
    return c


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def stage_status(workdir):
    with open(os.path.join(workdir, "chain.json"), encoding="utf-8") as f:
        return {s["stage"]: s["status"] for s in json.load(f)["stages"]}


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """Runs the chain, interrupted by SIGTERM at step 1 of round 1, then again to the end."""
    workdir = str(tmp_path_factory.mktemp("chain"))
    config = tiny_chain_config()

    def sigterm_at_1(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(stop.Stopped, match="step 1/3, saved in"):  # the driver's one stop
        bownet_chain.run(config, workdir, stage_hooks={"bownet_1": [sigterm_at_1]})
    interrupted = {"status": stage_status(workdir),
                   "bownet_1_steps": checkpoint_steps(os.path.join(workdir, "bownet_1"))}
    results = bownet_chain.run(config, workdir)
    return {"workdir": workdir, "config": config, "interrupted": interrupted,
            "results": results, "status": stage_status(workdir),
            "stage": bownet_chain.bownet_config(config, 1, workdir)}


def test_chain_runs_every_stage_and_resumes_an_interrupted_one(chain_run):
    workdir = chain_run["workdir"]
    first = chain_run["interrupted"]
    assert first["status"] == {"rotnet": "ran", "vocab_1": "ran", "bownet_1": "interrupted"}
    assert first["bownet_1_steps"][-1] == 1
    assert chain_run["status"] == {"rotnet": "reused", "vocab_1": "reused", "bownet_1": "ran",
                                   "vocab_2": "ran", "bownet_2": "ran", "eval": "ran"}
    for stage in ("rotnet", "bownet_1", "bownet_2"):
        assert checkpoint_steps(os.path.join(workdir, stage))[-1] == (2 if stage == "rotnet" else 3)
    rows = set(chain_run["results"])
    assert rows == {"rotnet (teacher) · pooled", "bownet_1 · pooled", "bownet_2 · pooled"}
    for row in chain_run["results"].values():
        assert 0 <= row["linear"]["top1"] <= 1 and "5way_1shot" in row["fewshot"]
    assert os.path.isfile(os.path.join(workdir, "eval", "results.md"))


def test_vocabulary_is_the_kmeans_of_the_teachers_dense_features(chain_run):
    workdir, config = chain_run["workdir"], chain_run["stage"]
    centroids, meta = build.read_vocabulary(os.path.join(workdir, "vocab_1", "vocabulary.npz"))
    assert meta["teacher_step"] == 2 and meta["layer"] == "conv1" and meta["num_words"] == 8
    _, meta_2 = build.read_vocabulary(os.path.join(workdir, "vocab_2", "vocabulary.npz"))
    assert meta_2["teacher_workdir"] == os.path.join(workdir, "bownet_1")
    assert meta_2["teacher_step"] == 3

    # Independent recomputation: every location of the teacher's eval-mode conv1 maps.
    step, teacher_config = bownet.teacher_checkpoint(os.path.join(workdir, "rotnet"))
    teacher = bownet.teacher_backbone(teacher_config)
    variables = bownet.load_teacher_variables(os.path.join(workdir, "rotnet"), step)
    images = load_split(config, "train").images
    x = augment.normalize(images.astype(np.float32) / 255.0, augment.CIFAR_MEAN,
                          augment.CIFAR_STD)
    fmap = np.asarray(teacher.apply(variables, x, train=False)["conv1"], np.float64)
    vectors = fmap.reshape(-1, fmap.shape[-1])
    assert centroids.shape == (8, fmap.shape[-1])
    assert meta["num_vectors"] == len(vectors) == 128 * 16
    d = ((vectors[:, None] - centroids[None].astype(np.float64)) ** 2).sum(-1)
    labels = d.argmin(1)
    np.testing.assert_allclose(meta["inertia"], d.min(1).sum(), rtol=1e-3)
    # Lloyd's fixed point: every word is the mean of the vectors assigned to it.
    for k in range(8):
        assert (labels == k).any()
        np.testing.assert_allclose(centroids[k], vectors[labels == k].mean(0), atol=1e-3)


def test_rerunning_the_chain_reuses_every_finished_stage(chain_run):
    workdir = chain_run["workdir"]
    vocab = [os.path.join(workdir, f"vocab_{r}", "vocabulary.npz") for r in (1, 2)]
    mtimes = [os.stat(p).st_mtime_ns for p in vocab]
    steps = {s: checkpoint_steps(os.path.join(workdir, s)) for s in ("rotnet", "bownet_1",
                                                                       "bownet_2")}
    again = tasks.run(chain_run["config"], workdir)  # the main.py entry, task 'bownet_chain'
    assert set(stage_status(workdir).values()) == {"reused"}
    assert [os.stat(p).st_mtime_ns for p in vocab] == mtimes
    assert {s: checkpoint_steps(os.path.join(workdir, s)) for s in steps} == steps
    assert again == chain_run["results"]


def test_one_and_eight_devices_give_the_same_step(chain_run):
    assert jax.device_count() == 8
    config = chain_run["stage"]
    one = run_steps(config, sharding.make_mesh(jax.devices()[:1]), 2)
    eight = run_steps(config, sharding.make_mesh(), 2)
    for a, b in ((one.params, eight.params), (one.batch_stats, eight.batch_stats)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The frozen parts are exactly what the previous stages wrote.
    centroids, _ = build.read_vocabulary(config.bownet.vocabulary)
    np.testing.assert_array_equal(one.vocabulary, centroids)
    teacher = bownet.load_teacher_variables(config.bownet.teacher_workdir, 2)
    for x, y in zip(jax.tree.leaves(eight.teacher), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(x, y)
    assert int(one.step) == 2 and float(one.params["bow_head"]["gamma"]) != 1.0


# ------------------------------------------------------------------------------------------------
# Clear failures


def test_bad_inputs_name_the_field(chain_run, tmp_path):
    stage = chain_run["stage"]
    info = data_info_for(stage, load_split(stage, "train"))

    def create(**changes):
        config = ml_collections.ConfigDict(stage.to_dict())
        for key, value in changes.items():
            config.bownet[key] = value
        return create_method(config, info)

    with pytest.raises(FileNotFoundError, match="config.bownet.vocabulary"):
        create(vocabulary=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="config.bownet.teacher_workdir is empty"):
        create(teacher_workdir="")
    with pytest.raises(ValueError, match="num_words"):
        create(num_words=16)  # the vocabulary on disk has K=8
    with pytest.raises(ValueError, match="config.bownet.teacher_layer"):
        create(teacher_layer="layer9")
    with pytest.raises(ValueError, match="config.bownet.target"):
        create(target="max")
    # The vocabulary of round 2 comes from another teacher (bownet_1, step 3).
    with pytest.raises(ValueError, match="teacher_step"):
        create(vocabulary=os.path.join(chain_run["workdir"], "vocab_2", "vocabulary.npz"))
    with pytest.raises(ValueError, match="config.bownet.rotnet"):
        bownet_chain.rotnet_config(base_config("bownet"))


def test_paper_configs_build_and_fail_clearly_without_cifar100(tmp_path):
    config = get_recipe(os.path.join(REPO, "configs",
                                                        "bownet_cifar100_wrn.py"))
    assert config.task == "bownet_chain" and config.bownet.num_words == 2048
    assert config.bownet.rotnet.rotnet.head == "residual"
    assert config.bownet.rotnet.rotnet.head_feature == "block3"
    assert config.steps_per_epoch == 2000 and tuple(config.optim.milestones) == (12, 24)
    config.data.data_dir = str(tmp_path)  # an empty TFDS folder: nothing prepared
    with pytest.raises(Exception, match="cifar100"):
        bownet_chain.run(config, str(tmp_path / "run"))
    cpu = get_recipe(os.path.join(REPO, "configs", "bownet_cifar10_cpu.py"))
    assert cpu.bownet.rotnet.model.to_dict() == cpu.model.to_dict()
