"""k-means in several compiled calls with progress (`kmeans(..., progress_every=P)`): the same
result as the one-shot fit, and progress lines with rate and ETA when stderr is not a terminal."""
import functools
import re

import jax
import numpy as np
import pytest
from sklearn.datasets import make_blobs

from bow_jax.bow import kmeans as km
from bow_jax.lib import writers


@pytest.fixture(scope="module")
def points():
    x, _ = make_blobs(n_samples=1000, n_features=8, centers=12, cluster_std=2.0, random_state=3)
    return x.astype(np.float32)


@pytest.fixture
def log_lines(monkeypatch):
    """`writers.progress` as it behaves in a log (not a TTY), with its line and quiet intervals
    at 0 so that a short test phase prints every line."""
    monkeypatch.setattr(writers.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(km.writers, "progress", functools.partial(
        writers.progress, every_s=0.0, quiet_below_s=0.0))


def _same(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    for field in km.KMeansResult._fields:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("fields", [
    dict(n_iter=40, tol=1e-4, n_init=2),             # stops on the tolerance
    dict(n_iter=5, tol=0.0),                         # stops on n_iter
    dict(method="minibatch", batch_size=64, n_steps=23, n_init=2),
])
def test_chunked_fit_equals_one_shot_and_shows_progress(points, fields, log_lines, capsys):
    key = jax.random.key(1)
    one_shot = km.kmeans(key, points, 12, chunk_size=256, **fields)
    capsys.readouterr()
    chunked = km.kmeans(key, points, 12, chunk_size=256, progress_every=3, **fields)
    _same(one_shot, chunked)
    out = capsys.readouterr().out
    unit = "steps" if fields.get("method") == "minibatch" else "iterations"
    total = fields.get("n_steps", fields.get("n_iter"))
    lines = [line for line in out.splitlines() if line.startswith("k-means (")]
    assert lines, out
    runs = fields.get("n_init", 1)
    assert len({line.split(")")[0] for line in lines}) == runs
    pattern = (rf"k-means \((lloyd|minibatch), K=12(, run \d of {runs})?\): \d+ of {total} "
               rf"{unit} in [\d.]+ (s|min) \([\d.e+-]+ {unit}/s(, ETA .*)?\)")
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    done = int(one_shot.n_iter)
    assert any(f": {done} of {total} {unit}" in line for line in lines)  # the end line
    if done > 3:
        assert any("ETA" in line for line in lines)  # lines between calls carry an ETA


def test_progress_every_is_checked(points):
    with pytest.raises(ValueError, match="progress_every must be a positive integer"):
        km.kmeans(jax.random.key(0), points, 4, progress_every=-1)


def test_build_vocabulary_shows_progress_and_equals_the_one_shot_kmeans(points, log_lines,
                                                                        capsys, tmp_path):
    from bow_jax.bow import build
    from bow_jax.lib.sharding import batch_sharded, make_mesh
    mesh = make_mesh()
    centroids, meta = build.build_vocabulary(jax.random.key(2), points, 12, n_iter=30, mesh=mesh)
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("k-means (lloyd, K=12): ")]
    assert lines and f"{meta['kmeans_iters']} of 30 iterations" in lines[-1]
    # The same fit in one compiled call, from the same padded, sharded rows.
    chunk = km.default_chunk_size(12, mesh.size)
    x, weights = km.pad_rows(points, chunk)
    rows = batch_sharded(mesh)
    want = km.kmeans(jax.random.key(2), jax.device_put(x, rows), 12, n_iter=30, chunk_size=chunk,
                     weights=jax.device_put(weights, rows))
    np.testing.assert_array_equal(centroids, np.asarray(want.centroids))
    assert meta["inertia"] == float(want.inertia) and meta["kmeans_iters"] == int(want.n_iter)
    path = tmp_path / "vocab" / "vocabulary.npz"
    build.write_vocabulary(str(path), centroids, meta)
    read, read_meta = build.read_vocabulary(str(path))
    np.testing.assert_array_equal(read, centroids)
    assert read_meta["kmeans_iters"] == meta["kmeans_iters"]


def test_dense_feature_pass_shows_progress(log_lines, capsys):
    from bow_jax.protocols import features
    images = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 3), np.uint8)

    def encode(x):
        return x.reshape(x.shape[0], -1).astype(np.float32).mean(1, keepdims=True)

    got = features.extract_features(encode, images, 16, progress="dense layer3 features")
    np.testing.assert_allclose(got[:, 0], images.reshape(40, -1).mean(1), rtol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("dense layer3 features: 3 of 3 batch in ") for line in lines)
