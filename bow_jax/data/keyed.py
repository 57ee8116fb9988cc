"""Keyed randomness and argument checks shared by the device-side augmentations
(`geometric`, `photometric`): one key per image, torchvision's coin flips, RandomApply.

Single-image functions take `(key, image)`; `per_image` lifts them to a batch with one key per
image (`jax.random.split(key, B)`), so a batch's draws are a function of one key.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def per_image(fn: Callable) -> Callable:
    """Lift `fn(key, image, *args, **kwargs)` to a batch [B, ...], one independent key per image."""

    def batched(key, images, *args, **kwargs):
        keys = jax.random.split(key, images.shape[0])
        return jax.vmap(lambda k, x: fn(k, x, *args, **kwargs))(keys, images)

    name = getattr(fn, "__name__", "fn")
    batched.__name__ = f"{name}_batch"
    batched.__doc__ = (
        f"Batch version of `{name}`: images [B, ...], one key per image from "
        f"jax.random.split(key, B).")
    return batched


def as_pair(size, name: str) -> tuple[int, int]:
    """(height, width) of an int or a pair; ValueError naming `name` otherwise."""
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{name}: expected a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def check_rank(image, rank: int, name: str, what: str):
    """ValueError naming `name` unless `image` has rank `rank` (`what` describes the shape)."""
    if image.ndim != rank:
        raise ValueError(f"{name}: expected {what} (rank {rank}), got shape {image.shape}")


def check_float_rgb(image, name: str):
    """ValueError naming `name` unless `image` is float RGB [..., H, W, 3]."""
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected float images in [0, 1] (use to_float), got {image.dtype}")
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected RGB images [..., H, W, 3], got shape {image.shape}")


def check_prob(p, name: str):
    """ValueError naming `name` unless 0 <= p <= 1."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p!r}")


def coin(key, p):
    """True with probability p (torchvision draws torch.rand(1) < p)."""
    return jax.random.uniform(key) < p


def random_apply(key, fn: Callable, image, p: float):
    """Apply `fn(image)` with probability p (torchvision RandomApply), else return image unchanged.

    lax.cond runs one branch when not batched; under vmap it becomes a select of both.
    """
    check_prob(p, "random_apply.p")
    return lax.cond(coin(key, p), fn, lambda x: x, image)

