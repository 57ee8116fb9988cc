"""k-means for BoWNet's visual-word vocabulary: k-means++ seeding, Lloyd and mini-batch k-means.

BoWNet (Gidaris et al., CVPR 2020) builds its vocabulary by k-means over densely extracted feature
vectors of a frozen teacher (K=2048 on CIFAR-100, K=20000 on ImageNet), i.e. millions of rows.
Everything here is a pure function on arrays, compiled once with `jax.jit`:

* Distances are ||x||^2 - 2 x.c + ||c||^2 with one matmul per chunk of rows, so memory stays
  bounded at [chunk_size, K] whatever N is.
* Sharding-agnostic: `x` may be a global array sharded on its leading axis over the 'data' mesh
  (`bow_jax.lib.sharding.batch_sharded`). Rows are walked in the layout [chunk, steps, D], whose
  leading axis keeps the row sharding, so every device works on its own rows at every step, and the
  per-centre sums (`segment_sum`) become all-reduces under jit. Centroids come out replicated.
  For sharded x, chunk_size should be a multiple of the device count (`default_chunk_size` is).
* Padding: rows with weight 0 are ignored in counts, sums, inertia, seeding and mini-batch
  sampling. `pad_rows` pads N to a multiple of the chunk before sharding; unpadded inputs are
  padded inside jit (a copy; for sharded inputs that copy may also move rows between devices).
* Deterministic for a key: every random draw comes from the key and the (padded) row count,
  never from how rows are sharded; 1 and 8 devices agree up to float summation order.
* One compilation per shape and code path: n_iter, n_init, n_steps and tol are traced values.
* Progress: `kmeans(..., progress_every=P)` runs the same fit as calls of P Lloyd iterations
  (mini-batch steps) driven from the host, the stopping test between calls, and shows their rate
  and ETA (`lib.writers.progress`); the result is the one-shot fit's.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bow_jax.lib import writers

HIGHEST = lax.Precision.HIGHEST
METHODS = ("lloyd", "minibatch")


class KMeansResult(NamedTuple):
    """Outcome of a k-means fit."""
    centroids: jax.Array  # [k, D] float32
    labels: jax.Array     # [N] int32, nearest centroid of each row
    inertia: jax.Array    # [] float32, weighted sum of squared distances to the nearest centroid
    n_iter: jax.Array     # [] int32, Lloyd iterations (or mini-batch steps) actually run


# ------------------------------------------------------------------------------------------------
# Defaults and argument checks (host side: they only look at shapes and the device count).

def default_chunk_size(k: int, n_devices: int | None = None) -> int:
    """Rows per assignment step: the [chunk, K] distance block stays cache/memory friendly.

    On CPU a block of about 1M floats per device (512 rows at K=2048) stays in L2/L3; on
    accelerators bigger blocks keep the matmul units busy. Always a multiple of the device count so
    that every device gets the same number of rows per step.
    """
    n_devices = jax.device_count() if n_devices is None else n_devices
    budget = 2 ** 20 if jax.default_backend() == "cpu" else 2 ** 27
    per_device = int(np.clip(budget // max(k, 1), 128, 65536))
    return per_device * n_devices


def default_init_sample_size(n: int, k: int) -> int:
    """Rows k-means++ seeds from: min(N, max(32 k, 8192)).

    k-means++ is k sequential passes over its rows, each scoring n_local_trials candidates:
    O(k * trials * m * D) work and k reads of m rows, which on all rows costs more than ten Lloyd
    iterations. Seeding from a uniform subsample of 32 rows per centre costs about as much as eight
    of them, while the Lloyd iterations that follow use all rows. The price, measured after 10
    Lloyd iterations on feature-like data: K=512, N=65536: final inertia equal to scikit-learn's
    full-data seeding (mean of 3 seeds, 1.1512e6 vs 1.1516e6); K=2048, N=200000: +0.35% over
    seeding from all rows (+0.7% with 16 rows per centre). Pass init_sample_size=N for the latter.
    """
    return int(min(n, max(32 * k, 8192)))


def _check_positive_int(value, field):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}.")


def _check_points(x, field="x"):
    if getattr(x, "ndim", None) != 2:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{field} must be a 2-D array [N, D], got shape {shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{field} must be floating point, got dtype {x.dtype}.")


def _check_weights(weights, n):
    if weights is not None and tuple(weights.shape) != (n,):
        raise ValueError(f"weights must have shape [N]=({n},), got {tuple(weights.shape)}.")


def _check_centroids(centroids, d):
    if getattr(centroids, "ndim", None) != 2 or centroids.shape[1] != d:
        shape = getattr(centroids, "shape", None)
        raise ValueError(f"centroids must have shape [k, D] with D={d}, got {shape}.")


def _as_weights(weights, n):
    return jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)


def _resolve_chunk(chunk_size, k):
    chunk_size = default_chunk_size(k) if chunk_size is None else chunk_size
    _check_positive_int(chunk_size, "chunk_size")
    return int(chunk_size)


def pad_rows(x, multiple: int, weights=None):
    """Pad `x` [N, D] with zero rows (weight 0) to a multiple of `multiple` rows.

    Do this on the host before sharding so that the chunked passes need no copy inside jit;
    `multiple` = chunk_size (itself a multiple of the device count). Returns (x, weights).
    """
    _check_positive_int(multiple, "multiple")
    x = np.asarray(x)
    n = x.shape[0]
    weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    pad = (-n) % multiple
    if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    return x, weights


# ------------------------------------------------------------------------------------------------
# Distances and the chunked pass over all rows.

_LANES = 128  # the width the first stage of the argmin keeps: a few vector registers


def _min_with_index(values, index, axis):
    """(min, index of the min) of `values` along `axis`; ties go to the lowest `index`."""
    def pick(a, b):
        av, ai = a
        bv, bi = b
        take_a = (av < bv) | ((av == bv) & (ai < bi))
        return jnp.where(take_a, av, bv), jnp.where(take_a, ai, bi)

    init = (jnp.array(jnp.inf, values.dtype), jnp.array(np.iinfo(np.int32).max, jnp.int32))
    return lax.reduce((values, index), init, pick, (axis,))


def _min_argmin(scores):
    """(min, argmin) over the last axis of scores [m, K]; ties go to the lowest index.

    Two stages, because XLA:CPU vectorises a reduction over a major axis much better than one
    over the minor axis (about 8x here): first the minimum over K / 128 blocks for each of 128
    lanes (element-wise across rows of 128), then over the 128 lanes. Needs K % 128 == 0 when
    K > 128 (`_pad_centroids` sees to it).
    """
    m, k = scores.shape
    if k <= _LANES or k % _LANES:
        return _min_with_index(scores, lax.broadcasted_iota(jnp.int32, scores.shape, 1), 1)
    blocks = scores.reshape(m, k // _LANES, _LANES)
    index = lax.broadcasted_iota(jnp.int32, blocks.shape, 1) * _LANES + lax.broadcasted_iota(
        jnp.int32, blocks.shape, 2)
    lane_min, lane_index = _min_with_index(blocks, index, 1)
    return _min_with_index(lane_min, lane_index, 1)


def _pad_centroids(centroids):
    """Centroids [k, D] and squared norms [k], padded to a multiple of 128 centroids when k > 128.

    Padded centroids get norm +inf, so they are never nearest.
    """
    centroids = centroids.astype(jnp.float32)
    c_sq = jnp.sum(centroids * centroids, axis=1)
    k = centroids.shape[0]
    pad = (-k) % _LANES if k > _LANES else 0
    if pad:
        centroids = jnp.pad(centroids, ((0, pad), (0, 0)))
        c_sq = jnp.pad(c_sq, (0, pad), constant_values=jnp.inf)
    return centroids, c_sq


def _nearest(x, centroids, c_sq, precision):
    """Nearest centroid and squared L2 distance of rows x [m, D] (centroids: `_pad_centroids`)."""
    x = x.astype(jnp.float32)
    # ||x||^2 does not change the argmin, so it is added after the reduction.
    scores = c_sq[None, :] - 2.0 * jnp.dot(x, centroids.T, precision=precision)
    best, labels = _min_argmin(scores)
    return labels, jnp.maximum(best + jnp.sum(x * x, axis=1), 0.0)


def _pad_in_jit(x, w, multiple):
    pad = (-x.shape[0]) % multiple
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        w = jnp.pad(w, (0, pad))
    return x, w


def _chunked_pass(x, w, centroids, chunk, precision, with_sums):
    """Assign every row of x [N, D] (N a multiple of `chunk`), `chunk` rows per step.

    Returns labels [N], squared distances [N] and, if `with_sums`, the weighted per-centroid sums
    [k, D] and weights [k] of the rows assigned to each centroid.
    """
    n, d = x.shape
    k = centroids.shape[0]
    steps = n // chunk
    # Row m * steps + s is processed at step s: the leading axis (chunk) keeps x's row sharding.
    x3 = x.reshape(chunk, steps, d)
    w2 = w.reshape(chunk, steps)
    padded, c_sq = _pad_centroids(centroids)

    def body(s, carry):
        labels, dists, sums, counts = carry
        xs = lax.dynamic_index_in_dim(x3, s, axis=1, keepdims=False)
        ws = lax.dynamic_index_in_dim(w2, s, axis=1, keepdims=False)
        lab, dist = _nearest(xs, padded, c_sq, precision)
        labels = lax.dynamic_update_index_in_dim(labels, lab, s, axis=1)
        dists = lax.dynamic_update_index_in_dim(dists, dist, s, axis=1)
        if with_sums:
            sums = sums + jax.ops.segment_sum(xs.astype(jnp.float32) * ws[:, None], lab, k)
            counts = counts + jax.ops.segment_sum(ws, lab, k)
        return labels, dists, sums, counts

    init = (jnp.zeros((chunk, steps), jnp.int32), jnp.zeros((chunk, steps), jnp.float32),
            jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.float32))
    labels, dists, sums, counts = lax.fori_loop(0, steps, body, init)
    return labels.reshape(n), dists.reshape(n), sums, counts


@functools.partial(jax.jit, static_argnames=("chunk", "precision"))
def _assign_jit(x, w, centroids, chunk, precision):
    n = x.shape[0]
    x, w = _pad_in_jit(x, w, chunk)
    labels, dists, _, _ = _chunked_pass(x, w, centroids, chunk, precision, with_sums=False)
    return labels[:n], dists[:n]


def assign(x, centroids, chunk_size: int | None = None, *, precision=HIGHEST):
    """Nearest centroid of every row: (labels int32 [N], squared L2 distance float32 [N]).

    Computed `chunk_size` rows at a time (any N; default `default_chunk_size(k)`), in float32.
    """
    _check_points(x)
    _check_centroids(centroids, x.shape[1])
    chunk = _resolve_chunk(chunk_size, centroids.shape[0])
    w = jnp.ones((x.shape[0],), jnp.float32)
    return _assign_jit(x, w, centroids, chunk, precision)


# ------------------------------------------------------------------------------------------------
# k-means++ seeding (Arthur & Vassilvitskii 2007) with greedy local trials.

def _subsample(key, x, w, m):
    """A uniform random subset of m rows among those with weight > 0 (without replacement)."""
    n = x.shape[0]
    if m >= n:
        return x.astype(jnp.float32), w
    priority = jnp.where(w > 0, jax.random.uniform(key, (n,)), 2.0)
    _, idx = lax.top_k(-priority, m)
    return x[idx].astype(jnp.float32), w[idx]


def _plus_plus(key, x, w, k, n_trials, precision):
    """Greedy k-means++ on rows x [m, D] with weights w [m]: returns k centroids.

    Each new centre is the best of `n_trials` candidates drawn with probability proportional to
    w * D(x)^2 (D = distance to the closest centre so far); "best" = the one that most lowers the
    potential sum w * D^2. D^2 is kept as a running minimum, so the total work is O(k n_trials m D).
    """
    m, d = x.shape
    x_sq = jnp.sum(x * x, axis=1)
    key_first, key_loop = jax.random.split(key)

    def sq_dist_to(points):  # [t, D] -> [t, m]
        cross = jnp.dot(points, x.T, precision=precision)
        return jnp.maximum(jnp.sum(points * points, 1)[:, None] - 2.0 * cross + x_sq[None, :], 0.0)

    # Rows are taken with index vectors (a gather), never a scalar index (a dynamic slice): when x
    # is sharded over rows, XLA gathers locally, where a dynamic slice would all-gather x.
    first = jax.random.categorical(key_first, jnp.log(w), shape=(1,))
    centroids = jnp.zeros((k, d), jnp.float32).at[0].set(x[first][0])
    closest = sq_dist_to(x[first])[0]

    def add_centre(i, carry):
        centroids, closest = carry
        mass = jnp.cumsum(w * closest)
        draws = jax.random.uniform(jax.random.fold_in(key_loop, i), (n_trials,)) * mass[-1]
        # side='right': the chosen index always carries positive mass.
        cand = jnp.minimum(jnp.searchsorted(mass, draws, side="right"), m - 1)
        cand_rows = x[cand]
        new_closest = jnp.minimum(closest[None, :], sq_dist_to(cand_rows))
        best = jnp.argmin(new_closest @ w)
        return centroids.at[i].set(cand_rows[best]), new_closest[best]

    centroids, _ = lax.fori_loop(1, k, add_centre, (centroids, closest))
    return centroids


def _default_trials(k):
    return 2 + int(math.log(k))  # scikit-learn's choice


def _seed(key, x, w, k, init_m, n_trials, precision):
    key_sample, key_pp = jax.random.split(key)
    xs, ws = _subsample(key_sample, x, w, init_m)
    return _plus_plus(key_pp, xs, ws, k, n_trials, precision)


@functools.partial(jax.jit, static_argnames=("k", "init_m", "n_trials", "precision"))
def _seed_jit(key, x, w, k, init_m, n_trials, precision):
    return _seed(key, x, w, k, init_m, n_trials, precision)


def kmeans_plus_plus(key, x, k: int, n_local_trials: int | None = None, *, weights=None,
                     init_sample_size: int | None = None, precision=HIGHEST):
    """k-means++ seeds [k, D] for x [N, D], greedy with `n_local_trials` (default 2 + ln k).

    Seeds from a uniform subsample of `init_sample_size` rows (default
    `default_init_sample_size(N, k)`; pass N to seed from all rows). Rows of weight 0 are never
    picked; other weights scale the sampling probability.
    """
    _check_points(x)
    n = x.shape[0]
    _check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"k={k} must be <= the number of rows N={n}.")
    n_trials = _default_trials(k) if n_local_trials is None else n_local_trials
    _check_positive_int(n_trials, "n_local_trials")
    init_m = default_init_sample_size(n, k) if init_sample_size is None else init_sample_size
    _check_positive_int(init_m, "init_sample_size")
    if init_m < k:
        raise ValueError(f"init_sample_size={init_m} must be >= k={k}.")
    _check_weights(weights, n)
    w = _as_weights(weights, n)
    return _seed_jit(key, x, w, k, min(init_m, n), n_trials, precision)


# ------------------------------------------------------------------------------------------------
# Lloyd iterations.

def _mean_variance(x, w):
    """Mean over features of the weighted per-feature variance (scikit-learn's tol scale)."""
    total = jnp.sum(w)
    mean = jnp.einsum("n,nd->d", w, x.astype(jnp.float32), precision=HIGHEST) / total
    sq = jnp.einsum("n,nd->d", w, jnp.square(x.astype(jnp.float32) - mean), precision=HIGHEST)
    return jnp.mean(sq / total)


def _reseed_empty(x, w, labels, dists, sums, counts, skip=False):
    """Give each empty cluster one of the rows currently farthest from their centroid.

    The j-th empty cluster (by index) takes the j-th farthest row, which leaves its old cluster:
    deterministic, and what scikit-learn's Lloyd does.
    """
    k = counts.shape[0]
    empty = counts <= 0

    def reseed(operands):
        sums, counts = operands
        n_far = min(k, x.shape[0])
        _, far = lax.top_k(jnp.where(w > 0, dists, -jnp.inf), n_far)
        rank = jnp.cumsum(empty) - 1
        take = empty & (rank < n_far)
        idx = far[jnp.clip(rank, 0, n_far - 1)]
        pw = jnp.where(take, w[idx], 0.0)
        moved = x[idx].astype(jnp.float32) * pw[:, None]
        old = labels[idx]
        sums = sums.at[old].add(-moved)
        counts = counts.at[old].add(-pw)
        sums = jnp.where(take[:, None], moved, sums)
        counts = jnp.where(take, pw, counts)
        return sums, counts

    return lax.cond(jnp.any(empty) & ~skip, reseed, lambda ops: ops, (sums, counts))


def _lloyd_start(x, w, centroids, tol):
    """Lloyd's loop state before its first turn, and the absolute tolerance tol x the mean
    per-feature variance: (state, tol_abs). state = (iterations, centroids, last shift, labels,
    squared distances, done)."""
    start = (jnp.array(0, jnp.int32), centroids.astype(jnp.float32),
             jnp.array(jnp.inf, jnp.float32), jnp.zeros((x.shape[0],), jnp.int32),
             jnp.zeros((x.shape[0],), jnp.float32), jnp.array(False))
    return start, tol * _mean_variance(x, w)


def _lloyd_turns(x, w, state, n_iter, tol_abs, chunk, precision, max_turns=None):
    """Lloyd loop turns from `state` until done, or at most `max_turns` of them (a traced count;
    None: no limit). Every turn assigns all rows to the current centroids; it then either stops
    (the previous update moved the centroids by <= tol_abs, or n_iter updates are done), so that
    labels and inertia belong to the returned centroids, or moves each centroid to the mean of
    its rows. One traced pass serves both, which halves compile time. Turns are the same
    computation however they are grouped into calls, so chunked runs equal one-shot runs."""
    def step(state):
        it, centroids, shift, _, _, _ = state
        labels, dists, sums, counts = _chunked_pass(x, w, centroids, chunk, precision, True)
        done = (it >= n_iter) | (shift <= tol_abs)
        sums, counts = _reseed_empty(x, w, labels, dists, sums, counts, skip=done)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1e-30)[:, None], centroids)
        new = jnp.where(done, centroids, new)
        return (it + jnp.where(done, 0, 1), new, jnp.sum(jnp.square(new - centroids)), labels,
                dists, done)

    if max_turns is None:
        return lax.while_loop(lambda s: ~s[-1], step, state)
    _, state = lax.while_loop(lambda c: ~c[1][-1] & (c[0] < max_turns),
                              lambda c: (c[0] + 1, step(c[1])), (jnp.array(0, jnp.int32), state))
    return state


def _lloyd_result(w, state) -> KMeansResult:
    it, centroids, _, labels, dists, _ = state
    return KMeansResult(centroids, labels, jnp.sum(w * dists), it)


def _lloyd(x, w, centroids, n_iter, tol, chunk, precision):
    """Lloyd's algorithm on padded x in one traced loop; see `lloyd` and `_lloyd_turns`."""
    state, tol_abs = _lloyd_start(x, w, centroids, tol)
    return _lloyd_result(w, _lloyd_turns(x, w, state, n_iter, tol_abs, chunk, precision))


@functools.partial(jax.jit, static_argnames=("chunk", "precision"))
def _lloyd_jit(x, w, centroids, n_iter, tol, chunk, precision):
    n = x.shape[0]
    x, w = _pad_in_jit(x, w, chunk)
    res = _lloyd(x, w, centroids, n_iter, tol, chunk, precision)
    return res._replace(labels=res.labels[:n])


def lloyd(x, centroids, n_iter: int = 100, tol: float = 1e-4, chunk_size: int | None = None, *,
          weights=None, precision=HIGHEST) -> KMeansResult:
    """Lloyd's k-means from `centroids` [k, D] over all rows of x [N, D].

    Stops after `n_iter` iterations or when the summed squared centroid shift is <= tol times the
    mean per-feature variance of x (scikit-learn's rule). Empty clusters are reseeded with the
    rows farthest from their centroids. `weights` [N] weigh rows (0 = padding, ignored).
    """
    _check_points(x)
    _check_centroids(centroids, x.shape[1])
    _check_positive_int(n_iter, "n_iter")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}.")
    _check_weights(weights, x.shape[0])
    chunk = _resolve_chunk(chunk_size, centroids.shape[0])
    w = _as_weights(weights, x.shape[0])
    return _lloyd_jit(x, w, centroids, jnp.int32(n_iter), jnp.float32(tol), chunk, precision)


# ------------------------------------------------------------------------------------------------
# Mini-batch k-means (Sculley 2010).

def _reassign_rare(key, xb, wb, dists, centroids, counts, ratio, n_max):
    """Move centres whose count is < ratio * max count onto batch rows drawn ∝ w * D^2.

    At most `n_max` centres move (the rarest first); moved centres get the smallest count among
    the others so that they are not swept back at once (scikit-learn's rule).
    """
    k = counts.shape[0]
    rare = counts < ratio * jnp.max(counts)
    order = jnp.argsort(jnp.where(rare, counts, jnp.inf))
    position = jnp.zeros((k,), jnp.int32).at[order].set(jnp.arange(k, dtype=jnp.int32))
    take = rare & (position < n_max)
    p = wb * dists
    p = jnp.where(jnp.sum(p) > 0, p, wb)  # all batch rows on centres: draw uniformly instead
    picks = jax.random.choice(key, xb.shape[0], (n_max,), replace=False, p=p / jnp.sum(p))
    new = xb[picks[jnp.minimum(position, n_max - 1)]]
    floor = jnp.min(jnp.where(take, jnp.inf, counts))
    return jnp.where(take[:, None], new, centroids), jnp.where(take, floor, counts)


def _minibatch_steps(key, x, w, centroids, counts, first, stop, batch_size, ratio,
                     reassign_every, precision):
    """Mini-batch steps first..stop-1 (traced) from (centroids, counts); step i draws its batch
    from fold_in(key, i), so steps grouped into several calls equal one call."""
    n = x.shape[0]
    k = centroids.shape[0]
    # Batches are drawn uniformly among rows of positive weight.
    valid = w > 0
    n_valid = jnp.sum(valid.astype(jnp.int32))
    valid_idx = jnp.nonzero(valid, size=n, fill_value=0)[0]
    n_max = max(1, min(batch_size // 2, k))

    def step(i, carry):
        centroids, counts = carry
        key_batch, key_reassign = jax.random.split(jax.random.fold_in(key, i))
        idx = valid_idx[jax.random.randint(key_batch, (batch_size,), 0, n_valid)]
        xb, wb = x[idx].astype(jnp.float32), w[idx]
        labels, dists = _nearest(xb, *_pad_centroids(centroids), precision)
        batch_sums = jax.ops.segment_sum(xb * wb[:, None], labels, k)
        batch_counts = jax.ops.segment_sum(wb, labels, k)
        # Per-centre learning rate 1 / count: the centre is the running mean of its rows.
        new_counts = counts + batch_counts
        updated = ((centroids * counts[:, None] + batch_sums)
                   / jnp.maximum(new_counts, 1e-30)[:, None])
        centroids = jnp.where(batch_counts[:, None] > 0, updated, centroids)
        return lax.cond(
            (i + 1) % reassign_every == 0,
            lambda c: _reassign_rare(key_reassign, xb, wb, dists, c[0], c[1], ratio, n_max),
            lambda c: c, (centroids, new_counts))

    return lax.fori_loop(first, stop, step, (centroids, counts))


def _minibatch_result(x, w, centroids, n_steps, chunk, precision) -> KMeansResult:
    """The final full assignment: labels and inertia of the mini-batch centroids."""
    labels, dists, _, _ = _chunked_pass(x, w, centroids, chunk, precision, False)
    return KMeansResult(centroids, labels, jnp.sum(w * dists), jnp.asarray(n_steps, jnp.int32))


def _minibatch(key, x, w, centroids, batch_size, n_steps, ratio, reassign_every, chunk, precision):
    """Mini-batch k-means on padded x; see `minibatch_kmeans`."""
    counts = jnp.zeros((centroids.shape[0],), jnp.float32)
    centroids, _ = _minibatch_steps(key, x, w, centroids.astype(jnp.float32), counts, 0, n_steps,
                                    batch_size, ratio, reassign_every, precision)
    return _minibatch_result(x, w, centroids, n_steps, chunk, precision)


def _default_reassign_every(k, batch_size):
    return max(1, -(-10 * k // batch_size))  # scikit-learn: after every 10 k rows seen


# ------------------------------------------------------------------------------------------------
# Front door: seeding + Lloyd or mini-batch, best of n_init.

@functools.partial(jax.jit, static_argnames=(
    "k", "method", "chunk", "init_m", "n_trials", "batch_size", "precision"))
def _fit(key, x, w, tol, ratio, n_iter, n_init, n_steps, reassign_every, *, k, method, chunk,
         init_m, n_trials, batch_size, precision):
    """Best of n_init runs; only shapes and code paths are static, so tests and sweeps over
    n_iter / n_init / n_steps reuse one compilation."""
    n = x.shape[0]
    x, w = _pad_in_jit(x, w, chunk)

    def run(key):
        key_seed, key_batches = jax.random.split(key)
        seeds = _seed(key_seed, x, w, k, init_m, n_trials, precision)
        if method == "lloyd":
            return _lloyd(x, w, seeds, n_iter, tol, chunk, precision)
        return _minibatch(key_batches, x, w, seeds, batch_size, n_steps, ratio, reassign_every,
                          chunk, precision)

    def keep_better(i, best):
        res = run(jax.random.fold_in(key, i))
        return jax.tree.map(lambda a, b: jnp.where(res.inertia < best.inertia, a, b), res, best)

    shapes = jax.eval_shape(run, key)
    none_yet = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    best = lax.fori_loop(0, n_init, keep_better,
                         none_yet._replace(inertia=jnp.array(jnp.inf, jnp.float32)))
    return best._replace(labels=best.labels[:n])


# ------------------------------------------------------------------------------------------------
# The same fit in several compiled calls, with progress (rate, ETA) between them.

@functools.partial(jax.jit, static_argnames=("chunk",))
def _pad_jit(x, w, chunk):
    return _pad_in_jit(x, w, chunk)


_lloyd_start_jit = jax.jit(_lloyd_start)
_lloyd_result_jit = jax.jit(_lloyd_result)


@functools.partial(jax.jit, static_argnames=("chunk", "precision"))
def _lloyd_turns_jit(x, w, state, n_iter, tol_abs, max_turns, chunk, precision):
    return _lloyd_turns(x, w, state, n_iter, tol_abs, chunk, precision, max_turns)


_minibatch_steps_jit = jax.jit(_minibatch_steps, static_argnames=("batch_size", "precision"))
_minibatch_result_jit = jax.jit(_minibatch_result, static_argnames=("chunk", "precision"))


def _show_progress(counts, total: int, desc: str, unit: str) -> None:
    """Consumes `counts` (the cumulative number of iterations after each compiled call) through
    `writers.progress`, one item per iteration, so its rate and ETA are per iteration."""
    def one_per_iteration():
        done = 0
        for count in counts:
            yield from range(count - done)
            done = count

    for _ in writers.progress(one_per_iteration(), total=total, desc=desc, unit=unit):
        pass


def _lloyd_in_calls(x, w, seeds, n_iter, tol, per_call, chunk, precision, desc):
    """`_lloyd` as calls of at most `per_call` loop turns, the stopping test between them."""
    state, tol_abs = _lloyd_start_jit(x, w, seeds, tol)
    box = [state]

    def calls():
        while not bool(box[0][-1]):
            box[0] = _lloyd_turns_jit(x, w, box[0], n_iter, tol_abs, jnp.int32(per_call), chunk,
                                      precision)
            yield int(box[0][0])

    _show_progress(calls(), int(n_iter), desc, "iterations")
    return _lloyd_result_jit(w, box[0])


def _minibatch_in_calls(key, x, w, seeds, batch_size, n_steps, ratio, reassign_every, per_call,
                        chunk, precision, desc):
    """`_minibatch` as calls of `per_call` steps."""
    box = [(seeds.astype(jnp.float32), jnp.zeros((seeds.shape[0],), jnp.float32))]
    total = int(n_steps)

    def calls():
        for first in range(0, total, per_call):
            stop = min(first + per_call, total)
            box[0] = _minibatch_steps_jit(key, x, w, *box[0], jnp.int32(first), jnp.int32(stop),
                                          batch_size, ratio, reassign_every, precision)
            jax.block_until_ready(box[0])
            yield stop

    _show_progress(calls(), total, desc, "steps")
    return _minibatch_result_jit(x, w, box[0][0], n_steps, chunk, precision)


def _fit_in_calls(key, x, w, tol, ratio, n_iter, n_init, n_steps, reassign_every, *, k, method,
                  chunk, init_m, n_trials, batch_size, precision, per_call):
    """`_fit` driven from the host: the same keys, seeds, turns and choice of the best run, so
    the same result, with a progress line (rate, ETA) between calls of `per_call` iterations."""
    n = x.shape[0]
    x, w = _pad_jit(x, w, chunk)
    best = None
    for i in range(int(n_init)):
        key_seed, key_batches = jax.random.split(jax.random.fold_in(key, i))
        seeds = _seed_jit(key_seed, x, w, k, init_m, n_trials, precision)
        runs = int(n_init)
        desc = f"k-means ({method}, K={k}" + (f", run {i + 1} of {runs})" if runs > 1 else ")")
        if method == "lloyd":
            res = _lloyd_in_calls(x, w, seeds, n_iter, tol, per_call, chunk, precision, desc)
        else:
            res = _minibatch_in_calls(key_batches, x, w, seeds, batch_size, n_steps, ratio,
                                      reassign_every, per_call, chunk, precision, desc)
        # As `_fit`'s keep_better: a later run replaces the best only with a lower inertia.
        if best is None or float(res.inertia) < float(best.inertia):
            best = res
    return best._replace(labels=best.labels[:n])


def kmeans(key, x, k: int, *, weights=None, n_iter: int = 100, tol: float = 1e-4, n_init: int = 1,
           method: str = "lloyd", chunk_size: int | None = None,
           init_sample_size: int | None = None, n_local_trials: int | None = None,
           batch_size: int = 1024, n_steps: int | None = None, reassignment_ratio: float = 0.01,
           precision=HIGHEST, progress_every: int = 0) -> KMeansResult:
    """k-means of x [N, D] into k clusters; the best of `n_init` runs by inertia.

    method='lloyd': k-means++ seeds then Lloyd (`n_iter`, `tol`, as `lloyd`).
    method='minibatch': k-means++ seeds then `n_steps` mini-batch steps of `batch_size` rows
    (default: 10 passes over the data), as `minibatch_kmeans`.
    Seeding: greedy k-means++ with `n_local_trials` (default 2 + ln k) on `init_sample_size` rows
    (default `default_init_sample_size`). `weights` [N] weigh rows; 0 marks padding.
    `chunk_size`: rows assigned per step (default `default_chunk_size(k)`). `precision`: of the
    distance matmul; HIGHEST keeps float32 on accelerators too (DEFAULT allows TF32/bf16 there).
    Deterministic for a key; runs unchanged on one device or with x sharded over the 'data' mesh.
    `progress_every` > 0: Lloyd iterations (mini-batch steps) per compiled call, with progress
    (rate, ETA; `lib.writers.progress`) and the stopping test between calls; the same result as
    0, the whole fit in one compiled call with no progress.
    """
    _check_points(x)
    n = x.shape[0]
    _check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"k={k} must be <= the number of rows N={n}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    for value, field in ((n_iter, "n_iter"), (n_init, "n_init"), (batch_size, "batch_size")):
        _check_positive_int(value, field)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}.")
    if not 0 <= reassignment_ratio <= 1:
        raise ValueError(f"reassignment_ratio must be in [0, 1], got {reassignment_ratio}.")
    _check_weights(weights, n)
    chunk = _resolve_chunk(chunk_size, k)
    init_m = default_init_sample_size(n, k) if init_sample_size is None else init_sample_size
    _check_positive_int(init_m, "init_sample_size")
    if init_m < k:
        raise ValueError(f"init_sample_size={init_m} must be >= k={k}.")
    n_trials = _default_trials(k) if n_local_trials is None else n_local_trials
    _check_positive_int(n_trials, "n_local_trials")
    n_steps = max(1, 10 * n // batch_size) if n_steps is None else n_steps
    _check_positive_int(n_steps, "n_steps")
    if progress_every:
        _check_positive_int(progress_every, "progress_every")
    fit = (functools.partial(_fit_in_calls, per_call=int(progress_every)) if progress_every
           else _fit)
    return fit(key, x, _as_weights(weights, n), jnp.float32(tol),
               jnp.float32(reassignment_ratio), jnp.int32(n_iter), jnp.int32(n_init),
               jnp.int32(n_steps), jnp.int32(_default_reassign_every(k, batch_size)), k=k,
               method=method, chunk=chunk, init_m=min(init_m, n), n_trials=n_trials,
               batch_size=batch_size, precision=precision)


def minibatch_kmeans(key, x, k: int, batch_size: int = 1024, n_steps: int | None = None,
                     **kwargs) -> KMeansResult:
    """Sculley's mini-batch k-means: k-means++ seeds, then per-centre-count (1/count) updates.

    Centres whose count falls below `reassignment_ratio` x the largest are moved onto batch rows
    (every ~10 k rows seen); a final full assignment gives labels and inertia. Other keyword
    arguments as `kmeans`.
    """
    return kmeans(key, x, k, method="minibatch", batch_size=batch_size, n_steps=n_steps, **kwargs)
