"""Frozen-feature extraction: run a jitted `encode` over uint8 images in equal batches.

Every batch has the same shape (the last one is padded and the padding dropped), so `encode` is
compiled exactly once. Batches are sharded over the mesh's 'data' axis, so all devices (and all
hosts) share the work. `encode` must treat samples independently (a backbone in eval mode): the
zero images used as padding must not change the features of the real ones. `iter_features` is
the one extractor, over the batches of an array (`extract_features`) or of a streamed split
(`evaluate.cache.split_features`).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bow_jax.lib import sharding, writers

Encode = Callable[[jax.Array], jax.Array]


def hflip_batch(images: jax.Array) -> jax.Array:
    """Horizontal flip of NHWC images (the width axis)."""
    return images[:, :, ::-1, :]


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3]; got shape {images.shape}.")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (the encoder normalises); got {images.dtype}.")
    return images


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` with zero rows appended up to `rows` rows."""
    if x.shape[0] == rows:
        return x
    pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def _to_host(tree, mesh: Mesh):
    """This process's rows of batch-sharded global arrays, as numpy."""
    if jax.process_count() > 1:
        spec = sharding.batch_sharded(mesh).spec
        tree = multihost_utils.global_array_to_host_local_array(
            tree, mesh, jax.tree.map(lambda _: spec, tree))
    return jax.tree.map(np.asarray, tree)


def _jit_views(encode: Encode, mesh: Mesh, flip: bool):
    """The jitted `views(variables, x, batch_key)` of `compile_views`."""
    def views(variables, x, batch_key):
        f = encode if variables is None else functools.partial(encode, variables)
        f = f if batch_key is None else functools.partial(f, key=batch_key)
        return (f(x), f(hflip_batch(x))) if flip else f(x)

    layout, replicated = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    return jax.jit(views, in_shardings=(replicated, layout, replicated), out_shardings=layout)


# One jitted function per (encode, mesh, flip): passes of the same shapes reuse its compiled
# program (the training monitor's passes compile once per run, not once per call).
_cached_jit_views = functools.lru_cache(maxsize=16)(_jit_views)


def compile_views(encode: Encode, mesh: Mesh, flip: bool = False, variables=None, key=None):
    """`step(batch_index, local_batch)`: `encode` (and, with `flip`, `encode` of the horizontally
    flipped batch, in the same compiled call) on this process's uint8 [local_batch, H, W, 3]
    slice of a global batch; returns batch-sharded global arrays (a pair with `flip`).

    Every batch of a pass, and every later pass with the same `encode`, mesh, `flip` and shapes,
    runs one compiled program. See `extract_features` for `variables` and `key`.
    """
    try:
        compiled = _cached_jit_views(encode, mesh, flip)
    except TypeError:  # an unhashable `encode`: compiled once per pass
        compiled = _jit_views(encode, mesh, flip)

    def step(batch_index: int, batch: np.ndarray):
        batch_key = None if key is None else jax.random.fold_in(key, batch_index)
        return compiled(variables, sharding.shard_batch(_check_images(batch), mesh), batch_key)

    return step


def iter_features(encode: Encode, batches: Iterable[np.ndarray], batch_size: int,
                  mesh: Mesh | None = None, flip: bool = False, variables=None, key=None):
    """Yields the float32 features of each of `batches` (this process's uint8
    [batch_size // processes, H, W, 3] slices, all of one shape): [local_batch, D] per batch, or
    a pair (centre, flipped) with `flip`. The device computes batch i+1 while the host copies
    batch i's features. Every process must pass the same number of batches."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    sharding.check_divisible(batch_size, mesh.size, "batch_size", "the number of devices")
    local_batch = batch_size // jax.process_count()
    step, pending = compile_views(encode, mesh, flip, variables, key), None
    for i, batch in enumerate(batches):
        if batch.shape[0] != local_batch:
            raise ValueError(f"batch {i} has {batch.shape[0]} images; every batch must hold "
                             f"batch_size // processes = {local_batch}.")
        result = step(i, batch)
        # Pull the previous batch to the host only after dispatching this one, so the device
        # computes while the host copies.
        if pending is not None:
            yield _as_float32(_to_host(pending, mesh))
        pending = result
    if pending is not None:
        yield _as_float32(_to_host(pending, mesh))


def _as_float32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def extract_features(encode: Encode, images: np.ndarray, batch_size: int,
                     mesh: Mesh | None = None, flip: bool = False, variables=None, key=None,
                     progress: str = ""):
    """Features of `images` ([N,H,W,3] uint8, this process's share) -> float32 [N, D].

    With `variables` (e.g. a training state), `encode(variables, x)` is called and the variables
    are an argument of the compiled function rather than constants baked into it (which would
    copy a large model into the program and slow its compile).

    `batch_size` is the global batch (all processes together) and must divide over the mesh's
    devices. With `flip=True` also returns the features of the horizontally flipped images
    (OBoW's precached centre + flip views), computed in the same compiled call:
    `(centre [N, D], flipped [N, D])`. In a multi-process run every process must pass the same
    number of images (its own slice) and gets back the features of its slice.

    With a PRNG `key`, `encode(variables, x, batch_key)` is called with `fold_in(key, i)` for the
    i-th batch (e.g. to keep a random subset of each image's locations on the device).
    Splits that do not fit in host memory: `evaluate.cache.split_features` streams them through
    the same `iter_features`. `progress`: a name for the pass, shown with its rate and ETA
    (`lib.writers.progress`); "" = silent.
    """
    images = _check_images(images)
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0).")
    mesh = sharding.make_mesh() if mesh is None else mesh
    sharding.check_divisible(batch_size, mesh.size, "batch_size", "the number of devices")
    local_batch = batch_size // jax.process_count()
    if jax.process_count() > 1:
        multihost_utils.assert_equal(images.shape[0], "extract_features: every process must pass "
                                     "the same number of images.")
    n = images.shape[0]
    batches = (_pad_rows(images[start:start + local_batch], local_batch)
               for start in range(0, n, local_batch))
    if progress:
        batches = writers.progress(batches, -(-n // local_batch), progress, "batch")
    chunks = list(iter_features(encode, batches, batch_size, mesh, flip, variables, key))
    # Drop the padding rows of the last batch.
    return jax.tree.map(lambda *c: np.concatenate(c)[:n], *chunks)
