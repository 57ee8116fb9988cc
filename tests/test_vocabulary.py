"""bow_jax.bow.vocabulary against numpy ring buffers, pooling, k-means and Sinkhorn; bow_jax.bow.build
(BoWNet's k-means vocabulary and its files) against numpy."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.bow import build, quantize, vocabulary as voc
from bow_jax.lib import sharding


def _relu_normal(rng, shape):
    return np.maximum(rng.standard_normal(shape), 0).astype(np.float32)


def test_init_queue():
    queue = voc.init_queue(jax.random.key(0), 512, 16)
    assert queue.shape == (512, 16) and queue.dtype == jnp.float32
    q = np.asarray(queue)
    assert q.min() == 0.0
    # Half of a standard normal is clipped; the rest has the half-normal mean sqrt(2/pi).
    assert abs((q == 0).mean() - 0.5) < 0.03
    assert abs(q[q > 0].mean() - np.sqrt(2 / np.pi)) < 0.05
    ptr = voc.init_pointer()
    assert ptr.shape == () and ptr.dtype == jnp.int32 and int(ptr) == 0


def test_update_queue_is_a_fifo_ring_buffer():
    k, b, c = 12, 4, 3
    rng = np.random.default_rng(0)
    queue = jnp.asarray(rng.standard_normal((k, c)), jnp.float32)
    ptr = voc.init_pointer()
    ring, write = np.asarray(queue).copy(), 0     # numpy ring buffer, one word at a time
    update = jax.jit(voc.update_queue)
    for step in range(2 * k // b + 1):
        words = rng.standard_normal((b, c)).astype(np.float32)
        for word in words:
            ring[write] = word
            write = (write + 1) % k
        queue, ptr = update(queue, ptr, jnp.asarray(words))
        np.testing.assert_array_equal(np.asarray(queue), ring)
        assert int(ptr) == write == ((step + 1) * b) % k
        if step == k // b - 1:
            assert int(ptr) == 0    # wrapped after K/B steps


def test_queue_divisibility_error_names_config_fields():
    with pytest.raises(ValueError, match=r"config\.obow\.num_words=10.*config\.batch_size=4"):
        voc.check_queue_divisible(10, 4)
    voc.check_queue_divisible(8192, 256)
    with pytest.raises(ValueError, match="config.batch_size"):
        voc.update_queue(jnp.zeros((10, 3)), voc.init_pointer(), jnp.zeros((4, 3)))


def np_local_average(f):
    b, h, w, c = f.shape
    out = np.zeros((b, h - 2, w - 2, c))
    for i in range(h - 2):
        for j in range(w - 2):
            out[:, i, j] = f[:, i:i + 3, j:j + 3].mean(axis=(1, 2))
    return out


def test_sample_words_local_average_at_chosen_location():
    rng = np.random.default_rng(1)
    fmap = rng.standard_normal((16, 7, 8, 5)).astype(np.float32)
    key = jax.random.key(3)
    words = np.asarray(voc.sample_words(key, jnp.asarray(fmap), "local_average"))
    pooled = np_local_average(fmap[:, 1:-1, 1:-1])                 # [16, 3, 4, 5]
    rows, cols = map(np.asarray, voc.sample_locations(key, 16, 3, 4))
    np.testing.assert_allclose(words, pooled[np.arange(16), rows, cols], rtol=1e-5, atol=1e-6)
    assert len(set(zip(rows, cols))) > 1      # independent per image
    assert rows.min() >= 0 and rows.max() < 3 and cols.min() >= 0 and cols.max() < 4


def test_sample_words_local_features_and_global_average():
    rng = np.random.default_rng(2)
    fmap = rng.standard_normal((6, 5, 6, 4)).astype(np.float32)
    key = jax.random.key(4)
    cropped = fmap[:, 1:-1, 1:-1]
    words = np.asarray(voc.sample_words(key, jnp.asarray(fmap), "local_features"))
    rows, cols = map(np.asarray, voc.sample_locations(key, 6, 3, 4))
    np.testing.assert_array_equal(words, cropped[np.arange(6), rows, cols])
    gap = np.asarray(voc.sample_words(key, jnp.asarray(fmap), "global_average"))
    np.testing.assert_allclose(gap, cropped.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'random'"):
        voc.sample_words(key, jnp.asarray(fmap), "random")


def test_sample_words_map_too_small():
    with pytest.raises(ValueError, match=r"layer4.*4x4.*2x2.*at least 5x5"):
        voc.sample_words(jax.random.key(0), jnp.zeros((2, 4, 4, 3)), level="layer4")
    voc.sample_words(jax.random.key(0), jnp.zeros((2, 5, 5, 3)), level="layer4")


# ------------------------------------------------------------------------------------------------
# Online k-means


def np_kmeans_step(centroids, counts, sums, idle, feats, gamma, codes=None):
    """Appendix D eq. 6-7, with assignment by brute-force nearest centroid."""
    d = ((feats[:, None, :] - centroids[None]) ** 2).sum(-1)
    nearest = d.argmin(1)
    k = centroids.shape[0]
    hard = np.eye(k)[nearest]
    w = hard if codes is None else codes
    n = w.sum(0)
    m = w.T @ feats
    counts = gamma * counts + (1 - gamma) * n
    sums = gamma * sums + (1 - gamma) * m
    idle = np.where(np.bincount(nearest, minlength=k) > 0, 0, idle + 1)
    return sums / counts[:, None], counts, sums, idle


def test_online_kmeans_update_vs_numpy():
    rng = np.random.default_rng(3)
    cents = rng.standard_normal((6, 4)).astype(np.float32)
    state = voc.init_online_kmeans(jnp.asarray(cents))
    ref = (cents.astype(np.float64), np.ones(6), cents.astype(np.float64), np.zeros(6, int))
    step = jax.jit(lambda s, f, k: voc.online_kmeans_update(s, f, key=k, momentum=0.9))
    for t in range(3):
        feats = rng.standard_normal((20, 4)).astype(np.float32)
        state = step(state, jnp.asarray(feats), jax.random.key(t))
        ref = np_kmeans_step(*ref, feats.astype(np.float64), 0.9)
        np.testing.assert_allclose(state.centroids, ref[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.ema_counts, ref[1], rtol=1e-5)
        np.testing.assert_allclose(state.ema_sums, ref[2], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(state.steps_since_used, ref[3])
    # Soft (e.g. Sinkhorn) codes drive the statistics when given.
    feats = rng.standard_normal((20, 4)).astype(np.float32)
    codes = rng.dirichlet(np.ones(6), 20).astype(np.float32)
    soft_step = jax.jit(lambda s, f, c: voc.online_kmeans_update(
        s, f, key=jax.random.key(9), momentum=0.9, codes=c))
    new = soft_step(state, jnp.asarray(feats), jnp.asarray(codes))
    expected = np_kmeans_step(*(np.asarray(x, np.float64) for x in state), feats, 0.9, codes)
    np.testing.assert_allclose(new.centroids, expected[0], rtol=1e-4, atol=1e-5)


def test_online_kmeans_reseeds_idle_words():
    rng = np.random.default_rng(4)
    cents = np.array([[0.0, 0.0], [100.0, 100.0]], np.float32)   # word 1 is never nearest
    state = voc.init_online_kmeans(jnp.asarray(cents))
    reseed_after = 3
    step = jax.jit(lambda s, f, k: voc.online_kmeans_update(s, f, key=k, reseed_after=reseed_after))
    for t in range(reseed_after + 1):
        feats = rng.uniform(-1, 1, (8, 2)).astype(np.float32)
        state = step(state, jnp.asarray(feats), jax.random.key(t))
        if t < reseed_after:      # idle for t + 1 <= reseed_after steps: kept (and decaying)
            assert int(state.steps_since_used[1]) == t + 1
            np.testing.assert_allclose(state.centroids[1], [100.0, 100.0], rtol=1e-5)
    # Idle for more than reseed_after steps: replaced by one of the last batch's features.
    new_word = np.asarray(state.centroids[1])
    assert np.any(np.all(np.isclose(feats, new_word, atol=1e-6), axis=1))
    assert int(state.steps_since_used[1]) == 0 and float(state.ema_counts[1]) == 1.0
    np.testing.assert_allclose(state.ema_sums[1], new_word)
    assert int(state.steps_since_used[0]) == 0


# ------------------------------------------------------------------------------------------------
# Sinkhorn


def np_sinkhorn_swav(scores, n_iters, eps):
    """SwAV's distributed_sinkhorn written over a [K, B] matrix (no log domain)."""
    q = np.exp(scores.astype(np.float64) / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_vs_swav_and_marginals():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((32, 8)).astype(np.float32)
    out = np.asarray(voc.sinkhorn(jnp.asarray(scores), n_iters=3, epsilon=0.5))
    np.testing.assert_allclose(out, np_sinkhorn_swav(scores, 3, 0.5), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.sum(0), 32 / 8, rtol=0.1)
    tight = np.asarray(voc.sinkhorn(jnp.asarray(scores), n_iters=50, epsilon=0.5))
    np.testing.assert_allclose(tight.sum(0), 4.0, rtol=1e-4)
    # Small epsilon stays finite (log domain), where a plain exp(scores / eps) overflows.
    assert np.all(np.isfinite(np.asarray(voc.sinkhorn(jnp.asarray(scores) * 100, epsilon=0.01))))


# ------------------------------------------------------------------------------------------------
# 1 device vs 8 devices


def _obow_level_step(fmap, queue, ptr, m, key):
    bow, m_new, aux = quantize.obow_level_targets(fmap, queue, m, inv_delta=10.0)
    words = voc.sample_words(key, fmap, "local_average")
    queue, ptr = voc.update_queue(queue, ptr, words)
    return bow, m_new, aux["perplexity_batch"], words, queue, ptr


def test_one_vs_eight_devices():
    assert jax.device_count() == 8, "conftest.py should provide 8 CPU devices"
    rng = np.random.default_rng(6)
    fmap = _relu_normal(rng, (16, 6, 6, 8))
    queue = voc.init_queue(jax.random.key(1), 32, 8)
    args = (jnp.asarray(fmap), queue, voc.init_pointer(), jnp.float32(0.5), jax.random.key(2))

    single = jax.jit(_obow_level_step)(*args)
    mesh = sharding.make_mesh()
    sharded_args = (jax.device_put(args[0], sharding.batch_sharded(mesh)),
                    *sharding.replicate(args[1:], mesh))
    assert len(sharded_args[0].sharding.device_set) == 8
    multi = jax.jit(_obow_level_step)(*sharded_args)
    for a, b in zip(single, multi):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # All 16 words of the global batch landed in rows [0, 16) on every device.
    np.testing.assert_allclose(np.asarray(multi[4])[:16], np.asarray(multi[3]), rtol=1e-6)
    assert int(multi[5]) == 16


# ------------------------------------------------------------------------------------------------
# bow.build: BoWNet's vocabulary


def test_locations_per_image():
    assert build.locations_per_image(0, 10, 16) == 16  # no cap: every location
    assert build.locations_per_image(50, 10, 16) == 5  # floor(50 / 10)
    assert build.locations_per_image(5, 10, 16) == 1  # at least one per image
    assert build.locations_per_image(10_000, 10, 16) == 16  # at most all of them


def test_dense_vectors_and_kept_locations_vs_numpy():
    rng = np.random.default_rng(7)
    fmap = rng.standard_normal((3, 5, 6, 4)).astype(np.float32)
    vectors = np.asarray(build.dense_vectors(jnp.asarray(fmap), border=1))
    np.testing.assert_array_equal(vectors, fmap[:, 1:-1, 1:-1].reshape(3, 12, 4))
    kept = np.asarray(jax.jit(build.keep_locations, static_argnums=2)(
        jax.random.key(0), jnp.asarray(vectors), 5))
    assert kept.shape == (3, 5, 4)
    for image, rows in zip(vectors, kept):  # distinct locations of the same image
        index = [int(np.flatnonzero((image == row).all(1))[0]) for row in rows]
        assert len(set(index)) == 5
    again = build.keep_locations(jax.random.key(0), jnp.asarray(vectors), 5)
    np.testing.assert_array_equal(kept, np.asarray(again))
    np.testing.assert_array_equal(
        np.asarray(build.keep_locations(jax.random.key(0), jnp.asarray(vectors), 12)), vectors)
    # Uniform: over many keys every location of an image is kept about 5/12 of the time.
    picks = np.zeros(12)
    for seed in range(120):
        rows = np.asarray(build.keep_locations(jax.random.key(seed), jnp.asarray(vectors), 5))[0]
        picks[[int(np.flatnonzero((vectors[0] == r).all(1))[0]) for r in rows]] += 1
    assert picks.min() > 25 and picks.max() < 75  # expected 50 each


def test_build_vocabulary_is_the_kmeans_of_the_vectors():
    """Three tight blobs and an N that the padding must round up: the words are the blob means,
    the metadata counts only real rows, and the inertia is numpy's."""
    rng = np.random.default_rng(8)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]], np.float32)
    labels = np.arange(301) % 3
    x = (centres[labels] + 0.1 * rng.standard_normal((301, 3))).astype(np.float32)
    centroids, meta = build.build_vocabulary(jax.random.key(0), x, 3, n_iter=50, tol=0.0)
    assert centroids.shape == (3, 3) and centroids.dtype == np.float32
    order = np.argsort(centroids[:, 0] + 2 * centroids[:, 1])
    want = np.stack([x[labels == k].mean(0) for k in range(3)])
    np.testing.assert_allclose(centroids[order], want, atol=1e-4)
    d = ((x[:, None].astype(np.float64) - centroids[None]) ** 2).sum(-1).min(1)
    assert meta["num_vectors"] == 301 and meta["num_words"] == 3
    assert meta["inertia"] == pytest.approx(d.sum(), rel=1e-4)
    assert meta["mean_sq_distance"] == pytest.approx(d.mean(), rel=1e-4)
    with pytest.raises(ValueError, match=r"config.bownet.num_words=400 is more than the 301"):
        build.build_vocabulary(jax.random.key(0), x, 400)


def test_vocabulary_file_round_trip_and_checks(tmp_path):
    path = str(tmp_path / "v" / "vocabulary.npz")
    centroids = np.arange(12, dtype=np.float64).reshape(4, 3)
    meta = {"teacher_step": 7, "layer": "conv1", "border": 0, "num_words": 4}
    build.write_vocabulary(path, centroids, meta)
    got, got_meta = build.read_vocabulary(path)
    assert got.dtype == np.float32 and got_meta == meta
    np.testing.assert_array_equal(got, centroids)
    expected = dict(teacher_step=7, layer="conv1", border=0, num_words=4, channels=3, path=path)
    build.check_vocabulary(got_meta, got.shape, **expected)
    for key, value in (("teacher_step", 8), ("layer", "conv2"), ("border", 1)):
        with pytest.raises(ValueError, match=f"built with {key}="):
            build.check_vocabulary(got_meta, got.shape, **{**expected, key: value})
    with pytest.raises(ValueError, match=r"centroids have shape \(4, 3\)"):
        build.check_vocabulary(got_meta, got.shape, **{**expected, "channels": 5})
    with pytest.raises(ValueError, match="config.bownet.vocabulary is empty"):
        build.read_vocabulary("")
    with pytest.raises(FileNotFoundError, match="config.bownet.vocabulary="):
        build.read_vocabulary(str(tmp_path / "missing.npz"))
    np.savez(str(tmp_path / "other.npz"), weights=np.zeros(3), meta=np.array(json.dumps({})))
    with pytest.raises(ValueError, match="not a vocabulary file"):
        build.read_vocabulary(str(tmp_path / "other.npz"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_meta"])
def test_a_damaged_vocabulary_file_is_named_with_what_to_do(tmp_path, damage):
    """A vocabulary file cut short (a full disk, a copy stopped halfway), overwritten, or whose
    metadata is not JSON: one InputError naming the file and saying to rebuild it, not numpy's
    or zipfile's traceback."""
    path = str(tmp_path / "vocabulary.npz")
    build.write_vocabulary(path, np.ones((4, 3)), {"num_words": 4})
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(300)
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(2000))
    else:
        np.savez(path, centroids=np.ones((4, 3)), meta=np.array("{not json"))
    with pytest.raises(ValueError, match=f"vocabulary file={path!r} cannot be read .*damaged. "
                                         "Delete it"):
        build.read_vocabulary(path, "vocabulary file")
