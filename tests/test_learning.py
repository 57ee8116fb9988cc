"""Training learns: each method, trained briefly on real images (scikit-learn's digits, 8x8),
gives frozen features that a probe scores above the same network at its random init.

The loop is written here (make_views + train_step, jitted, one device): what the step functions
must keep whatever driver runs them. RotNet and BoWNet are probed with a cosine k-NN (k = 10,
majority vote) written in numpy, train split -> test split, on `method.encode` features; OBoW
with a logistic-regression linear probe (its docstring says why). Each test runs seed 0 and asks
for +2 points; margins measured on seeds 0 / 1 / 2 (BOW_JAX_LEARNING_SEED, 2-core machine):
  RotNet 60 steps: trained 87.3 / 83.4 / 83.9 vs init 79.4 / 67.6 / 74.6  (+7.9 / +15.8 / +9.3)
  BoWNet 60 steps: trained 85.4 / 81.7 / 82.8 vs init 79.4 / 67.6 / 74.6  (+5.9 / +14.1 / +8.2)
  OBoW 300 steps (linear): trained 87.6 / 88.7 / 88.2 vs init 74.9 / 77.2 / 80.3
                           (+12.7 / +11.5 / +7.9)
"""
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.config import base_config, obow_targets, obow_views, sgd
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
    # In-memory images are their own canvases: every size is the stored images' (h, w).
    sizes = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32), (config.batch_size, 2))
    step = jax.jit(lambda s, x, k: method.train_step(s, method.make_views(x, sizes, k)),
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


def linear_probe_accuracy(method, state, train_split, test_split):
    """Multinomial logistic regression (scikit-learn, L2, C = 1) on frozen features standardised
    with the train split's mean and std, fitted on the train split, scored on the test split.
    The standardisation makes it blind to a per-feature scale and shift (the last BatchNorm's
    running statistics), which alone move the k-NN probe (see the OBoW test)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    encode = jax.jit(method.encode)
    a, b = (np.asarray(encode(state, jnp.asarray(s.images)), np.float64)
            for s in (train_split, test_split))
    mean, std = a.mean(0), np.maximum(a.std(0), 1e-6)
    with threadpool_limits(1):  # BLAS threads beside XLA's slow it down 10x on a busy machine
        clf = LogisticRegression(C=1.0, max_iter=2000).fit((a - mean) / std, train_split.labels)
    return float(clf.score((b - mean) / std, test_split.labels))


def obow_digits_config(steps=300):
    """OBoW sized for 8x8 digits and a CI budget (the search behind it: the test's docstring).
    The teacher sees the whole 8x8 image (same scale as the student's crops and the probe); its
    layer2 map (4x4) is the BoW level, all locations (border 0), one raw local feature per image
    into the queue ('local_features', the paper's ablation (a): a 3x3 local average would need a
    map of 3x3 after the border); hard codes, K = 128 words, teacher momentum 0.9 (cosine to 1),
    statistic momentum 0.9; constant lr 0.03 without warm-up; no patches, no flips."""
    config = digits_config("obow", steps=steps, lr=0.03, batch=32)
    o = config.obow
    obow_targets(o, ("layer2",), num_words=128, inv_delta=0.0, kappa=5.0)  # hard codes
    o.border, o.word_sampling = 0, "local_features"
    o.stat_momentum, o.teacher_momentum, o.flip = 0.9, 0.9, False
    obow_views(o, teacher_size=8, teacher_resize=0, crop_size=8, crop_scale=(0.2, 1.0),
               num_patches=0)
    return config


def test_obow_beats_its_random_init_on_digits():
    """OBoW, 300 steps of 32 digits (`obow_digits_config`): a linear probe on its frozen pooled
    features beats the same network at random init on the test digits.

    Seeds 0 / 1 / 2 (accuracies in %, 355 test digits; 2-core machine, 2026-11-30):
      linear: trained 87.61 / 88.73 / 88.17  init 74.93 / 77.18 / 80.28  (+12.7 / +11.5 / +7.9)
      k-NN:   trained 85.35 / 83.10 / 81.97  init 71.83 / 73.80 / 70.99  (+13.5 / +9.3 / +11.0)
    About 14-19 s of the test on 2 busy cores (~24 s CPU for the pytest process): ~11 s compiling
    the step, ~3 s for the 300 steps, ~2 s the probes.

    Why a linear probe on standardised features, not the k-NN of the other tests: the same loop
    with lr 0 (only the BatchNorm running statistics move, from the crops) already moves the k-NN
    by +0.0 / +3.9 / +5.4 points, while the linear probe drops (-1.4 / -3.1 / -10.7): its margin
    is learning, not recalibration.

    The search (linear margins over random init unless said, seeds 0 / 1 / 2, seconds-cheap
    since the steps cost ~10 ms; start: TINY ResNet, 8x8 digits, batch 32, teacher 20x20 with a
    layer3 BoW level, hard codes, K 128, momenta 0.9, constant lr, no warm-up):
    - lr 0.1: every seed first gains (steps 10-20), then the student collapses to a near-constant
      pooled feature (feature std 3.8 -> 0.04 by step 50; it predicts the mean BoW): step 60
      linear -4.2 / -0.8 / -49.3. The same with K 32, teacher momentum 0.99, soft codes
      (inv_delta 20), crop scale (0.5, 1).
    - lr 0.01, 120 steps, holds, but seed 2 barely gains: +2.0 (pooled), +2.5 (layer3 pooled),
      +1.1 (K 64), +1.4 (no colour jitter / grayscale / blur), +1.4 (batch 64), +0.6 (soft
      codes); width 16 starts higher (linear 89-92) and gains -2.8 / +1.4 / +2.0; lr 0.015,
      200 steps: +14.1 / +9.6 / +7.3, but layer3's k-NN -4.2 for seed 2.
    - the teacher at the student's scale (8x8, not 20x20), BoW level layer2 (4x4; layer3 is 2x2),
      border 0, 'local_features' words: lr 0.01, 120 steps: +2.0 / -1.7 / +3.1; lr 0.05, 200
      steps: +3.1 / +6.2 / +6.2; lr 0.03: +5.4 or more at every 40-step point of a 200-step run,
      and runs of 120 / 200 / 300 steps give +6.5 / +8.2 / +4.8, +11.3 / +9.6 / +5.9 and
      +12.7 / +11.5 / +7.9: this test.
    """
    config = obow_digits_config()
    train_split, test_split = load_split(config, "train"), load_split(config, "test")
    method = create_method(config, data_info_for(config, train_split))
    init = jax.jit(method.init_state)(jax.random.key(config.seed))
    trained = train(method, config, train_split.images)
    got, base = (linear_probe_accuracy(method, s, train_split, test_split)
                 for s in (trained, init))
    got_knn, base_knn = (knn_accuracy(method, s, train_split, test_split)
                         for s in (trained, init))
    print(f"obow seed {SEED}: linear trained {got:.4f} init {base:.4f}; "
          f"k-NN trained {got_knn:.4f} init {base_knn:.4f}")
    assert got > base + 0.02
