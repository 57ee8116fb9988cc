"""Training learns: each method, trained briefly on real images (scikit-learn's digits, 8x8),
gives frozen features that a k-NN probe scores above the same network at its random init.

The loop is written here (make_views + train_step, jitted, one device): what the step functions
must keep whatever driver runs them. The probe is a cosine k-NN (k = 10, majority vote) written in
numpy, train split -> test split, on `method.encode` features. The test runs seed 0 and asks for
+2 points; margins measured on seeds 0 / 1 / 2 (BOW_JAX_LEARNING_SEED, 2-core machine):
  RotNet 60 steps: trained 87.3 / 83.4 / 83.9 vs init 79.4 / 67.6 / 74.6  (+7.9 / +15.8 / +9.3)
  BoWNet 60 steps: trained 85.4 / 81.7 / 82.8 vs init 79.4 / 67.6 / 74.6  (+5.9 / +14.1 / +8.2)
OBoW has no such test yet: on digits its features first fall below random init (configs/demo.py:
k-NN passes random init only after ~800 steps); measured here with a tiny ResNet, 100 steps of 64:
53.8 vs 71.8, 250 steps of 32: 66.8 vs 71.8 (too long for CI before it would win).
"""
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.config import base_config, sgd
from bow_jax.data import augment
from bow_jax.data.splits import load_split
from bow_jax.methods import bownet, create_method, data_info_for
from bow_jax.models import create_backbone

SEED = int(os.environ.get("BOW_JAX_LEARNING_SEED", "0"))  # offline: the margins of other seeds
TINY = dict(width=8, stage_sizes=(1, 1, 1, 1), cifar_stem=True)


def digits_config(method, steps, lr=0.1, batch=64):
    c = base_config(method)
    c.model.name = "resnet18"
    c.model.kwargs.update(TINY)
    c.data.update(dict(source="digits", image_size=8, normalization="cifar"))
    c.batch_size = batch
    c.num_train_steps = steps
    c.seed = SEED
    c.eval.feature = "pooled"
    sgd(c, lr, weight_decay=5e-4, schedule="constant")
    return c


@contextlib.contextmanager
def xla_optimizations():
    """The step runs a few dozen times: here XLA's optimisations pay for their compile time
    (conftest turns them off for the rest of the suite)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


def train(method, config, images, state=None):
    """`config.num_train_steps` steps on random batches of `images` (uint8 [N, H, W, 3])."""
    state = jax.jit(method.init_state)(jax.random.key(config.seed)) if state is None else state
    step = jax.jit(lambda s, x, k: method.train_step(s, method.make_views(x, k)),
                   donate_argnums=0)
    rng = np.random.default_rng(config.seed)
    with xla_optimizations():
        for t in range(config.num_train_steps):
            idx = rng.choice(len(images), config.batch_size, replace=False)
            state, metrics = step(state, jnp.asarray(images[idx]), jax.random.key(1000 + t))
        assert np.isfinite(float(metrics["loss"]))
    return state


def knn_accuracy(method, state, train_split, test_split, k=10):
    """Cosine k-NN (majority of the k nearest train features) accuracy on the test split."""
    encode = jax.jit(method.encode)
    feats = [np.asarray(encode(state, jnp.asarray(s.images)), np.float64)
             for s in (train_split, test_split)]
    a, b = (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) for f in feats)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    votes = train_split.labels[nearest]
    pred = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    return float(np.mean(pred == test_split.labels))


def trained_vs_init(config, method=None, state=None):
    train_split, test_split = load_split(config, "train"), load_split(config, "test")
    method = method or create_method(config, data_info_for(config, train_split))
    init = jax.jit(method.init_state)(jax.random.key(config.seed))
    trained = train(method, config, train_split.images, state)
    return (knn_accuracy(method, trained, train_split, test_split),
            knn_accuracy(method, init, train_split, test_split), trained, method)


@pytest.fixture(scope="module")
def rotnet_run():
    """RotNet trained 60 steps on digits (also the BoWNet test's teacher)."""
    config = digits_config("rotnet", steps=60)
    config.rotnet.crop_padding = 1
    config.rotnet.flip = False
    got, init, state, method = trained_vs_init(config)
    return dict(config=config, got=got, init=init, state=jax.device_get(state), method=method)


def test_rotnet_learns_on_digits(rotnet_run):
    got, init = rotnet_run["got"], rotnet_run["init"]
    print(f"rotnet seed {SEED}: k-NN trained {got:.4f} init {init:.4f}")
    assert got > init + 0.02


def np_kmeans(x, k, iters, seed):
    """Lloyd's k-means in numpy from k random points (empty clusters keep their centre)."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        labels = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            if (labels == j).any():
                centres[j] = x[labels == j].mean(0)
    return centres


def test_bownet_learns_on_digits(rotnet_run, monkeypatch):
    """BoWNet with the trained RotNet as frozen teacher and a k-means vocabulary of its layer2
    (4x4) features: the student beats its own random init."""
    teacher_method, teacher_state = rotnet_run["method"], rotnet_run["state"]
    config = digits_config("bownet", steps=60)
    b = config.bownet
    b.teacher_layer, b.num_words, b.flip = "layer2", 32, False
    train_split = load_split(config, "train")
    teacher = create_backbone("resnet18", **TINY)
    t_vars = teacher_method.backbone_variables(teacher_state)
    x = (train_split.images.astype(np.float32) / 255.0 - np.asarray(augment.CIFAR_MEAN)) / \
        np.asarray(augment.CIFAR_STD)
    fmap = np.asarray(jax.jit(lambda v, x: teacher.apply(v, x, train=False)["layer2"])(
        t_vars, x.astype(np.float32)))
    vocab = np_kmeans(fmap.reshape(-1, fmap.shape[-1]).astype(np.float64), 32, 10, SEED)
    monkeypatch.setattr(bownet, "load_frozen_inputs",
                        lambda cfg, shape: (teacher, t_vars, vocab.astype(np.float32)))
    method = bownet.create(config, data_info_for(config, train_split))
    got, init, _, _ = trained_vs_init(config, method)
    print(f"bownet seed {SEED}: k-NN trained {got:.4f} init {init:.4f}")
    assert got > init + 0.02
