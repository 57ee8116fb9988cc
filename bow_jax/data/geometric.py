"""Geometric views in pure JAX: which pixels of an image a view sees (NHWC, keyed, jit/vmap-able).

Flip, RotNet's exact rotations, RandomCrop with padding, CenterCrop, antialiased bilinear Resize
and RandomResizedCrop (PIL semantics), OBoW's jittered grid patches, and CutMix (Yun et al.,
ICCV 2019) with target mixing.

Ops that only select pixels (flip, rot90, crops, patches, cutmix) keep the dtype; resampling ops
(`resize`, `resized_crop`, `random_resized_crop`) return float32 on the *input's* value scale
(uint8 in -> float32 in 0..255; `augment.to_uint8` rounds back). `*_batch` functions take one key
per image (`keyed.per_image`).

Reference semantics: torchvision transforms (RandomHorizontalFlip, RandomCrop, RandomResizedCrop,
CenterCrop, Resize) and PIL's bilinear resize, which the RotNet / BoWNet / OBoW PyTorch code used
(github.com/gidariss/FeatureLearningRotNet, github.com/valeoai/obow).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bow_jax.data.keyed import as_pair, check_prob, check_rank, coin, per_image

# RotNet rotations


def rotate4(images):
    """All four rotations (0, 90, 180, 270 degrees counter-clockwise) of every image (RotNet).

    images [B, H, W, C] with H == W -> (rotated [4B, H, W, C], labels int32 [4B]), image-major:
    image 0 at rotations 0..3, then image 1, ... Rotation k is np.rot90(image, k): exact, no
    interpolation.
    """
    check_rank(images, 4, "rotate4.images", "[B, H, W, C]")
    b, h, w = images.shape[:3]
    if h != w:
        raise ValueError(f"rotate4.images: rotations need square images, got H={h}, W={w}")
    rotated = jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(4)], axis=1)
    labels = jnp.tile(jnp.arange(4, dtype=jnp.int32), b)
    return rotated.reshape((4 * b,) + images.shape[1:]), labels


# --------------------------------------------------------------------------------------------
# Flip


def hflip(image):
    """Horizontal (left-right) flip of [..., H, W, C]."""
    return jnp.flip(image, axis=-2)


def random_flip(key, image, p: float = 0.5):
    """torchvision RandomHorizontalFlip: flip [..., H, W, C] with probability p."""
    check_prob(p, "random_flip.p")
    return jnp.where(coin(key, p), hflip(image), image)


random_flip_batch = per_image(random_flip)

# --------------------------------------------------------------------------------------------
# Geometric ops


def random_crop_params(key, height: int, width: int, size, padding: int):
    """torchvision RandomCrop.get_params on the padded image: (top, left) int32 scalars."""
    th, tw = as_pair(size, "random_crop.size")
    ph, pw = height + 2 * padding, width + 2 * padding
    if th > ph or tw > pw:
        raise ValueError(f"random_crop.size: crop {(th, tw)} larger than padded image {(ph, pw)}")
    k_top, k_left = jax.random.split(key)
    top = jax.random.randint(k_top, (), 0, ph - th + 1)
    left = jax.random.randint(k_left, (), 0, pw - tw + 1)
    return top, left


def random_crop_with_padding(key, image, size, padding: int = 4):
    """torchvision RandomCrop(size, padding) with zero padding, on one image [H, W, C]."""
    check_rank(image, 3, "random_crop_with_padding.image", "[H, W, C]")
    if padding < 0:
        raise ValueError(f"random_crop_with_padding.padding: expected >= 0, got {padding!r}")
    th, tw = as_pair(size, "random_crop_with_padding.size")
    h, w, c = image.shape
    top, left = random_crop_params(key, h, w, (th, tw), padding)
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return lax.dynamic_slice(padded, (top, left, 0), (th, tw, c))


random_crop_with_padding_batch = per_image(random_crop_with_padding)


def center_crop(image, size):
    """torchvision CenterCrop of [..., H, W, C] (offsets round((H - h) / 2), half to even)."""
    th, tw = as_pair(size, "center_crop.size")
    h, w = image.shape[-3], image.shape[-2]
    if th > h or tw > w:
        raise ValueError(f"center_crop.size: crop {(th, tw)} larger than the image {(h, w)}")
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return image[..., top:top + th, left:left + tw, :]


def _bilinear_matrix(in_size: int, out_size: int, start, length):
    """[out_size, in_size] weights of PIL's antialiased bilinear resize of the window
    [start, start + length) of an axis to out_size samples.

    PIL's triangle filter, widened by the downscale factor (antialias), sampled at pixel centres
    and renormalised over the pixels inside the window, as when the window is cropped first.
    """
    start = jnp.asarray(start, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    pixels = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels[None, :] + 0.5 - centres[:, None]) / support)
    inside = (pixels >= start) & (pixels < start + length)
    weights = jnp.where(inside[None, :], weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(image, top, left, height, width, size):
    """Crop the box (top, left, height, width) of [H, W, C] and resize it bilinearly (antialiased,
    PIL semantics) to `size`; box values may be traced. Returns float32 on the input's scale."""
    check_rank(image, 3, "resized_crop.image", "[H, W, C]")
    out_h, out_w = as_pair(size, "resized_crop.size")
    rows = _bilinear_matrix(image.shape[0], out_h, top, height)
    cols = _bilinear_matrix(image.shape[1], out_w, left, width)
    # HIGHEST: GPUs would otherwise run float32 matmuls in TF32 (~1e-3 relative error).
    return jnp.einsum("oh,hwc,pw->opc", rows, image.astype(jnp.float32), cols,
                      precision=lax.Precision.HIGHEST)


def resize(image, size):
    """torchvision Resize with bilinear antialiasing (PIL semantics) of [H, W, C].

    An int `size` sets the shorter side (longer side int(size * long / short)); (h, w) is exact.
    Returns float32 on the input's scale.
    """
    check_rank(image, 3, "resize.image", "[H, W, C]")
    h, w = image.shape[:2]
    if isinstance(size, (int, np.integer)):
        if size <= 0:
            raise ValueError(f"resize.size: expected a positive int, got {size!r}")
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        size = (size, new_long) if h <= w else (new_long, size)
    return resized_crop(image, 0, 0, h, w, size)


def _fallback_box(height: int, width: int, ratio) -> tuple[int, int]:
    """torchvision's centre-crop fallback box size (h, w) after ten failed attempts."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        h, w = height, width
    return h, w


def random_resized_crop_params(key, height: int, width: int, scale=(0.08, 1.0),
                               ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10):
    """torchvision RandomResizedCrop.get_params with fixed shapes: (top, left, h, w) int32.

    All `attempts` (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)) are drawn at once and
    the first one that fits is kept; if none fits, torchvision's centre crop clamped to `ratio`.
    """
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"random_resized_crop.scale: expected 0 < min <= max, got {scale!r}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"random_resized_crop.ratio: expected 0 < min <= max, got {ratio!r}")
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, (attempts,), minval=scale[0],
                                               maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    found = jnp.any(fits)
    fallback_h, fallback_w = _fallback_box(height, width, ratio)
    box_h = jnp.where(found, h[first], fallback_h)
    box_w = jnp.where(found, w[first], fallback_w)
    top = jnp.where(found, jax.random.randint(k_top, (), 0, height - box_h + 1),
                    (height - fallback_h) // 2)
    left = jnp.where(found, jax.random.randint(k_left, (), 0, width - box_w + 1),
                     (width - fallback_w) // 2)
    return top, left, box_h, box_w


def random_resized_crop(key, image, out_size, scale=(0.08, 1.0),
                        ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision RandomResizedCrop(out_size, scale, ratio, bilinear) on one image [H, W, C].

    Returns float32 on the input's scale (uint8 in -> 0..255 floats).
    """
    check_rank(image, 3, "random_resized_crop.image", "[H, W, C]")
    top, left, h, w = random_resized_crop_params(key, image.shape[0], image.shape[1], scale, ratio)
    return resized_crop(image, top, left, h, w, out_size)


random_resized_crop_batch = per_image(random_resized_crop)


def jittered_patch_params(key, height: int, width: int, *, patch_size: int = 96,
                          jitter: int = 24, keep: int = 5, grid: int = 3):
    """Top-left corners (tops, lefts) int32 [keep] of OBoW's jittered grid patches.

    step = (S - patch - jitter) // (grid - 1); patch (i, j) starts at
    (i * step_y + U{0..jitter}, j * step_x + U{0..jitter}); `keep` of the grid^2 patches are kept,
    in the order of a random permutation (OBoW CropImagePatches).
    """
    if grid < 1 or not 1 <= keep <= grid * grid:
        raise ValueError(f"jittered_patches: expected grid >= 1 and 1 <= keep <= grid^2, got "
                         f"grid={grid}, keep={keep}")
    if jitter < 0 or height - patch_size - jitter < 0 or width - patch_size - jitter < 0:
        raise ValueError(f"jittered_patches: patch_size + jitter = {patch_size}+{jitter} does not "
                         f"fit the image {(height, width)}")
    step_y = (height - patch_size - jitter) // max(grid - 1, 1)
    step_x = (width - patch_size - jitter) // max(grid - 1, 1)
    k_jitter, k_keep = jax.random.split(key)
    offsets = jax.random.randint(k_jitter, (grid * grid, 2), 0, jitter + 1)
    cell = jnp.arange(grid * grid)
    tops = (cell // grid) * step_y + offsets[:, 0]
    lefts = (cell % grid) * step_x + offsets[:, 1]
    kept = jax.random.permutation(k_keep, grid * grid)[:keep]
    return tops[kept].astype(jnp.int32), lefts[kept].astype(jnp.int32)


def jittered_patches(key, image, *, patch_size: int = 96, jitter: int = 24, keep: int = 5,
                     grid: int = 3):
    """OBoW patches: image [S, S, C] -> [keep, patch_size, patch_size, C].

    Positions and the kept subset as in `jittered_patch_params`.
    """
    check_rank(image, 3, "jittered_patches.image", "[H, W, C]")
    h, w, c = image.shape
    tops, lefts = jittered_patch_params(key, h, w, patch_size=patch_size, jitter=jitter,
                                        keep=keep, grid=grid)
    cut = lambda t, l: lax.dynamic_slice(image, (t, l, 0), (patch_size, patch_size, c))
    return jax.vmap(cut)(tops, lefts)


jittered_patches_batch = per_image(jittered_patches)


# --------------------------------------------------------------------------------------------
# CutMix (Yun et al. 2019), used by BoWNet with BoW targets


def cutmix_params(key, batch: int, height: int, width: int, beta: float = 1.0):
    """(partner permutation [B], box (y1, y2, x1, x2)) of CutMix, one box for the whole batch.

    lambda ~ Beta(beta, beta); box side = int(side * sqrt(1 - lambda)) at a uniform centre, half
    sides cut_h // 2 and cut_w // 2 each way, clipped to the image (the CutMix reference code).
    """
    if not beta > 0:
        raise ValueError(f"cutmix.beta: expected beta > 0, got {beta!r}")
    k_lam, k_perm, k_y, k_x = jax.random.split(key, 4)
    lam = jax.random.beta(k_lam, beta, beta)
    cut = jnp.sqrt(1.0 - lam)
    half_h = jnp.floor(height * cut).astype(jnp.int32) // 2
    half_w = jnp.floor(width * cut).astype(jnp.int32) // 2
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    box = (jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height),
           jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width))
    return jax.random.permutation(k_perm, batch), box


def cutmix(key, images, targets, beta: float = 1.0):
    """CutMix a batch: paste a box from a shuffled partner, mix targets by the pasted area.

    images [B, H, W, C], targets [B, K] (one-hot or BoW). Output image = A outside the box, B (the
    partner) inside; target = lam * y(A) + (1 - lam) * y(B) with lam = 1 - box_area / (H W).
    """
    images, targets = jnp.asarray(images), jnp.asarray(targets)
    check_rank(images, 4, "cutmix.images", "[B, H, W, C]")
    check_rank(targets, 2, "cutmix.targets", "[B, K]")
    b, h, w = images.shape[:3]
    if targets.shape[0] != b:
        raise ValueError(f"cutmix.targets: expected {b} rows (batch), got {targets.shape[0]}")
    partner, (y1, y2, x1, x2) = cutmix_params(key, b, h, w, beta)
    rows, cols = jnp.arange(h), jnp.arange(w)
    inside = (((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :])
    mixed = jnp.where(inside[None, :, :, None], images[partner], images)
    lam = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (h * w)
    lam = lam.astype(targets.dtype)
    return mixed, lam * targets + (1.0 - lam) * targets[partner]
