"""BoWNet's vocabulary: k-means of a frozen teacher's dense features, and vocabulary files.

BoWNet (Gidaris et al., CVPR 2020, section 2) quantises the teacher's feature map with K visual
words, the k-means centroids of the teacher's per-location feature vectors over the training
images. Here the pure part: which locations are kept (`locations_per_image`, `dense_vectors`,
`keep_locations`, jit-able), the k-means itself sharded over the devices, with its progress
shown between Lloyd iterations (`build_vocabulary`; `vector_buffer` preallocates its input so
that a streamed pass fills it in place and nothing is copied to pad it, `kmeans_footprint`
sizes it), and the vocabulary file
(`write_vocabulary` / `read_vocabulary` / `check_vocabulary`): an .npz
of the centroids [K, C] float32 and JSON metadata naming the teacher, layer, border and K.
Feature extraction and checkpoint I/O belong to the task that calls these.
"""
from __future__ import annotations

import json
import os
import time
import zipfile

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


def padded_rows(num_vectors: int, num_words: int, n_devices: int) -> int:
    """Rows of the k-means input for `num_vectors` vectors: a multiple of the k-means chunk
    (`kmeans.default_chunk_size(num_words, n_devices)`, on this backend), so that
    `build_vocabulary` shards it as it is."""
    chunk = kmeans.default_chunk_size(num_words, n_devices)
    return max(1, -(-int(num_vectors) // chunk)) * chunk


def vector_buffer(num_vectors: int, channels: int, num_words: int,
                  n_devices: int) -> np.ndarray:
    """Zeros float32 [padded_rows(...), channels]: the k-means input, to be filled in place with
    `num_vectors` rows (then `build_vocabulary(..., num_vectors=num_vectors)`: the rest is
    padding of weight 0). A streamed pass then holds the vectors once on the host, never a copy
    made to pad them."""
    return np.zeros((padded_rows(num_vectors, num_words, n_devices), int(channels)), np.float32)


def kmeans_footprint(num_vectors: int, channels: int, num_words: int,
                     n_devices: int) -> dict:
    """Bytes of the k-means of `num_vectors` float32 vectors of `channels` into `num_words` words
    on `n_devices` devices of this backend (`kmeans.default_chunk_size`):
    'host_vectors' the k-means input on the host (`vector_buffer`), 'device_vectors' each
    device's rows of it, 'distance_block' each device's [chunk rows, K padded to 128] float32
    scores of one assignment step, 'centroids' one [K, C] float32 array (Lloyd keeps a few:
    centroids, their update, the per-word sums), 'seeding_sample' k-means++'s subsample
    [min(N, max(32 K, 8192)), C] (`kmeans.default_init_sample_size`), 'chunk_rows' the rows of
    one assignment step over all devices."""
    chunk = kmeans.default_chunk_size(num_words, n_devices)
    rows = padded_rows(num_vectors, num_words, n_devices)
    words = -(-num_words // 128) * 128 if num_words > 128 else num_words
    seeding = kmeans.default_init_sample_size(num_vectors, num_words)
    return {"chunk_rows": chunk, "host_vectors": 4 * rows * channels,
            "device_vectors": 4 * rows * channels // n_devices,
            "distance_block": 4 * (chunk // n_devices) * words,
            "centroids": 4 * num_words * channels, "seeding_sample": 4 * seeding * channels}


def build_vocabulary(key, vectors: np.ndarray, num_words: int, *, method: str = "lloyd",
                     n_iter: int = 50, tol: float = 1e-4, n_init: int = 1, mesh=None,
                     field: str = "config.bownet.num_words",
                     num_vectors: int | None = None) -> tuple[np.ndarray, dict]:
    """k-means of the feature vectors [N, C] (float32 numpy) into `num_words` visual words.

    The rows are padded (weight 0) to a multiple of the k-means chunk and sharded over `mesh`
    (default: every device), so each device assigns its own rows (`bow.kmeans`). `num_vectors`:
    only the first rows are vectors, the others padding (a `vector_buffer`: no copy is made when
    its rows are already a multiple of the chunk). Returns (centroids float32 [num_words, C]
    numpy, meta) with meta = {'num_words', 'num_vectors', 'inertia', 'mean_sq_distance',
    'kmeans_method', 'kmeans_iters', 'kmeans_seconds'}. ValueError naming `field` when there
    are fewer vectors than words.
    """
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, C] feature vectors, got shape {vectors.shape}.")
    count = vectors.shape[0] if num_vectors is None else int(num_vectors)
    if not 0 <= count <= vectors.shape[0]:
        raise ValueError(f"num_vectors={num_vectors} must lie in [0, {vectors.shape[0]}] (the "
                         "rows of `vectors`).")
    if count < num_words:
        raise InputError(f"{field}={num_words} is more than the {count} feature "
                         "vectors sampled (vocab_images / vocab_max_vectors).")
    mesh = sharding.make_mesh() if mesh is None else mesh
    start = time.time()
    chunk = kmeans.default_chunk_size(num_words, mesh.size)
    weights = None
    if num_vectors is not None:
        weights = np.zeros(vectors.shape[0], np.float32)
        weights[:count] = 1.0
    x, weights = kmeans.pad_rows(vectors, chunk, weights)
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

    ValueError naming `field` when `path` is empty, not a vocabulary file or damaged (truncated,
    overwritten: it names the file and says to rebuild it); FileNotFoundError when it does not
    exist.
    """
    if not path:
        raise InputError(f"{field} is empty: BoWNet needs the vocabulary file written by the "
                         "vocabulary stage (task 'bownet_chain').")
    if not os.path.isfile(path):
        raise MissingInputError(f"{field}={path!r} does not exist.")
    try:
        with np.load(path) as f:
            if "centroids" not in f or "meta" not in f:
                raise InputError(f"{field}={path!r} is not a vocabulary file (expected arrays "
                                 "'centroids' and 'meta').")
            return f["centroids"].astype(np.float32), json.loads(str(f["meta"]))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{field}={path!r} cannot be read ({type(e).__name__}: {e}): the file "
                         "is damaged. Delete it and build it again (task 'bownet_chain' "
                         "rebuilds a missing vocabulary from its teacher).") from None


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
