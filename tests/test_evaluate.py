"""Evaluation protocols on frozen features, each checked against numpy written from the formula."""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.protocols import features, fewshot, knn, linear
from bow_jax.lib import sharding
from bow_jax.models.norm import BatchNorm


def _np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _blobs(rng, n, num_classes, dim, spread=12.0):
    """Gaussian blobs with far-apart centres: linearly separable with a wide margin."""
    centres = rng.normal(size=(num_classes, dim)) * spread
    labels = np.arange(n) % num_classes
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


# ------------------------------------------------------------------------------------- few-shot

def _np_prototypical_scores(support, support_labels, query, n_way, scale=10.0):
    support = _np_normalize(support)
    protos = np.stack([support[support_labels == c].mean(0) for c in range(n_way)])
    return scale * _np_normalize(query) @ _np_normalize(protos).T


def test_prototypical_scores_match_numpy():
    rng = np.random.default_rng(0)
    n_way, n_shot = 4, 3
    support = rng.normal(size=(n_way * n_shot, 10)).astype(np.float32)
    support_labels = rng.permutation(np.repeat(np.arange(n_way), n_shot))
    query = rng.normal(size=(7, 10)).astype(np.float32)
    got = fewshot.prototypical_scores(jnp.asarray(support), jnp.asarray(support_labels),
                                      jnp.asarray(query), n_way)
    want = _np_prototypical_scores(support, support_labels, query, n_way)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sample_episodes_reproducible_disjoint_and_balanced():
    labels = np.repeat(np.arange(7), 12)[np.random.default_rng(1).permutation(84)]
    n_way, n_shot, n_query, n_episodes = 3, 2, 4, 25
    s1, q1, ql1 = fewshot.sample_episodes(labels, n_way, n_shot, n_query, n_episodes, seed=5)
    s2, q2, ql2 = fewshot.sample_episodes(labels, n_way, n_shot, n_query, n_episodes, seed=5)
    s3, _, _ = fewshot.sample_episodes(labels, n_way, n_shot, n_query, n_episodes, seed=6)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(ql1, ql2)
    assert not np.array_equal(s1, s3)
    assert s1.shape == (n_episodes, n_way * n_shot) and q1.shape == (n_episodes, n_way * n_query)
    for e in range(n_episodes):
        assert not set(s1[e]) & set(q1[e])
        assert len(set(s1[e])) == s1.shape[1] and len(set(q1[e])) == q1.shape[1]
        support_classes = labels[s1[e]].reshape(n_way, n_shot)
        query_classes = labels[q1[e]].reshape(n_way, n_query)
        # One class per way, n_shot / n_query samples of it, distinct classes across ways.
        assert (support_classes == support_classes[:, :1]).all()
        assert (query_classes == support_classes[:, :1]).all()
        assert len(set(support_classes[:, 0])) == n_way
        # Episode-local query labels name the way whose class the query belongs to.
        np.testing.assert_array_equal(
            support_classes[ql1[e], 0], labels[q1[e]])


def test_sample_episodes_rejects_small_classes():
    labels = np.repeat(np.arange(5), 4)
    with pytest.raises(ValueError, match="n_shot \\+ n_query"):
        fewshot.sample_episodes(labels, 2, 3, 2, 10, seed=0)
    with pytest.raises(ValueError, match="n_way"):
        fewshot.sample_episodes(labels, 6, 1, 1, 10, seed=0)


def test_fewshot_accuracy_and_ci_match_numpy():
    rng = np.random.default_rng(2)
    num_classes, per_class, dim = 8, 20, 6
    labels = np.repeat(np.arange(num_classes), per_class)
    # Weakly separated classes, so episode accuracies vary and the CI is not zero.
    feats = (rng.normal(size=(num_classes, dim))[labels] * 0.7
             + rng.normal(size=(labels.size, dim))).astype(np.float32)
    cfg = dict(n_way=4, n_shot=3, n_query=5, n_episodes=37, seed=3)
    got = fewshot.fewshot_accuracy(feats, labels, chunk=8, **cfg)

    support_idx, query_idx, query_labels = fewshot.sample_episodes(
        labels, cfg["n_way"], cfg["n_shot"], cfg["n_query"], cfg["n_episodes"], cfg["seed"])
    support_labels = np.repeat(np.arange(cfg["n_way"]), cfg["n_shot"])
    accs = np.array([
        np.mean(_np_prototypical_scores(feats[s], support_labels, feats[q], cfg["n_way"])
                .argmax(-1) == ql)
        for s, q, ql in zip(support_idx, query_idx, query_labels)])
    assert 0.3 < accs.mean() < 0.99 and accs.std() > 0
    np.testing.assert_allclose(got["mean"], accs.mean(), rtol=1e-6)
    np.testing.assert_allclose(got["ci95"], 1.96 * accs.std() / math.sqrt(accs.size), rtol=1e-5)


def test_evaluate_fewshot_per_shot():
    rng = np.random.default_rng(4)
    feats, labels = _blobs(rng, 120, 6, 5)
    out = fewshot.evaluate_fewshot(feats, labels, shots=(1, 3), n_way=3, n_query=4,
                                   n_episodes=10)
    assert set(out) == {1, 3}
    for shot in (1, 3):
        assert out[shot]["mean"] == pytest.approx(1.0) and out[shot]["ci95"] == 0.0
        assert out[shot] == fewshot.fewshot_accuracy(feats, labels, n_way=3, n_shot=shot,
                                                     n_query=4, n_episodes=10, seed=0)


# ---------------------------------------------------------------------------------- linear probe

def test_lr_schedules_match_hand_computed():
    step = dict(lr=0.1, epochs=60, schedule="step", milestones=(10, 20, 30, 40, 50),
                decay_factor=0.3)
    for epoch, want in [(0, 0.1), (9, 0.1), (10, 0.03), (19, 0.03), (20, 0.009), (35, 0.0027),
                        (59, 0.1 * 0.3 ** 5)]:
        assert linear.epoch_learning_rate(epoch, **step) == pytest.approx(want, rel=1e-5)
    for epoch in (0, 1, 25, 50, 99):
        want = 10.0 * 0.5 * (1 + math.cos(math.pi * epoch / 100))
        got = linear.epoch_learning_rate(epoch, lr=10.0, epochs=100, schedule="cosine")
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        linear.epoch_learning_rate(0, lr=0.1, epochs=10, schedule="linear")


# The probe tests share shapes and settings (N=120, D=8, 3 classes, batch 16, wd 1e-3), so the
# compiled epoch is reused across them.
PROBE = dict(batch_size=16, weight_decay=1e-3)


def test_history_lr_follows_schedule():
    x, y = _blobs(np.random.default_rng(5), 120, 3, 8)
    _, history = linear.train_linear_probe(x, y, 3, epochs=4, lr=0.2, schedule="step",
                                           milestones=(1, 3), decay_factor=0.5, **PROBE)
    np.testing.assert_allclose(history["lr"], [0.2, 0.1, 0.1, 0.05], rtol=1e-6)
    assert history["top1"][-1] == 1.0 and history["loss"][-1] < history["loss"][0]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_linear_probe_separates_blobs(batch_norm):
    x, y = _blobs(np.random.default_rng(6), 180, 3, 8)
    out = linear.linear_probe(x[:120], y[:120], x[120:], y[120:], 3, epochs=3, lr=0.05,
                              schedule="cosine", batch_norm=batch_norm, **PROBE)
    assert out == {"top1": 1.0, "train_top1": 1.0}


def test_linear_probe_deterministic_per_seed():
    x, y = _blobs(np.random.default_rng(7), 120, 3, 8, spread=1.0)
    a, ha = linear.train_linear_probe(x, y, 3, epochs=2, lr=0.1, seed=1, **PROBE)
    b, hb = linear.train_linear_probe(x, y, 3, epochs=2, lr=0.1, seed=1, **PROBE)
    c, _ = linear.train_linear_probe(x, y, 3, epochs=2, lr=0.1, seed=2, **PROBE)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert ha == hb
    assert not np.array_equal(a["params"]["fc"]["kernel"], c["params"]["fc"]["kernel"])


def test_full_batch_sgd_matches_pytorch_rule():
    """Full-batch epochs = PyTorch SGD steps: d = ∇CE + wd·W, buf = m·buf + d, W −= lr·buf."""
    rng = np.random.default_rng(8)
    x, y = _blobs(rng, 24, 3, 5, spread=1.0)
    lr, wd, momentum = 0.5, 0.01, 0.9
    trained, _ = linear.train_linear_probe(x, y, 3, epochs=2, batch_size=24, lr=lr,
                                           momentum=momentum, weight_decay=wd, seed=3)
    # The initial head the probe drew from the same seed (init key = first split of the seed).
    init_key = jax.random.split(jax.random.key(3))[0]
    w0 = linear.LinearHead(3).init(init_key, jnp.asarray(x[:1]))["params"]["fc"]
    assert np.std(np.asarray(w0["kernel"])) == pytest.approx(0.01, rel=0.3)
    kernel, bias = np.asarray(w0["kernel"], np.float64), np.asarray(w0["bias"], np.float64)
    np.testing.assert_array_equal(bias, 0.0)
    buf_k, buf_b = 0.0, 0.0
    for _ in range(2):
        logits = x @ kernel + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dlogits = (p - np.eye(3)[y]) / len(y)
        buf_k = momentum * buf_k + x.T @ dlogits + wd * kernel
        buf_b = momentum * buf_b + dlogits.sum(0) + wd * bias
        kernel, bias = kernel - lr * buf_k, bias - lr * buf_b
    np.testing.assert_allclose(trained["params"]["fc"]["kernel"], kernel, atol=1e-5)
    np.testing.assert_allclose(trained["params"]["fc"]["bias"], bias, atol=1e-5)


def test_probe_batch_norm_matches_pytorch_formula():
    """The probe's BatchNorm1d(affine=False) (models.norm.BatchNorm without scale and bias) on a
    masked, padded batch: biased batch variance to normalise, unbiased into the running one."""
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(10, 4)) * 3 + 1).astype(np.float32)
    mask = np.arange(10) < 7          # a padded last batch: 7 real rows
    bn = BatchNorm(use_scale=False, use_bias=False)
    variables = bn.init(jax.random.key(0), x, use_running_average=True)
    y, updates = bn.apply(variables, x, use_running_average=False, mask=mask,
                          mutable=["batch_stats"])
    real = x[:7].astype(np.float64)
    mean, var = real.mean(0), real.var(0)
    np.testing.assert_allclose(np.asarray(y)[:7], (real - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5)
    y_eval = bn.apply({"batch_stats": stats}, x, use_running_average=True)
    np.testing.assert_allclose(
        y_eval, (x - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5), rtol=1e-5,
        atol=1e-5)


def test_evaluate_with_batch_norm_matches_numpy():
    rng = np.random.default_rng(10)
    x, y = _blobs(rng, 120, 3, 8, spread=1.5)
    x = x * 4 + 7   # far from zero mean / unit variance: the BN statistics matter
    variables, _ = linear.train_linear_probe(x, y, 3, epochs=3, lr=0.05, batch_norm=True,
                                             **PROBE)
    stats, fc = variables["batch_stats"]["bn"], variables["params"]["fc"]
    # Running statistics have moved towards the data's.
    assert np.all(np.abs(np.asarray(stats["mean"]) - x.mean(0)) < np.abs(x.mean(0)))
    z = (x - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
    preds = (z @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])).argmax(1)
    assert linear.evaluate_linear_probe(variables, x, y, chunk=7) == pytest.approx(
        np.mean(preds == y))


def test_flip_views_are_used():
    """Centre features carry no class information, flipped ones do: a head that classifies the
    flipped features well can only have learnt from the randomly chosen flip views."""
    rng = np.random.default_rng(11)
    flipped, y = _blobs(rng, 120, 3, 8)
    centre = np.zeros_like(flipped)
    variables, _ = linear.train_linear_probe(centre, y, 3, epochs=4, lr=0.05,
                                             flip_feats=flipped, **PROBE)
    assert linear.evaluate_linear_probe(variables, flipped, y) == 1.0
    with pytest.raises(ValueError, match="flip_feats"):
        linear.train_linear_probe(centre, y, 3, epochs=1, batch_size=16, lr=0.1,
                                  precache_flip=True)


def test_protocols_are_valid_training_configs():
    signature = inspect.signature(linear.train_linear_probe)
    logistic = inspect.signature(linear.logistic_probe)
    for name, cfg in linear.PROTOCOLS.items():
        if cfg.get("solver") == "lbfgs":
            logistic.bind(None, None, None, None, 10, **cfg)
            continue
        signature.bind(None, None, 10, **cfg)   # raises TypeError on an unknown key
        assert cfg["schedule"] in ("step", "cosine"), name
    assert linear.PROTOCOLS["imagenet_r18_obow"]["precache_flip"]
    assert linear.PROTOCOLS["places205"]["batch_norm"]


def test_linear_probe_rejects_bad_labels():
    x = np.zeros((8, 3), np.float32)
    with pytest.raises(ValueError, match="num_classes"):
        linear.train_linear_probe(x, np.full(8, 5), 3, epochs=1, batch_size=4, lr=0.1)


# ------------------------------------------------------------------------------------------ k-NN

def _np_knn(train, train_labels, test, num_classes, k, temperature):
    sims = _np_normalize(test) @ _np_normalize(train).T
    preds = []
    for row in sims:
        top = np.argsort(-row)[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, train_labels[top], np.exp(row[top] / temperature))
        preds.append(votes.argmax())
    return np.array(preds)


def test_knn_matches_numpy_brute_force():
    rng = np.random.default_rng(12)
    num_classes = 5
    train = rng.normal(size=(150, 8)).astype(np.float32)
    train_labels = rng.integers(0, num_classes, 150)
    test = rng.normal(size=(37, 8)).astype(np.float32)
    test_labels = rng.integers(0, num_classes, 37)
    for k, temperature in [(1, 0.07), (7, 0.07), (20, 0.5)]:
        want = _np_knn(train, train_labels, test, num_classes, k, temperature)
        got = knn.knn_predict(jnp.asarray(train), jnp.asarray(train_labels), jnp.asarray(test),
                              num_classes=num_classes, k=k, temperature=temperature, chunk=16)
        np.testing.assert_array_equal(np.asarray(got), want)
        acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=k,
                               temperature=temperature, chunk=16)
        assert acc == pytest.approx(np.mean(want == test_labels))
    with pytest.raises(ValueError, match="k=151"):
        knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=151)


# ---------------------------------------------------------------------------- feature extraction

def _toy_encoder(traces):
    proj = jnp.asarray(np.random.default_rng(13).normal(size=(5 * 4 * 3, 6)), jnp.float32)

    def encode(images):
        traces.append(images.shape)    # runs once per trace, not per call
        x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
        return x @ proj

    return encode


def test_extract_features_matches_direct_encode():
    assert jax.device_count() == 8
    images = np.random.default_rng(14).integers(0, 256, (27, 5, 4, 3), dtype=np.uint8)
    traces = []
    encode = _toy_encoder(traces)
    centre, flipped = features.extract_features(encode, images, batch_size=16,
                                                mesh=sharding.make_mesh(), flip=True)
    # One trace (of each view) for all batches, the padded last one included: one compile.
    assert traces == [(16, 5, 4, 3)] * 2
    assert centre.dtype == np.float32 and centre.shape == (27, 6)
    np.testing.assert_allclose(centre, np.asarray(encode(images)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flipped, np.asarray(encode(images[:, :, ::-1])), rtol=1e-5,
                               atol=1e-5)
    only_centre = features.extract_features(encode, images[:3], batch_size=8)
    np.testing.assert_allclose(only_centre, centre[:3], rtol=1e-5, atol=1e-5)


def test_extract_features_rejects_bad_input():
    encode = _toy_encoder([])
    images = np.zeros((4, 5, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="batch_size=12"):
        features.extract_features(encode, images, batch_size=12)
    with pytest.raises(ValueError, match="uint8"):
        features.extract_features(encode, images.astype(np.float32), batch_size=8)
    with pytest.raises(ValueError, match="N, H, W, 3"):
        features.extract_features(encode, images[..., 0], batch_size=8)


def test_standardized_logistic_probe_matches_scikit_learn():
    """The 'logistic_standardized' protocol is scikit-learn's StandardScaler +
    LogisticRegression(C): same class probabilities on real digits, same accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    x, y = load_digits(return_X_y=True)
    x_tr, y_tr, x_te, y_te = x[:600], y[:600], x[600:900], y[600:900]
    protocol = linear.PROTOCOLS["logistic_standardized"]
    scaler = StandardScaler().fit(x_tr)
    reference = LogisticRegression(C=protocol["C"], max_iter=5000, tol=1e-10).fit(
        scaler.transform(x_tr), y_tr)
    s_tr, s_te = linear.standardize(x_tr, x_te)
    np.testing.assert_allclose(s_te, scaler.transform(x_te), atol=1e-5)
    p = linear.fit_logistic_regression(s_tr, jnp.asarray(y_tr), num_classes=10,
                                       C=protocol["C"], max_iter=protocol["max_iter"],
                                       tol=protocol["tol"])
    probs = jax.nn.softmax(s_te @ p["w"] + p["b"])
    np.testing.assert_allclose(probs, reference.predict_proba(scaler.transform(x_te)), atol=2e-3)
    result = linear.linear_probe(x_tr, y_tr, x_te, y_te, 10, **protocol)
    assert result["top1"] == pytest.approx(reference.score(scaler.transform(x_te), y_te))


def test_runner_scores_the_logistic_protocol():
    """The evaluate task's path (runner.score_features passes the run's seed) reaches the
    'logistic_standardized' probe and gives scikit-learn's accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from bow_jax.config import base_config
    from bow_jax.protocols import cache, runner
    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int32)
    config = base_config("obow")
    config.eval.update(dict(linear_protocol="logistic_standardized", protocols=("linear",)))
    scores = runner.score_features(cache.SplitFeatures(x[:600], y[:600], 10),
                                   cache.SplitFeatures(x[600:900], y[600:900], 10), config)
    scaler = StandardScaler().fit(x[:600])
    reference = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(scaler.transform(x[:600]),
                                                                        y[:600])
    assert scores["linear"]["top1"] == pytest.approx(
        reference.score(scaler.transform(x[600:900]), y[600:900]))
