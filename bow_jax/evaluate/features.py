"""Frozen-feature extraction: run a jitted `encode` over a uint8 image array in equal batches.

Every batch has the same shape (the last one is padded and the padding dropped), so `encode` is
compiled exactly once. Batches are sharded over the mesh's 'data' axis, so all devices (and all
hosts) share the work. `encode` must treat samples independently (a backbone in eval mode): the
zero images used as padding must not change the features of the real ones.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bow_jax.lib import sharding

Encode = Callable[[jax.Array], jax.Array]


def hflip(images: jax.Array) -> jax.Array:
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


def extract_features(encode: Encode, images: np.ndarray, batch_size: int,
                     mesh: Mesh | None = None, flip: bool = False, variables=None, key=None):
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

    def views(variables, x, batch_key):
        f = encode if variables is None else functools.partial(encode, variables)
        f = f if batch_key is None else functools.partial(f, key=batch_key)
        return (f(x), f(hflip(x))) if flip else f(x)

    layout, replicated = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    # One compile: every call sees a [local_batch·processes, H, W, 3] batch with this sharding.
    compiled = jax.jit(views, in_shardings=(replicated, layout, replicated), out_shardings=layout)

    def step(batch_index, batch):
        batch_key = None if key is None else jax.random.fold_in(key, batch_index)
        return compiled(variables, batch, batch_key)

    n = images.shape[0]
    chunks, pending = [], None
    for i, start in enumerate(range(0, n, local_batch)):
        batch = _pad_rows(images[start:start + local_batch], local_batch)
        result = step(i, sharding.shard_batch(batch, mesh))
        # Pull the previous batch to the host only after dispatching this one, so the device
        # computes while the host copies.
        if pending is not None:
            chunks.append(_to_host(pending, mesh))
        pending = result
    chunks.append(_to_host(pending, mesh))
    # Drop the padding rows of the last batch.
    return jax.tree.map(lambda *c: np.concatenate(c)[:n].astype(np.float32), *chunks)
