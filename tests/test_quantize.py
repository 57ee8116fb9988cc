"""bow_jax.bow.quantize against numpy written from the BoWNet / OBoW formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.bow import quantize as q
from bow_jax.lib import ops


def _rng(seed=0):
    return np.random.default_rng(seed)


def _relu_normal(rng, shape):
    return np.maximum(rng.standard_normal(shape), 0).astype(np.float32)


def np_sq_dist(f, v):
    """Brute force sum_c (f_c - v_c)^2 for every location and word."""
    diff = f.astype(np.float64)[..., None, :] - v.astype(np.float64)
    return np.sum(diff * diff, axis=-1)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_normalize_matches_torch_semantics():
    x = np.array([[3.0, -4.0], [0.0, 0.0], [1e-14, 0.0]], np.float32)
    l2 = np.asarray(ops.l2_normalize(jnp.asarray(x)))
    l1 = np.asarray(q.l1_normalize(jnp.asarray(x)))
    np.testing.assert_allclose(l2[0], [0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(l1[0], [3 / 7, -4 / 7], rtol=1e-6)
    np.testing.assert_array_equal(l2[1], [0.0, 0.0])
    # Below eps the norm is replaced by eps: x / 1e-12, not x / ||x||.
    np.testing.assert_allclose(l2[2], [1e-14 / 1e-12, 0.0], rtol=1e-5)
    np.testing.assert_allclose(l1[2], [1e-14 / 1e-12, 0.0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ops.l2_normalize(jnp.asarray(x), axis=0))[:, 0],
                               x[:, 0] / np.linalg.norm(x[:, 0]), rtol=1e-6)


def test_l2_normalize_has_a_finite_gradient_at_zero():
    grad = jax.grad(lambda v: jnp.sum(ops.l2_normalize(v)))(jnp.zeros((2, 3)))
    assert np.isfinite(np.asarray(grad)).all()


def test_skip_border():
    f = _rng().standard_normal((2, 7, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(q.skip_border(jnp.asarray(f)), f[:, 1:6, 1:5])
    np.testing.assert_array_equal(q.skip_border(jnp.asarray(f), 2), f[:, 2:5, 2:4])
    np.testing.assert_array_equal(q.skip_border(jnp.asarray(f), 0), f)
    with pytest.raises(ValueError, match="2x2"):
        q.skip_border(jnp.zeros((1, 2, 2, 1)))


def test_squared_distances_vs_brute_force():
    rng = _rng(1)
    f = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    v = rng.standard_normal((7, 5)).astype(np.float32)
    d = np.asarray(q.squared_distances(jnp.asarray(f), jnp.asarray(v)))
    assert d.shape == (2, 3, 4, 7) and d.dtype == np.float32
    np.testing.assert_allclose(d, np_sq_dist(f, v), rtol=1e-5, atol=1e-5)
    # Flat feature lists too.
    d2 = np.asarray(q.squared_distances(jnp.asarray(f.reshape(-1, 5)), jnp.asarray(v)))
    np.testing.assert_allclose(d2, np_sq_dist(f.reshape(-1, 5), v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="vocab"):
        q.squared_distances(jnp.asarray(f), jnp.zeros((7, 4)))


def test_hard_assign_is_one_hot_of_nearest():
    rng = _rng(2)
    f = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    v = rng.standard_normal((6, 4)).astype(np.float32)
    codes = np.asarray(q.hard_assign(q.squared_distances(jnp.asarray(f), jnp.asarray(v))))
    expected = np.eye(6, dtype=np.float32)[np.argmin(np_sq_dist(f, v), axis=-1)]
    np.testing.assert_array_equal(codes, expected)


def test_soft_assign_vs_numpy_softmax():
    rng = _rng(3)
    dist = rng.uniform(0, 3, (2, 3, 3, 8)).astype(np.float32)
    codes = np.asarray(q.soft_assign(jnp.asarray(dist), 10.0, jnp.float32(0.7)))
    np.testing.assert_allclose(codes, np_softmax(-(10.0 / 0.7) * dist.astype(np.float64)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(codes.sum(-1), 1.0, rtol=1e-6)


def _np_hard_codes(rng, b=3, h=4, w=5, k=6):
    idx = rng.integers(0, k, (b, h, w))
    return idx, np.eye(k, dtype=np.float32)[idx]


def test_histogram_and_binary_bows_from_word_indices():
    rng = _rng(4)
    idx, codes = _np_hard_codes(rng)
    k = codes.shape[-1]
    hist = np.asarray(q.bow_histogram(jnp.asarray(codes)))
    binary = np.asarray(q.bow_binary(jnp.asarray(codes)))
    for i in range(idx.shape[0]):
        counts = np.bincount(idx[i].ravel(), minlength=k)            # eq. 3
        np.testing.assert_allclose(hist[i], counts / counts.sum(), rtol=1e-6)
        present = np.isin(np.arange(k), idx[i]).astype(np.float64)   # eq. 4
        np.testing.assert_allclose(binary[i], present / present.sum(), rtol=1e-6)


def test_max_and_avg_bows_of_soft_codes():
    rng = _rng(5)
    codes = np_softmax(rng.standard_normal((2, 3, 4, 6)))
    mx = codes.reshape(2, -1, 6).max(1)
    avg = codes.reshape(2, -1, 6).mean(1)
    np.testing.assert_allclose(q.bow_max(jnp.asarray(codes, jnp.float32)),
                               mx / mx.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(q.bow_avg(jnp.asarray(codes, jnp.float32)),
                               avg / avg.sum(1, keepdims=True), rtol=1e-5)
    for mode, ref in [("max", mx), ("avg", avg), ("binary", mx), ("histogram", avg)]:
        np.testing.assert_allclose(q.reduce_codes(jnp.asarray(codes, jnp.float32), mode),
                                   ref / ref.sum(1, keepdims=True), rtol=1e-5)
    with pytest.raises(ValueError, match="'median'"):
        q.reduce_codes(jnp.asarray(codes), "median")


@pytest.mark.parametrize("h,w,rows,cols", [
    (4, 6, [(0, 2), (2, 4)], [(0, 3), (3, 6)]),    # even: exact halves
    (5, 3, [(0, 3), (2, 5)], [(0, 2), (1, 3)]),    # odd: both halves take the middle line
])
def test_spatial_pyramid_vs_slicing(h, w, rows, cols):
    rng = _rng(6)
    codes = np_softmax(rng.standard_normal((2, h, w, 5))).astype(np.float32)

    def np_bow(c, mode):
        pooled = c.max(axis=(1, 2)) if mode == "max" else c.mean(axis=(1, 2))
        return pooled / pooled.sum(-1, keepdims=True)

    for mode in ("max", "histogram"):
        out = np.asarray(q.spatial_pyramid(jnp.asarray(codes), mode))
        expected = [np_bow(codes, mode)]
        for r0, r1 in rows:
            for c0, c1 in cols:
                expected.append(np_bow(codes[:, r0:r1, c0:c1], mode))
        assert out.shape == (2, 5, 5)
        np.testing.assert_allclose(out, np.stack(expected, 1), rtol=1e-5, atol=1e-7)


def np_perplexity(bow):
    p = bow / np.maximum(np.abs(bow).sum(1, keepdims=True), 1e-12)
    per_image = np.exp(-np.sum(p * np.log(p + 1e-5), 1)).mean()
    s = bow.sum(0)
    s = s / s.sum()
    return per_image, np.exp(-np.sum(s * np.log(s + 1e-5)))


def np_obow_level_targets(fmap, vocab, m, inv_delta, momentum=0.99):
    """OBoW BoWExtractor.forward in numpy, step by step (float64)."""
    f = fmap[:, 1:-1, 1:-1].astype(np.float64)
    dist = np_sq_dist(f, vocab)
    mu = dist.min(-1).mean()
    m_new = momentum * m + (1 - momentum) * mu
    codes = np_softmax(-(inv_delta / m_new) * dist)
    bow = codes.reshape(codes.shape[0], -1, codes.shape[-1]).max(1)
    return bow / bow.sum(1, keepdims=True), m_new, mu


def test_obow_level_targets_order_vs_numpy():
    rng = _rng(7)
    fmap = _relu_normal(rng, (3, 6, 5, 8))
    vocab = _relu_normal(rng, (16, 8))
    m = 0.5
    targets = jax.jit(functools.partial(q.obow_level_targets, inv_delta=10.0, momentum=0.9))
    bow, m_new, aux = targets(jnp.asarray(fmap), jnp.asarray(vocab), jnp.float32(m))
    ref_bow, ref_m, ref_mu = np_obow_level_targets(fmap, vocab, m, 10.0, momentum=0.9)
    np.testing.assert_allclose(float(aux["min_dist_mean"]), ref_mu, rtol=1e-5)
    np.testing.assert_allclose(float(m_new), ref_m, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bow), ref_bow, rtol=1e-5, atol=1e-6)
    pi, pb = np_perplexity(ref_bow)
    np.testing.assert_allclose(float(aux["perplexity_image"]), pi, rtol=1e-4)
    np.testing.assert_allclose(float(aux["perplexity_batch"]), pb, rtol=1e-4)
    # The temperature must come from the updated statistic: with the old m the BoW differs.
    stale = np_softmax(-(10.0 / m) * np_sq_dist(fmap[:, 1:-1, 1:-1], vocab))
    stale = stale.reshape(3, -1, 16).max(1)
    assert np.abs(stale / stale.sum(1, keepdims=True) - ref_bow).max() > 1e-3


def test_obow_level_targets_hard_avg_and_constant():
    rng = _rng(8)
    fmap = jnp.asarray(_relu_normal(rng, (2, 5, 5, 4)))
    vocab = jnp.asarray(_relu_normal(rng, (8, 4)))
    hard_avg = jax.jit(functools.partial(q.obow_level_targets, inv_delta=None, pool="avg"))
    bow, _, _ = hard_avg(fmap, vocab, jnp.float32(0.5))
    idx = np.argmin(np_sq_dist(np.asarray(fmap)[:, 1:-1, 1:-1], np.asarray(vocab)), -1)
    for i in range(2):
        np.testing.assert_allclose(bow[i], np.bincount(idx[i].ravel(), minlength=8) / 9, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda f: jnp.sum(q.obow_level_targets(f, vocab, jnp.float32(0.5),
                                                           inv_delta=10.0)[0] ** 2)))(fmap)
    np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError, match="pool"):
        q.obow_level_targets(fmap, vocab, jnp.float32(0.5), inv_delta=10.0, pool="sum")


def test_obow_first_targets_nearly_one_hot():
    # Official OBoW code: with m starting at 0.5 the first targets are close to one-hot.
    rng = _rng(9)
    fmap = jnp.asarray(_relu_normal(rng, (4, 7, 7, 32)))
    vocab = jnp.asarray(_relu_normal(rng, (64, 32)))

    @jax.jit
    def mean_max_code(fmap, vocab):
        dist = q.squared_distances(q.skip_border(fmap), vocab)
        _, m_new, _ = q.obow_level_targets(fmap, vocab, jnp.float32(0.5), inv_delta=10.0)
        return jnp.mean(jnp.max(q.soft_assign(dist, 10.0, m_new), -1))

    assert float(mean_max_code(fmap, vocab)) > 0.9


def test_bownet_targets_vs_numpy():
    rng = _rng(10)
    fmap = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    vocab = rng.standard_normal((5, 4)).astype(np.float32)
    idx = np.argmin(np_sq_dist(fmap[:, 1:-1, 1:-1], vocab), -1)     # [2, 4, 4]
    targets = jax.jit(q.bownet_targets, static_argnames=("mode", "pyramid", "border"))
    hist = np.asarray(targets(jnp.asarray(fmap), jnp.asarray(vocab), "histogram"))
    binary = np.asarray(targets(jnp.asarray(fmap), jnp.asarray(vocab), "binary"))
    pyr = np.asarray(targets(jnp.asarray(fmap), jnp.asarray(vocab), "histogram", pyramid=True))
    for i in range(2):
        counts = np.bincount(idx[i].ravel(), minlength=5)
        np.testing.assert_allclose(hist[i], counts / 16, rtol=1e-6)
        present = np.isin(np.arange(5), idx[i])
        np.testing.assert_allclose(binary[i], present / present.sum(), rtol=1e-6)
        np.testing.assert_allclose(pyr[i, 0], hist[i], rtol=1e-6)
        cells = [idx[i, :2, :2], idx[i, :2, 2:], idx[i, 2:, :2], idx[i, 2:, 2:]]
        for j, cell in enumerate(cells):
            np.testing.assert_allclose(pyr[i, 1 + j], np.bincount(cell.ravel(), minlength=5) / 4,
                                       rtol=1e-6)
    no_border = np.asarray(targets(jnp.asarray(fmap), jnp.asarray(vocab), border=0))
    idx_all = np.argmin(np_sq_dist(fmap, vocab), -1)
    np.testing.assert_allclose(no_border[0], np.bincount(idx_all[0].ravel(), minlength=5) / 36,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="'max'"):
        q.bownet_targets(jnp.asarray(fmap), jnp.asarray(vocab), "max")
