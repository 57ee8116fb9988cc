"""Online vocabularies of visual words: OBoW's queue, and the paper's online k-means ablations.

OBoW (paper sec. 3.1) keeps, per BoW level, a FIFO queue of K words [K, C] and a write pointer. Each
training step, after the targets were computed with the old queue, one feature vector per image of
the global batch is written over the oldest words. The appendix (sec. D) also describes online
k-means vocabularies (VQ-VAE style EMA, with rare-word reseeding or Sinkhorn-balanced assignments);
they are here as ablations.

All functions are pure and jit-able. Under `jax.jit` with the batch sharded over a mesh the arrays
are global, so the queue write sees every device's words (the reference's all-gather) and k-means
statistics are sums over the global batch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from bow_jax.bow import quantize
from bow_jax.lib import errors

SAMPLE_MODES = ("local_average", "local_features", "global_average")


# ------------------------------------------------------------------------------------------------
# Queue vocabulary (OBoW)


def init_queue(key: jax.Array, num_words: int, channels: int) -> jax.Array:
    """Initial vocabulary queue [K, C]: max(N(0, 1), 0) in float32, as the reference's buffer.

    Non-negative like the post-ReLU features it will be compared with. Its write pointer starts at
    `init_pointer()`.
    """
    return jnp.maximum(jax.random.normal(key, (num_words, channels), jnp.float32), 0.0)


def init_pointer() -> jax.Array:
    """Initial queue write pointer: int32 scalar 0."""
    return jnp.zeros((), jnp.int32)


def check_queue_divisible(num_words: int, global_batch: int) -> None:
    """Raise an InputError (a ValueError) unless the global batch divides the vocabulary size.

    The FIFO writes whole batches, so the pointer must land back on 0 after K/B steps.
    """
    if global_batch <= 0 or num_words % global_batch:
        raise errors.InputError(
            f"config.obow.num_words={num_words} must be divisible by config.batch_size="
            f"{global_batch} (the global batch): the vocabulary queue is written one whole batch "
            f"of words per step.")


def update_queue(queue: jax.Array, ptr: jax.Array,
                 new_words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FIFO write of the global batch's words: rows [ptr, ptr+B) <- new_words, ptr <- (ptr+B) mod K.

    `new_words` [B_global, C] may be sharded over the batch axis; under jit the compiler gathers it
    so every replica of the queue receives all B_global words in global batch order (the
    reference's `concat_all_gather` in rank order).
    """
    num_words, channels = queue.shape
    if new_words.ndim != 2 or new_words.shape[1] != channels:
        raise ValueError(
            f"new_words must be [B, {channels}] to match the queue {queue.shape}, got "
            f"{new_words.shape}.")
    batch = new_words.shape[0]
    check_queue_divisible(num_words, batch)
    ptr = jnp.asarray(ptr, jnp.int32)
    queue = jax.lax.dynamic_update_slice(
        queue, new_words.astype(queue.dtype), (ptr, jnp.zeros((), jnp.int32)))
    return queue, (ptr + batch) % num_words


def sample_locations(key: jax.Array, batch: int, height: int,
                     width: int) -> tuple[jax.Array, jax.Array]:
    """One uniformly random (row, col) per image, independent across images: two int32 [B]."""
    flat = jax.random.randint(key, (batch,), 0, height * width, dtype=jnp.int32)
    return flat // width, flat % width


def local_average(fmap: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, no padding (VALID): [B,h,w,C] -> [B,h-2,w-2,C]."""
    summed = jax.lax.reduce_window(
        fmap, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "VALID")
    return summed / 9.0


def _check_local_average_size(fmap: jax.Array, border: int, level: Optional[str]) -> None:
    _, h, w, _ = fmap.shape
    if h - 2 * border < 3 or w - 2 * border < 3:
        min_size = 3 + 2 * border
        raise ValueError(
            f"BoW level {level or '?'}: the teacher feature map is {h}x{w}, which is "
            f"{max(h - 2 * border, 0)}x{max(w - 2 * border, 0)} after skipping the "
            f"{border}-location border; local_average word sampling needs a 3x3 window, so OBoW "
            f"needs every BoW-level map to be at least {min_size}x{min_size}. Choose other BoW "
            f"levels, a different stem or a larger teacher input.")


def sample_words(key: jax.Array, fmap: jax.Array, mode: str = "local_average", *,
                 border: int = 1, level: Optional[str] = None) -> jax.Array:
    """One new visual word per image from a teacher level map: [B,h,w,C] -> [B,C].

    `fmap` is the raw level map, the same one given to `quantize.obow_level_targets`; its border is
    skipped here (OBoW uses the same cropped map for targets and queue). Modes (OBoW paper 3.1):
      'local_average'  (the paper's choice, c): 3x3 average pool (stride 1, VALID) of the cropped
                       map, then one uniformly random location per image;
      'local_features' (a): one uniformly random location of the cropped map, no averaging;
      'global_average' (b): mean over all locations of the cropped map.
    The random locations are `sample_locations(key, B, h', w')` on the map being sampled, so the
    choice is a deterministic function of `key`. `level` only names the level in error messages.
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"Unknown word sampling mode {mode!r}; expected one of {SAMPLE_MODES}.")
    if fmap.ndim != 4:
        raise ValueError(f"fmap must be an NHWC feature map [B,h,w,C], got shape {fmap.shape}.")
    if mode == "local_average":
        _check_local_average_size(fmap, border, level)
    fmap = quantize.skip_border(fmap.astype(jnp.float32), border)
    if mode == "global_average":
        return jnp.mean(fmap, axis=(1, 2))
    if mode == "local_average":
        fmap = local_average(fmap)
    b, h, w, c = fmap.shape
    rows, cols = sample_locations(key, b, h, w)
    flat = (rows * w + cols)[:, None, None]
    return jnp.take_along_axis(fmap.reshape(b, h * w, c), flat, axis=1)[:, 0]


# ------------------------------------------------------------------------------------------------
# Online k-means vocabulary (OBoW appendix D, ablation)


class OnlineKMeansState(NamedTuple):
    """EMA k-means vocabulary: centroids = ema_sums / ema_counts, plus idle-step counters."""
    centroids: jax.Array          # [K, C] float32
    ema_counts: jax.Array         # [K] float32, N_k
    ema_sums: jax.Array           # [K, C] float32, M_k
    steps_since_used: jax.Array   # [K] int32, steps since the word was last a nearest centroid


def init_online_kmeans(centroids: jax.Array) -> OnlineKMeansState:
    """Start from given centroids (e.g. `init_queue`): N_k = 1, M_k = v_k, idle counters 0.

    N_k = 1 keeps v_k = M_k / N_k well defined from the first step (the appendix does not say how
    N and M start).
    """
    centroids = centroids.astype(jnp.float32)
    num_words = centroids.shape[0]
    return OnlineKMeansState(
        centroids=centroids,
        ema_counts=jnp.ones((num_words,), jnp.float32),
        ema_sums=centroids,
        steps_since_used=jnp.zeros((num_words,), jnp.int32))


def online_kmeans_update(state: OnlineKMeansState, features: jax.Array, *, key: jax.Array,
                         momentum: float = 0.99, reseed_after: Optional[int] = 1000,
                         codes: Optional[jax.Array] = None) -> OnlineKMeansState:
    """One online k-means step on the batch's local features [N, C] (OBoW appendix D).

      1. assign each feature to its nearest centroid (squared L2, the current centroids);
         `codes` [N, K] replaces these hard codes in the statistics (variant (b): Sinkhorn codes);
      2. n_k = sum_i codes_ik, m_k = sum_i codes_ik f_i;
         N_k <- g N_k + (1-g) n_k, M_k <- g M_k + (1-g) m_k (eq. 6-7, g = momentum),
         v_k = M_k / N_k;
      3. variant (a): a word that has not been any feature's nearest centroid for more than
         `reseed_after` steps (the paper: "more than 1000 training steps have passed") is replaced
         by a feature drawn uniformly (with replacement, independently per word) from this batch.
         Choice (not in the paper): the reseeded word restarts with N_k = 1, M_k = f, idle count 0.
         `reseed_after=None` disables reseeding.
    Under jit with `features` sharded, the sums are over the global batch.
    """
    features = features.astype(jnp.float32)
    num_words = state.centroids.shape[0]
    nearest = quantize.nearest_word(quantize.squared_distances(features, state.centroids))
    hard = jax.nn.one_hot(nearest, num_words, dtype=jnp.float32)
    codes = hard if codes is None else codes.astype(jnp.float32)

    counts = jnp.sum(codes, axis=0)
    sums = jnp.einsum("nk,nc->kc", codes, features, precision=jax.lax.Precision.HIGHEST)
    ema_counts = momentum * state.ema_counts + (1.0 - momentum) * counts
    ema_sums = momentum * state.ema_sums + (1.0 - momentum) * sums
    # N_k only decays geometrically from 1, but guard it anyway: an empty word keeps its place.
    safe = ema_counts > 1e-30
    centroids = jnp.where(safe[:, None], ema_sums / jnp.where(safe, ema_counts, 1.0)[:, None],
                          state.centroids)

    used = jnp.sum(hard, axis=0) > 0
    idle = jnp.where(used, 0, state.steps_since_used + 1).astype(jnp.int32)
    if reseed_after is not None:
        reseed = idle > reseed_after
        picks = features[jax.random.randint(key, (num_words,), 0, features.shape[0])]
        centroids = jnp.where(reseed[:, None], picks, centroids)
        ema_sums = jnp.where(reseed[:, None], picks, ema_sums)
        ema_counts = jnp.where(reseed, 1.0, ema_counts)
        idle = jnp.where(reseed, 0, idle)
    return OnlineKMeansState(centroids, ema_counts, ema_sums, idle)


def sinkhorn(scores: jax.Array, n_iters: int = 3, epsilon: float = 0.05) -> jax.Array:
    """Balanced soft assignments of N samples to K words (Sinkhorn-Knopp, as in SwAV).

    Q proportional to exp(scores / epsilon) [N, K], then `n_iters` rounds of: scale each word's
    column to mass N/K, scale each sample's row to sum 1. The result rows sum to 1 exactly and the
    columns to about N/K. For OBoW appendix D (b), scores = -squared distances, i.e. the
    entropy-regularised transport plan min <Q, D> + eps <Q, log Q> with uniform marginals. Computed
    in the log domain so a small epsilon cannot overflow; under jit with the samples sharded the
    column sums are global.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, K], got shape {scores.shape}.")
    n, k = scores.shape
    log_q = scores.astype(jnp.float32) / epsilon
    log_word_mass = jnp.log(jnp.float32(n) / k)
    for _ in range(n_iters):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) + log_word_mass
        log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
    return jnp.exp(log_q)
