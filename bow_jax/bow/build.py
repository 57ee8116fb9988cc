"""BoWNet's vocabulary: k-means of a frozen teacher's dense features, and vocabulary files.

BoWNet (Gidaris et al., CVPR 2020, section 2) quantises the teacher's feature map with K visual
words, the k-means centroids of the teacher's per-location feature vectors over the training
images. Here the pure part: which locations are kept (`locations_per_image`, `dense_vectors`,
`keep_locations`, jit-able), the k-means itself sharded over the devices, with its progress
shown between Lloyd iterations (`build_vocabulary`), and the vocabulary file
(`write_vocabulary` / `read_vocabulary` / `check_vocabulary`): an .npz
of the centroids [K, C] float32 and JSON metadata naming the teacher, layer, border and K.
Feature extraction and checkpoint I/O belong to the task that calls these.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.bow import kmeans, quantize
from bow_jax.lib import files, sharding
from bow_jax.lib.errors import InputError, MissingInputError

# ------------------------------------------------------------------------------------------------
# Dense feature vectors of the teacher


def locations_per_image(max_vectors: int, num_images: int, num_locations: int) -> int:
    """How many locations of each image's map the vocabulary sees: all `num_locations`, or
    floor(max_vectors / num_images) (at least 1, at most all) under a `max_vectors` cap (0: no
    cap; `config.bownet.vocab_max_vectors`)."""
    if not max_vectors:
        return num_locations
    return int(min(num_locations, max(1, max_vectors // num_images)))


def dense_vectors(fmap: jax.Array, border: int) -> jax.Array:
    """Per-location vectors of a teacher map [B, h, w, C] -> float32 [B, L, C], L = (h - 2 border)
    x (w - 2 border): the locations BoWNet's targets quantise (`quantize.skip_border`)."""
    fmap = quantize.skip_border(fmap.astype(jnp.float32), border)
    return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])


def keep_locations(key, vectors: jax.Array, keep: int) -> jax.Array:
    """A uniform random subset of `keep` locations per image, drawn without replacement:
    [B, L, C] -> [B, keep, C] (all of them, unchanged, when keep >= L). Jit-able; each image's
    subset is the `keep` largest of L uniform priorities drawn from `key`."""
    if keep >= vectors.shape[1]:
        return vectors
    priority = jax.random.uniform(key, vectors.shape[:2])
    chosen = jax.lax.top_k(priority, keep)[1]
    return jnp.take_along_axis(vectors, chosen[..., None], axis=1)


# ------------------------------------------------------------------------------------------------
# k-means


def build_vocabulary(key, vectors: np.ndarray, num_words: int, *, method: str = "lloyd",
                     n_iter: int = 50, tol: float = 1e-4, n_init: int = 1, mesh=None,
                     field: str = "config.bownet.num_words") -> tuple[np.ndarray, dict]:
    """k-means of the feature vectors [N, C] (float32 numpy) into `num_words` visual words.

    The rows are padded (weight 0) to a multiple of the k-means chunk and sharded over `mesh`
    (default: every device), so each device assigns its own rows (`bow.kmeans`). Returns
    (centroids float32 [num_words, C] numpy, meta) with meta = {'num_words', 'num_vectors',
    'inertia', 'mean_sq_distance', 'kmeans_method', 'kmeans_iters', 'kmeans_seconds'}.
    ValueError naming `field` when there are fewer vectors than words.
    """
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, C] feature vectors, got shape {vectors.shape}.")
    if vectors.shape[0] < num_words:
        raise InputError(f"{field}={num_words} is more than the {vectors.shape[0]} feature "
                         "vectors sampled (vocab_images / vocab_max_vectors).")
    mesh = sharding.make_mesh() if mesh is None else mesh
    start = time.time()
    chunk = kmeans.default_chunk_size(num_words, mesh.size)
    x, weights = kmeans.pad_rows(vectors, chunk)
    rows = sharding.batch_sharded(mesh)
    # Progress (rate, ETA) between compiled calls of one Lloyd iteration (a pass over every
    # vector) or of 100 mini-batch steps; the result is the one-shot fit's.
    result = kmeans.kmeans(key, jax.device_put(x, rows), num_words,
                           weights=jax.device_put(weights, rows), n_iter=n_iter, tol=tol,
                           n_init=n_init, method=method, chunk_size=chunk,
                           progress_every=1 if method == "lloyd" else 100)
    centroids = np.asarray(result.centroids)
    num_vectors = int(weights.sum())
    meta = {"num_words": int(num_words), "num_vectors": num_vectors,
            "inertia": float(result.inertia),
            "mean_sq_distance": float(result.inertia) / num_vectors,
            "kmeans_method": method, "kmeans_iters": int(result.n_iter),
            "kmeans_seconds": time.time() - start}
    return centroids, meta


# ------------------------------------------------------------------------------------------------
# Vocabulary files


def read_vocabulary(path: str, field: str = "config.bownet.vocabulary"):
    """(centroids float32 [K, C], metadata dict) of a vocabulary file.

    ValueError naming `field` when `path` is empty or not a vocabulary file; FileNotFoundError
    when it does not exist.
    """
    if not path:
        raise InputError(f"{field} is empty: BoWNet needs the vocabulary file written by the "
                         "vocabulary stage (task 'bownet_chain').")
    if not os.path.isfile(path):
        raise MissingInputError(f"{field}={path!r} does not exist.")
    with np.load(path) as f:
        if "centroids" not in f or "meta" not in f:
            raise InputError(f"{field}={path!r} is not a vocabulary file (expected arrays "
                             "'centroids' and 'meta').")
        return f["centroids"].astype(np.float32), json.loads(str(f["meta"]))


def write_vocabulary(path: str, centroids, meta: dict) -> None:
    """Writes centroids (as float32) + JSON metadata atomically (`lib.files.atomic_open`); the
    task that calls it says where (one line with the fit's figures)."""
    with files.atomic_open(path, "wb") as f:  # a file object: np.savez would append '.npz'
        np.savez(f, centroids=np.asarray(centroids, np.float32), meta=np.array(json.dumps(meta)))


def check_vocabulary(meta: dict, centroids_shape, *, teacher_step: int, layer: str, border: int,
                     num_words: int, channels: int, path: str) -> None:
    """ValueError naming the config fields unless the vocabulary at `path` was built from this
    teacher step, layer, border and K, with centroids of shape (num_words, channels)."""
    want = {"teacher_step": teacher_step, "layer": layer, "border": border,
            "num_words": num_words}
    for key, value in want.items():
        if meta.get(key) != value:
            raise InputError(
                f"config.bownet.vocabulary={path!r} was built with {key}={meta.get(key)!r}, but "
                f"this run has {key}={value!r} (config.bownet.teacher_workdir / teacher_layer / "
                "border / num_words). Rebuild the vocabulary or fix the config.")
    if tuple(centroids_shape) != (num_words, channels):
        raise InputError(f"config.bownet.vocabulary={path!r}: centroids have shape "
                         f"{tuple(centroids_shape)}, expected (num_words, channels of "
                         f"{layer!r}) = ({num_words}, {channels}).")
