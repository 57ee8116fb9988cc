"""Quantising feature maps into visual words and pooling the codes into bags of words.

Shared by BoWNet (hard assignment to a k-means vocabulary, BoWNet paper eq. 1-4) and OBoW (soft
assignment to a queue vocabulary with an adaptive temperature, OBoW paper eq. 4). Everything here is
a pure float32 function on arrays, NHWC feature maps `[B, h, w, C]` and vocabularies `[K, C]`, so it
runs unchanged under `jax.jit` on one device or on a batch sharded over many: every mean over the
batch is then a mean over the global batch (the all-reduce of the PyTorch reference comes for free).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

REDUCE_MODES = ("histogram", "binary", "max", "avg")


# ------------------------------------------------------------------------------------------------
# Small array helpers


def l1_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_1, eps) along `axis` (torch `F.normalize(p=1)` semantics)."""
    norm = jnp.sum(jnp.abs(x), axis=axis, keepdims=True)
    return x / jnp.maximum(norm, eps)


def skip_border(fmap: jax.Array, border: int = 1) -> jax.Array:
    """Drop `border` locations on each side of an NHWC map: fmap[:, b:-b, b:-b, :].

    OBoW (and BoWNet before it) ignores the words of the map's edge, whose receptive fields are
    dominated by zero padding.
    """
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}.")
    if border == 0:
        return fmap
    _, h, w, _ = fmap.shape
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(
            f"Cannot skip a border of {border} on a {h}x{w} feature map: nothing would be left.")
    return fmap[:, border:h - border, border:w - border, :]


def _check_fmap_vocab(fmap: jax.Array, vocab: jax.Array) -> None:
    if vocab.ndim != 2 or vocab.shape[1] != fmap.shape[-1]:
        raise ValueError(
            f"vocab must be [K, C] with C={fmap.shape[-1]} (the map's channels), got shape "
            f"{vocab.shape}.")


# ------------------------------------------------------------------------------------------------
# Assignment of locations to words


def squared_distances(fmap: jax.Array, vocab: jax.Array) -> jax.Array:
    """Squared Euclidean distance of every location to every word: [B,h,w,C] x [K,C] -> [B,h,w,K].

    Any leading shape works ([N,C] feature lists too: [..., C] -> [..., K]).

    Expanded as ||f||^2 + ||v||^2 - 2 f.v like the reference (one big matmul instead of a
    [B,h,w,K,C] difference tensor). Not clamped at 0, as in the reference; the matmul runs at
    HIGHEST precision so the cancellation does not lose the small distances on accelerators whose
    default matmul precision is TF32/bf16.
    """
    _check_fmap_vocab(fmap, vocab)
    fmap = fmap.astype(jnp.float32)
    vocab = vocab.astype(jnp.float32)
    f_sq = jnp.sum(jnp.square(fmap), axis=-1, keepdims=True)
    v_sq = jnp.sum(jnp.square(vocab), axis=-1)
    dots = jnp.einsum("...c,kc->...k", fmap, vocab, precision=jax.lax.Precision.HIGHEST)
    return f_sq + v_sq - 2.0 * dots


def nearest_word(dist: jax.Array) -> jax.Array:
    """Index of the closest word per location (BoWNet eq. 1); ties go to the lowest index."""
    return jnp.argmin(dist, axis=-1)


def hard_assign(dist: jax.Array) -> jax.Array:
    """One-hot codes of the closest word per location: [..., K] distances -> [..., K] codes."""
    return jax.nn.one_hot(nearest_word(dist), dist.shape[-1], dtype=jnp.float32)


def soft_assign(dist: jax.Array, inv_delta: float, mean_min_dist: jax.Array) -> jax.Array:
    """OBoW soft codes (paper eq. 4): softmax over words of -(inv_delta / m) * dist.

    The temperature is delta = delta_base * m with delta_base = 1 / inv_delta and m the running mean
    of the per-location minimum squared distance, so the softness follows the scale of the features.
    """
    scale = inv_delta / mean_min_dist
    return jax.nn.softmax(-scale * dist, axis=-1)


# ------------------------------------------------------------------------------------------------
# Reductions of codes [B, h, w, K] (or [B, U, K]) over locations to bags of words [B, K]


def _location_axes(codes: jax.Array) -> tuple[int, ...]:
    if codes.ndim < 3:
        raise ValueError(f"codes must be [B, ..., K] with location axes, got shape {codes.shape}.")
    return tuple(range(1, codes.ndim - 1))


def bow_histogram(codes: jax.Array) -> jax.Array:
    """BoWNet eq. 3: word counts over locations, L1-normalised (= mean of the one-hot codes)."""
    return l1_normalize(jnp.mean(codes, axis=_location_axes(codes)))


def bow_binary(codes: jax.Array) -> jax.Array:
    """BoWNet eq. 4: presence of each word (max of one-hot codes over locations), L1-normalised."""
    return l1_normalize(jnp.max(codes, axis=_location_axes(codes)))


def bow_max(codes: jax.Array) -> jax.Array:
    """OBoW: max-pool of the soft codes over locations, L1-normalised."""
    return l1_normalize(jnp.max(codes, axis=_location_axes(codes)))


def bow_avg(codes: jax.Array) -> jax.Array:
    """OBoW's unused alternative: average-pool of the codes over locations, L1-normalised."""
    return l1_normalize(jnp.mean(codes, axis=_location_axes(codes)))


_REDUCERS = {"histogram": bow_histogram, "binary": bow_binary, "max": bow_max, "avg": bow_avg}


def reduce_codes(codes: jax.Array, mode: str) -> jax.Array:
    """Pool codes over locations into a BoW with `mode` in REDUCE_MODES."""
    if mode not in _REDUCERS:
        raise ValueError(f"Unknown BoW reduction mode {mode!r}; expected one of {REDUCE_MODES}.")
    return _REDUCERS[mode](codes)


def _cell_bounds(size: int, n: int, i: int) -> tuple[int, int]:
    # torch.nn.AdaptiveAvgPool2d's rule: an odd size gives cells that share the middle row/column.
    return (i * size) // n, math.ceil((i + 1) * size / n)


def spatial_pyramid(codes: jax.Array, reduce_mode: str,
                    grids: Sequence[int] = (1, 2)) -> jax.Array:
    """Spatial-pyramid BoW (BoWNet Sp-BoWNet): one BoW per cell of each n x n grid.

    codes [B,h,w,K] -> [B, sum(n*n), K]; with grids (1, 2): the whole map, then the 2x2 cells in
    row-major order (top-left, top-right, bottom-left, bottom-right). Cell i of n along an axis of
    size s covers [floor(i*s/n), ceil((i+1)*s/n)), the adaptive-pooling rule: an even size splits
    exactly in halves, an odd one gives both halves the middle row/column.
    """
    if codes.ndim != 4:
        raise ValueError(f"codes must be [B,h,w,K] for a spatial pyramid, got shape {codes.shape}.")
    _, h, w, _ = codes.shape
    bows = []
    for n in grids:
        if n < 1 or n > min(h, w):
            raise ValueError(f"grids entry {n} does not fit a {h}x{w} map.")
        for i in range(n):
            r0, r1 = _cell_bounds(h, n, i)
            for j in range(n):
                c0, c1 = _cell_bounds(w, n, j)
                bows.append(reduce_codes(codes[:, r0:r1, c0:c1, :], reduce_mode))
    return jnp.stack(bows, axis=1)


# ------------------------------------------------------------------------------------------------
# Targets


def perplexity(bow: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-image perplexity averaged over images, perplexity of the batch's summed BoW).

    exp(entropy) of the L1-normalised BoW, with the reference's log(p + 1e-5). Under jit the batch
    here is the global batch (the reference logs the local one).
    """
    def perp(p, axis):
        return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-5), axis=axis))

    per_image = jnp.mean(perp(l1_normalize(bow, axis=1), axis=1))
    batch = perp(l1_normalize(jnp.sum(bow, axis=0), axis=0), axis=0)
    return per_image, batch


def obow_level_targets(fmap: jax.Array, vocab: jax.Array, mean_min_dist: jax.Array, *,
                       inv_delta: Optional[float], momentum: float = 0.99, pool: str = "max",
                       border: int = 1):
    """OBoW BoW targets of one level, and the updated running mean-min-distance statistic.

    Order (official `BoWExtractor.forward`):
      1. skip the 1-location border of the teacher map;
      2. squared distances to `vocab`, which must be the PRE-update vocabulary (the queue is written
         after the targets, and the student predicts against this same snapshot);
      3. mu = mean over batch and locations of the per-location minimum distance (the global batch
         under jit);
      4. m_new = momentum * m + (1 - momentum) * mu, BEFORE the codes, so the current batch already
         shapes its own temperature;
      5. codes = softmax_K(-(inv_delta / m_new) * dist) (hard one-hot codes if inv_delta is None,
         the paper's "no soft" ablation);
      6. max-pool over locations (`pool='avg'` for the alternative), L1-normalise, stop_gradient.

    Args:
      fmap: raw teacher map of this level [B,h,w,C] (post-ReLU, not normalised).
      vocab: vocabulary queue [K,C] before this step's enqueue.
      mean_min_dist: running statistic m (scalar, starts at 0.5).
    Returns:
      (bow [B,K], m_new scalar, aux) with aux = {'min_dist_mean': mu, 'perplexity_image',
      'perplexity_batch'}.
    """
    if pool not in ("max", "avg"):
        raise ValueError(f"pool must be 'max' or 'avg' (OBoW bow_pool), got {pool!r}.")
    fmap = skip_border(fmap.astype(jnp.float32), border)
    dist = squared_distances(fmap, vocab)
    mu = jnp.mean(jnp.min(dist, axis=-1))
    m_new = momentum * mean_min_dist + (1.0 - momentum) * mu
    codes = hard_assign(dist) if inv_delta is None else soft_assign(dist, inv_delta, m_new)
    bow = jax.lax.stop_gradient(reduce_codes(codes, pool))
    perp_image, perp_batch = perplexity(bow)
    aux = {"min_dist_mean": mu, "perplexity_image": perp_image, "perplexity_batch": perp_batch}
    return bow, jax.lax.stop_gradient(m_new), aux


def bownet_targets(fmap: jax.Array, vocab: jax.Array, mode: str = "histogram",
                   pyramid: bool = False, border: int = 1) -> jax.Array:
    """BoWNet targets: hard assignment to a fixed k-means vocabulary, then eq. 3 or eq. 4.

    mode 'histogram' (eq. 3, CIFAR-100 / MiniImageNet) or 'binary' (eq. 4, ImageNet). The map's
    `border` is skipped first (OBoW paper: "as in BoWNet ... we ignore the visual words that
    correspond to the feature vectors on the edge"; pass border=0 to keep every location).
    Returns [B,K], or [B,5,K] with `pyramid` (whole map + 2x2 cells). Constant w.r.t. gradients.
    """
    if mode not in ("histogram", "binary"):
        raise ValueError(f"BoWNet target mode must be 'histogram' or 'binary', got {mode!r}.")
    codes = hard_assign(squared_distances(skip_border(fmap, border), vocab))
    bow = spatial_pyramid(codes, mode) if pyramid else reduce_codes(codes, mode)
    return jax.lax.stop_gradient(bow)
