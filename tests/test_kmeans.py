"""k-means (bow_jax.bow.kmeans) against numpy brute force and scikit-learn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import make_blobs

from bow_jax.bow import kmeans as km
from bow_jax.lib.sharding import batch_sharded, make_mesh


def brute_force(x, centroids):
    """Squared distances [N, k] in float64, straight from the definition."""
    diff = np.asarray(x, np.float64)[:, None, :] - np.asarray(centroids, np.float64)[None]
    return np.sum(diff * diff, axis=-1)


def inertia_of(x, centroids):
    return brute_force(x, centroids).min(1).sum()


FAR = 1e3  # padding rows sit here: any use of them would move centroids and inertia a lot


def pad_far(x, multiple):
    """x padded with far-away rows of weight 0 (what `pad_rows` gives, made conspicuous)."""
    padded, weights = km.pad_rows(x, multiple)
    padded[x.shape[0]:] = FAR
    return jnp.asarray(padded), jnp.asarray(weights)


# One shape per code path below, so the whole file compiles each path once or twice.
@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(n_samples=3000, n_features=16, centers=32, cluster_std=1.5, random_state=0)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def anisotropic():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16))).astype(np.float32)


@pytest.mark.parametrize("k", [37, 300])  # one-stage and two-stage (padded to 384) argmin
def test_assign_matches_brute_force(k):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1003, 8)).astype(np.float32)  # 1003 rows: not a multiple of the chunk
    centroids = rng.normal(size=(k, 8)).astype(np.float32)
    labels, sq_dist = km.assign(jnp.asarray(x), jnp.asarray(centroids), chunk_size=64)
    ref = brute_force(x, centroids)
    labels = np.asarray(labels)
    assert labels.shape == (1003,) and labels.dtype == np.int32
    best = ref.min(1)
    # Same argmin except near-ties (float32 rounding may swap two centroids closer than 1e-4).
    mismatch = labels != ref.argmin(1)
    assert np.all(ref[np.arange(1003), labels] - best < 1e-4 * (1 + best))
    assert mismatch.mean() < 0.01
    np.testing.assert_allclose(np.asarray(sq_dist), best, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_real", [1024, 1000])  # 1000: 24 rows of padding with weight 0
def test_lloyd_matches_sklearn_from_same_seeds(anisotropic, n_real):
    # Same seeds, same iteration count: Lloyd is deterministic, so both must land on the same point.
    x = anisotropic[:n_real]
    seeds = x[::40][:24]
    padded, weights = pad_far(x, 1024)
    ours = km.lloyd(padded, jnp.asarray(seeds), n_iter=5, tol=0.0, chunk_size=128, weights=weights)
    ref = KMeans(24, init=seeds, n_init=1, max_iter=5, tol=0.0, algorithm="lloyd").fit(x)
    assert int(ours.n_iter) == ref.n_iter_ == 5
    np.testing.assert_allclose(np.asarray(ours.centroids), ref.cluster_centers_, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(ours.labels)[:n_real], ref.labels_)
    np.testing.assert_allclose(float(ours.inertia), ref.inertia_, rtol=1e-5)


@pytest.mark.parametrize("data", ["blobs", "anisotropic"])
def test_kmeans_inertia_close_to_sklearn(data, request):
    # Either library lands in a local minimum (two blobs merged) in ~1 fit in 4 even with
    # n_init=3, so compare medians over 5 seeds rather than one lucky or unlucky fit.
    x = request.getfixturevalue(data)
    padded, weights = pad_far(x, 512)
    ours, theirs = [], []
    for seed in range(5):
        res = km.kmeans(jax.random.key(seed), padded, 32, n_iter=50, n_init=3, chunk_size=512,
                        weights=weights)
        np.testing.assert_allclose(float(res.inertia), inertia_of(x, res.centroids), rtol=1e-4)
        assert 1 <= int(res.n_iter) <= 50
        ours.append(float(res.inertia))
        ref = KMeans(32, init="k-means++", n_init=3, max_iter=50, random_state=seed).fit(x)
        theirs.append(ref.inertia_)
    assert np.median(ours) <= 1.01 * np.median(theirs)


def test_minibatch_inertia_close_to_sklearn(anisotropic):
    x = anisotropic
    padded, weights = pad_far(x, 512)
    # Same budget: 10 passes of 3000 rows in batches of 256 = 117 steps, no early stopping.
    ours = km.minibatch_kmeans(jax.random.key(0), padded, 32, batch_size=256, n_steps=117,
                               chunk_size=512, weights=weights)
    ref = MiniBatchKMeans(32, batch_size=256, n_init=1, max_iter=10, max_no_improvement=None,
                          tol=0.0, random_state=0).fit(x)
    np.testing.assert_allclose(float(ours.inertia), inertia_of(x, ours.centroids), rtol=1e-4)
    assert float(ours.inertia) <= 1.03 * ref.inertia_
    assert int(ours.n_iter) == 117


def test_deterministic_for_a_key(blobs):
    padded, weights = pad_far(blobs, 512)
    runs = [km.kmeans(jax.random.key(seed), padded, 32, n_iter=5, chunk_size=512, weights=weights)
            for seed in (3, 3, 4)]
    a, b, c = jax.device_get(runs)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.centroids, c.centroids)


@pytest.mark.parametrize("method", ["lloyd", "minibatch"])
def test_one_device_and_eight_devices_agree(blobs, method):
    assert jax.device_count() == 8, "conftest should provide 8 CPU devices"
    padded, weights = pad_far(blobs, 512)  # 3072 rows: 384 per device
    results = []
    for mesh in (make_mesh(jax.devices()[:1]), make_mesh()):
        xs, ws = jax.device_put((padded, weights), batch_sharded(mesh))
        res = km.kmeans(jax.random.key(0), xs, 32, n_iter=5, method=method, chunk_size=1536,
                        batch_size=256, n_steps=20, weights=ws)
        assert res.centroids.sharding.is_fully_replicated
        results.append(jax.device_get(res))
    one, eight = results
    np.testing.assert_array_equal(one.labels, eight.labels)
    np.testing.assert_allclose(one.centroids, eight.centroids, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one.inertia, eight.inertia, rtol=1e-5)
    np.testing.assert_allclose(one.inertia, inertia_of(blobs, one.centroids), rtol=1e-4)


def test_seeding_skips_zero_weight_rows(anisotropic):
    padded, weights = pad_far(anisotropic[:1000], 1024)
    seeds = km.kmeans_plus_plus(jax.random.key(0), padded, 24, weights=weights)
    assert np.abs(np.asarray(seeds)).max() < FAR / 10


def test_empty_clusters_are_reseeded_with_farthest_rows(anisotropic):
    x = anisotropic[:1024]
    distinct = x[::50][:21]
    seeds = np.concatenate([distinct, np.repeat(distinct[:1], 3, axis=0)])  # 3 copies: empty
    res = km.lloyd(jnp.asarray(x), jnp.asarray(seeds), n_iter=1, tol=0.0, chunk_size=128)
    d_old = brute_force(x, seeds).min(1)
    farthest = x[np.argsort(-d_old)[:3]]
    # Clusters 21..23 (empty: ties go to cluster 0) now sit on the three farthest rows.
    np.testing.assert_allclose(np.sort(np.asarray(res.centroids)[21:], axis=0),
                               np.sort(farthest, axis=0), rtol=1e-6)
    more = km.lloyd(jnp.asarray(x), jnp.asarray(seeds), n_iter=10, tol=0.0, chunk_size=128)
    assert np.all(np.bincount(np.asarray(more.labels), minlength=24) > 0)


def test_kmeans_plus_plus_one_seed_per_blob():
    centres = np.random.default_rng(0).uniform(-100, 100, size=(10, 4))
    x, blob = make_blobs(n_samples=1000, centers=centres, cluster_std=0.5, random_state=0)
    seeds = np.asarray(km.kmeans_plus_plus(jax.random.key(0), jnp.asarray(x, jnp.float32), 10))
    seed_blob = brute_force(seeds, centres).argmin(1)
    assert sorted(seed_blob) == list(range(10))


def test_kmeans_plus_plus_draws_proportional_to_squared_distance():
    # One trial per centre is plain k-means++: the second seed is row i with p = D(i)^2 / sum D^2.
    x = np.array([[0.0], [1.0], [2.0], [4.0]], np.float32)
    draw = jax.jit(jax.vmap(lambda key: km.kmeans_plus_plus(key, x, 2, n_local_trials=1)))
    seeds = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))  # [4000, 2, 1]
    first, second = seeds[:, 0, 0], seeds[:, 1, 0]
    for start in range(4):
        picked = second[first == x[start, 0]]
        d2 = (x[:, 0] - x[start, 0]) ** 2
        expected = d2 / d2.sum()
        observed = np.array([(picked == v).mean() for v in x[:, 0]])
        assert len(picked) > 600
        np.testing.assert_allclose(observed, expected, atol=0.06)


def test_bad_inputs_name_the_argument():
    x = jnp.zeros((10, 3))
    with pytest.raises(ValueError, match="k=11"):
        km.kmeans(jax.random.key(0), x, 11)
    with pytest.raises(ValueError, match="method"):
        km.kmeans(jax.random.key(0), x, 2, method="elkan")
    with pytest.raises(ValueError, match="chunk_size"):
        km.assign(x, jnp.zeros((2, 3)), chunk_size=0)
    with pytest.raises(ValueError, match="centroids"):
        km.assign(x, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"x must be a 2-D"):
        km.kmeans(jax.random.key(0), jnp.zeros((10,)), 2)
    with pytest.raises(ValueError, match="weights"):
        km.lloyd(x, jnp.zeros((2, 3)), weights=jnp.ones(9))
