"""Heads against numpy written from the papers' formulas (BoWNet eq. 5, OBoW's weight generator)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.models import (CosineBoWHead, DynamicBoWHead, LinearClassifier, RotationHead,
                            l2_normalize)


def np_l2_normalize(x, axis=-1):
    """torch.nn.functional.normalize: x / max(||x||, 1e-12)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_batch_norm(h, eps=1e-5):
    """Training-mode BatchNorm1d over rows, biased variance, scale 1 / bias 0 (their init)."""
    return (h - h.mean(0)) / np.sqrt(h.var(0) + eps)


def test_l2_normalize_matches_torch_semantics_and_has_finite_grad_at_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(jnp.asarray(x)), np_l2_normalize(x), rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(grad))


def test_rotation_head_init_and_pooling():
    head = RotationHead()
    fmap = jax.random.normal(jax.random.key(0), (3, 4, 4, 48))
    params = head.init(jax.random.key(1), fmap)["params"]
    kernel, bias = np.asarray(params["fc"]["kernel"]), np.asarray(params["fc"]["bias"])
    assert kernel.shape == (48, 4)
    assert np.all(np.abs(kernel) <= 1 / math.sqrt(48)) and np.all(np.abs(bias) <= 1 / math.sqrt(48))
    logits = head.apply({"params": params}, fmap)
    pooled = np.asarray(fmap, np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(logits, pooled @ kernel + bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        head.apply({"params": params}, jnp.zeros((2, 3, 48)))


def test_linear_classifier_init_and_batch_norm():
    x = jax.random.normal(jax.random.key(2), (16, 64)) * 3.0 + 1.0
    head = LinearClassifier(num_classes=500, batch_norm=True)
    variables = head.init(jax.random.key(3), x)
    assert set(variables["params"]) == {"fc"}  # the BatchNorm has no affine parameters
    kernel = np.asarray(variables["params"]["fc"]["kernel"])
    assert abs(kernel.std() / 0.01 - 1) < 0.05 and abs(kernel.mean()) < 1e-3
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], 0.0)

    logits, updates = head.apply(variables, x, train=True, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(logits, np_batch_norm(xn) @ kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"], 0.1 * xn.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["bn"]["var"], 0.9 + 0.1 * xn.var(0, ddof=1),
                               rtol=1e-4, atol=1e-6)  # unbiased, as torch's BatchNorm1d
    # Eval mode uses the (initial) running statistics: mean 0, var 1.
    np.testing.assert_allclose(head.apply(variables, x, train=False),
                               xn / np.sqrt(1 + 1e-5) @ kernel, rtol=1e-4, atol=1e-5)
    plain = LinearClassifier(num_classes=5)
    v = plain.init(jax.random.key(4), x)
    np.testing.assert_allclose(plain.apply(v, x), xn @ np.asarray(v["params"]["fc"]["kernel"]),
                               rtol=1e-4, atol=1e-5)


def test_cosine_bow_head_is_eq5():
    head = CosineBoWHead(num_words=7, gamma_init=2.5)
    x = jax.random.normal(jax.random.key(5), (4, 12))
    params = head.init(jax.random.key(6), x)["params"]
    assert float(params["gamma"]) == 2.5 and params["kernel"].shape == (12, 7)
    w = np.asarray(params["kernel"], np.float64)
    expected = 2.5 * np.asarray(x, np.float64) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(head.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)

    # Word magnitudes carry no information: rescaling one word's weights changes nothing, while
    # gamma scales every logit (its gradient is Phi^T w_bar summed with the upstream gradient).
    scaled = {"gamma": params["gamma"], "kernel": params["kernel"].at[:, 3].multiply(17.0)}
    np.testing.assert_allclose(head.apply({"params": scaled}, x), expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda p: jnp.sum(head.apply({"params": p}, x)))(params)
    np.testing.assert_allclose(grad["gamma"], expected.sum() / 2.5, rtol=1e-4)
    # The feature itself is not normalised: doubling it doubles the logits.
    np.testing.assert_allclose(head.apply({"params": params}, 2 * x), 2 * expected, rtol=1e-5, atol=1e-6)


def np_generator(params, vocabulary, running=None, eps=1e-5):
    """OBoW's G: L2norm -> Linear(no bias) -> BN over the K words -> ReLU -> Linear(+b) -> L2norm."""
    v = np_l2_normalize(vocabulary)
    h = v @ np.asarray(params["fc1"]["kernel"], np.float64)
    scale = np.asarray(params["bn"]["scale"], np.float64)
    shift = np.asarray(params["bn"]["bias"], np.float64)
    if running is None:  # training: batch statistics over the K rows, biased variance
        mean, var = h.mean(0), h.var(0)
    else:
        mean, var = np.asarray(running["mean"], np.float64), np.asarray(running["var"], np.float64)
    h = np.maximum((h - mean) / np.sqrt(var + eps) * scale + shift, 0.0)
    w = h @ np.asarray(params["fc2"]["kernel"], np.float64) + np.asarray(params["fc2"]["bias"], np.float64)
    return np_l2_normalize(w), (v @ np.asarray(params["fc1"]["kernel"], np.float64))


def _perturb(tree, key, scale=0.3):
    """Non-trivial BN scale/bias so the hand computation exercises them."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [l + scale * jax.random.normal(k, l.shape)
                                        for l, k in zip(leaves, keys)])


def test_dynamic_bow_head_matches_numpy():
    c_out, kappa = 16, 5.0
    head = DynamicBoWHead(num_channels_out=c_out, kappa=kappa)
    vocabs = (jnp.maximum(jax.random.normal(jax.random.key(7), (24, 8)), 0.0),
              jax.random.normal(jax.random.key(8), (32, c_out)))
    f = jax.random.normal(jax.random.key(9), (6, c_out))
    variables = head.init(jax.random.key(10), f, vocabs, train=False)
    params = dict(variables["params"])
    params = {name: dict(p, bn=_perturb(p["bn"], jax.random.key(11 + l)))
              for l, (name, p) in enumerate(sorted(params.items()))}
    assert set(params) == {"generator_0", "generator_1"}
    assert params["generator_0"]["fc1"]["kernel"].shape == (8, 2 * c_out)  # hidden = 2 C
    assert "bias" not in params["generator_0"]["fc1"]
    assert params["generator_1"]["fc2"]["kernel"].shape == (2 * c_out, c_out)
    variables = {"params": params, "batch_stats": variables["batch_stats"]}

    logits, updates = head.apply(variables, f, vocabs, train=True, mutable=["batch_stats"])
    assert len(logits) == 2
    fn = np.asarray(f, np.float64)
    for l, vocab in enumerate(vocabs):
        w, pre_bn = np_generator(params[f"generator_{l}"], np.asarray(vocab))
        np.testing.assert_allclose(logits[l], kappa * fn @ w.T, rtol=1e-4, atol=1e-4)
        stats = updates["batch_stats"][f"generator_{l}"]["bn"]
        np.testing.assert_allclose(stats["mean"], 0.1 * pre_bn.mean(0), rtol=1e-4, atol=1e-6)
        # PyTorch's BatchNorm1d keeps the unbiased variance over the K words (ddof=1).
        np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * pre_bn.var(0, ddof=1), rtol=1e-4,
                                   atol=1e-6)

    # Eval mode: running statistics; generate_weights gives unit rows; export fc = kappa * W_last.
    trained = {"params": params, "batch_stats": updates["batch_stats"]}
    weights = head.apply(trained, vocabs, train=False, method=DynamicBoWHead.generate_weights)
    for l, vocab in enumerate(vocabs):
        running = updates["batch_stats"][f"generator_{l}"]["bn"]
        w, _ = np_generator(params[f"generator_{l}"], np.asarray(vocab), running)
        np.testing.assert_allclose(weights[l], w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(weights[l], axis=1), 1.0, rtol=1e-5)
    fc_w, fc_b = head.apply(trained, vocabs, method=DynamicBoWHead.torchvision_fc)
    np.testing.assert_allclose(fc_w, kappa * np.asarray(weights[1]), rtol=1e-6)
    assert fc_w.shape == (32, c_out) and np.all(np.asarray(fc_b) == 0)


def test_dynamic_bow_head_crop_groups_and_kappa_options():
    head = DynamicBoWHead(num_channels_out=8, kappa=3.0, hidden_dim=12)
    vocabs = (jax.random.normal(jax.random.key(12), (10, 8)),)
    crops = jax.random.normal(jax.random.key(13), (4, 8))
    patches = jax.random.normal(jax.random.key(14), (10, 8))
    variables = head.init(jax.random.key(15), crops, vocabs, train=False)
    assert "kappa" not in variables["params"]  # fixed, not trained
    assert variables["params"]["generator_0"]["fc1"]["kernel"].shape == (8, 12)
    (g1, g2), upd = head.apply(variables, [crops, patches], vocabs, train=True, mutable=["batch_stats"])
    single, upd1 = head.apply(variables, crops, vocabs, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(g1[0], single[0], rtol=1e-6)
    assert g2[0].shape == (10, 10)
    # One generator pass per call: groups do not update the generator's BN twice.
    np.testing.assert_allclose(upd["batch_stats"]["generator_0"]["bn"]["mean"],
                               upd1["batch_stats"]["generator_0"]["bn"]["mean"], rtol=1e-6)

    learned = DynamicBoWHead(num_channels_out=8, kappa=3.0, learn_kappa=True)
    v = learned.init(jax.random.key(16), crops, vocabs + vocabs, train=False)
    np.testing.assert_array_equal(v["params"]["kappa"], [3.0, 3.0])
    grad = jax.grad(lambda p: jnp.sum(learned.apply({**v, "params": p}, crops, vocabs + vocabs,
                                                    train=False)[1]))(v["params"])
    assert float(grad["kappa"][0]) == 0.0 and float(grad["kappa"][1]) != 0.0

    with pytest.raises(ValueError, match="vocabularies"):
        head.apply(variables, crops, vocabs[0], train=False)
