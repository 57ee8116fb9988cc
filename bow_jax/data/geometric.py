"""Geometric views in pure JAX: which pixels of an image a view sees (NHWC, keyed, jit/vmap-able).

Flip, RotNet's exact rotations, RandomCrop with padding, CenterCrop, antialiased bilinear Resize
and RandomResizedCrop (PIL semantics), OBoW's jittered grid patches, and CutMix (Yun et al.,
ICCV 2019) with target mixing.

Ops that only select pixels (flip, rot90, crops, patches, cutmix) keep the dtype; resampling ops
(`resized_box`, `resized_window`, `resize_center_crop`, `random_resized_crop`, `resize`) take
uint8 and return uint8, rounded as PIL hands a resized image to the next transform. Views of
images of many sizes read them from a padded *canvas* with their true size (see "Resampling"
below). `*_batch` functions take one key per image (`keyed.per_image`).

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


def random_crop_params(key, height, width, size, padding: int):
    """torchvision RandomCrop.get_params on the zero-padded image: (top, left) int32 scalars,
    uniform over the padded image of (height, width) (ints, or traced: a canvas's true size)."""
    th, tw = as_pair(size, "random_crop.size")
    if isinstance(height, (int, np.integer)) and (th > height + 2 * padding
                                                 or tw > width + 2 * padding):
        raise ValueError(f"random_crop.size: crop {(th, tw)} larger than padded image "
                         f"{(height + 2 * padding, width + 2 * padding)}")
    k_top, k_left = jax.random.split(key)
    top = jax.random.randint(k_top, (), 0, height + 2 * padding - th + 1)
    left = jax.random.randint(k_left, (), 0, width + 2 * padding - tw + 1)
    return top, left


def random_crop_with_padding(key, image, size, padding: int = 4, true_size=None):
    """torchvision RandomCrop(size, padding) with zero padding, on one image [H, W, C] (or the
    true (h, w) image `true_size` in the corner of a canvas: pixels outside it read as zero)."""
    check_rank(image, 3, "random_crop_with_padding.image", "[H, W, C]")
    if padding < 0:
        raise ValueError(f"random_crop_with_padding.padding: expected >= 0, got {padding!r}")
    th, tw = as_pair(size, "random_crop_with_padding.size")
    h, w, c = image.shape if true_size is None else (true_size[0], true_size[1], image.shape[2])
    top, left = random_crop_params(key, h, w, (th, tw), padding)
    margin_h, margin_w = max(padding, th - image.shape[0]), max(padding, tw - image.shape[1])
    padded = jnp.pad(image, ((margin_h, margin_h), (margin_w, margin_w), (0, 0)))
    view = lax.dynamic_slice(padded, (top - padding + margin_h, left - padding + margin_w, 0),
                             (th, tw, c))
    if true_size is None:
        return view
    rows = top - padding + jnp.arange(th)
    cols = left - padding + jnp.arange(tw)
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    return jnp.where(inside[..., None], view, jnp.zeros_like(view))


random_crop_with_padding_batch = per_image(random_crop_with_padding)


def center_crop(image, size):
    """torchvision CenterCrop of [..., H, W, C] (offsets round((H - h) / 2), half to even)."""
    th, tw = as_pair(size, "center_crop.size")
    h, w = image.shape[-3], image.shape[-2]
    if th > h or tw > w:
        raise ValueError(f"center_crop.size: crop {(th, tw)} larger than the image {(h, w)}")
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return image[..., top:top + th, left:left + tw, :]


# --------------------------------------------------------------------------------------------
# Resampling: PIL's antialiased bilinear resize, as a few taps per output pixel.
#
# Images on the device may sit on a *canvas*: uint8 [S_h, S_w, C] holding the true image in its
# top-left [h, w] corner (the host pads streamed images of many sizes into one shape; in-memory
# images are their own canvas). Every view below takes the true size (h, w) (int32, may be
# traced), reads only pixels inside it, and has a static output shape. A resampled output pixel
# sums `taps` input pixels per axis, gathered by index: the taps a PIL filter can reach, so the
# cost is O(output x taps), not O(output x canvas) as a dense resize matrix would be.


def num_taps(max_scale: float) -> int:
    """Taps per output pixel of an axis whose input/output scale is at most `max_scale`: the
    bilinear filter reaches max(1, scale) input pixels on each side of a sample, so an open
    interval of 2 max(1, scale) pixels (+1 for float rounding at its ends)."""
    return int(math.ceil(2.0 * max(1.0, float(max_scale)))) + 1


def axis_taps(out_size: int, start, scale, lo, hi, taps: int):
    """PIL's antialiased bilinear weights along one axis: (index int32 [out_size, taps], weight
    float32 [out_size, taps]).

    Output sample o sits at input coordinate start + (o + 0.5) * scale; the triangle filter is
    widened by max(scale, 1) (antialiasing when shrinking), only pixels in [lo, hi) count, and
    each row of weights is renormalised to sum 1 (PIL's ImagingResample coefficients; `lo, hi` is
    the crop box when PIL crops before resizing, the whole image when it resizes first). Index
    values are clamped into [0, hi) so that a zero weight never gathers outside the image."""
    start, scale = jnp.asarray(start, jnp.float32), jnp.asarray(scale, jnp.float32)
    lo, hi = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
    support = jnp.maximum(scale, 1.0)
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    first = jnp.floor(centres - support + 0.5).astype(jnp.int32)
    index = first[:, None] + jnp.arange(taps, dtype=jnp.int32)[None, :]
    distance = jnp.abs(index.astype(jnp.float32) + 0.5 - centres[:, None]) / support
    inside = (index >= lo) & (index < hi)
    weight = jnp.where(inside, jnp.maximum(0.0, 1.0 - distance), 0.0)
    weight = weight / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1e-12)
    return jnp.clip(index, 0, jnp.maximum(hi - 1, 0)), weight


def _round_pixels(x):
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)  # half up, as PIL's fixed point


def resample(image, rows, cols):
    """Separable resample of a uint8 canvas [S_h, S_w, C] with `axis_taps` (rows: output height,
    cols: output width) -> uint8 [out_h, out_w, C].

    As PIL resizes an 8-bit image: the horizontal pass first, rounded to 8 bits, then the
    vertical pass, rounded (PIL's coefficients are 22-bit fixed point; these are float32, so a
    pixel may differ from PIL's by one grey level). The taps are unrolled into a sum of gathers
    so that XLA fuses each pass into one loop, with no [out, taps, ...] intermediate."""
    check_rank(image, 3, "resample.image", "[H, W, C]")
    (row_index, row_weight), (col_index, col_weight) = rows, cols
    x = image.astype(jnp.float32)
    across = sum(x[:, col_index[:, t], :] * col_weight[None, :, t, None]
                 for t in range(col_index.shape[1]))
    across = _round_pixels(across)
    down = sum(across[row_index[:, t], :, :] * row_weight[:, t, None, None]
               for t in range(row_index.shape[1]))
    return _round_pixels(down).astype(jnp.uint8)


def resized_box(image, box, out_size):
    """torchvision `F.resized_crop` of a PIL image: crop the box (top, left, height, width)
    (int32, may be traced) of a uint8 canvas [S_h, S_w, C], then resize it to `out_size` (int or
    (h, w)) with antialiased bilinear -> uint8 [out_h, out_w, C]. The box must lie inside the
    true image (RandomResizedCrop's boxes do)."""
    check_rank(image, 3, "resized_box.image", "[H, W, C]")
    out_h, out_w = as_pair(out_size, "resized_box.out_size")
    top, left, height, width = (jnp.asarray(v, jnp.int32) for v in box)
    taps_h = num_taps(image.shape[0] / out_h)
    taps_w = num_taps(image.shape[1] / out_w)
    rows = axis_taps(out_h, top, height / out_h, top, top + height, taps_h)
    cols = axis_taps(out_w, left, width / out_w, left, left + width, taps_w)
    return resample(image, rows, cols)


def resized_shape(size, shorter: int):
    """torchvision Resize(shorter) of an image of true size (h, w) (int32, may be traced): the
    shorter side becomes `shorter`, the longer int(shorter * long / short) -> (new_h, new_w)
    int32 (integer division: the exact truncated quotient)."""
    h, w = jnp.asarray(size[0], jnp.int32), jnp.asarray(size[1], jnp.int32)
    short, long = jnp.minimum(h, w), jnp.maximum(h, w)
    new_long = (shorter * long) // short
    return jnp.where(h <= w, shorter, new_long), jnp.where(h <= w, new_long, shorter)


def resized_window(image, size, shorter: int, crop, top, left):
    """torchvision Resize(shorter) then the crop window (top, left) of `crop` (int or (h, w)) of
    the resized image, for a uint8 canvas [S_h, S_w, C] holding an image of true size (h, w):
    uint8 [crop_h, crop_w, C]. One resample: output pixel (i, j) is resized pixel
    (top + i, left + j), whose filter reads the whole image (PIL resizes before cropping).
    `shorter` 0: the true image is resized to `crop` exactly (no crop)."""
    check_rank(image, 3, "resized_window.image", "[H, W, C]")
    crop_h, crop_w = as_pair(crop, "resized_window.crop")
    h, w = jnp.asarray(size[0], jnp.int32), jnp.asarray(size[1], jnp.int32)
    new_h, new_w = resized_shape((h, w), shorter) if shorter else (crop_h, crop_w)
    scale_h, scale_w = h / new_h, w / new_w
    # Rows of a resized image of at least `shorter` (or crop) pixels from at most S input rows.
    least = min(shorter, crop_h, crop_w) if shorter else min(crop_h, crop_w)
    taps_h, taps_w = num_taps(image.shape[0] / least), num_taps(image.shape[1] / least)
    rows = axis_taps(crop_h, top * scale_h, scale_h, 0, h, taps_h)
    cols = axis_taps(crop_w, left * scale_w, scale_w, 0, w, taps_w)
    return resample(image, rows, cols)


def center_offsets(size, shorter: int, crop):
    """torchvision CenterCrop(crop) offsets (top, left) int32 in the image Resize(shorter) makes
    of an image of true size (h, w): round((new - crop) / 2), half to even."""
    crop_h, crop_w = as_pair(crop, "center_offsets.crop")
    new_h, new_w = resized_shape(size, shorter)
    return (jnp.round((new_h - crop_h) / 2.0).astype(jnp.int32),
            jnp.round((new_w - crop_w) / 2.0).astype(jnp.int32))


def resize_center_crop(image, size, shorter: int, crop):
    """torchvision Resize(shorter) + CenterCrop(crop) of the true image of a uint8 canvas ->
    uint8 [crop_h, crop_w, C]; `shorter` 0: Resize((crop_h, crop_w)) of the whole image."""
    top, left = center_offsets(size, shorter, crop) if shorter else (0, 0)
    return resized_window(image, size, shorter, crop, top, left)


def resize_random_crop(key, image, size, shorter: int, crop):
    """torchvision Resize(shorter) + RandomCrop(crop) (no padding) of the true image of a uint8
    canvas -> uint8 [crop_h, crop_w, C] (the RotNet ImageNet view); offsets uniform over the
    resized image."""
    crop_h, crop_w = as_pair(crop, "resize_random_crop.crop")
    new_h, new_w = resized_shape(size, shorter)
    k_top, k_left = jax.random.split(key)
    top = jax.random.randint(k_top, (), 0, new_h - crop_h + 1)
    left = jax.random.randint(k_left, (), 0, new_w - crop_w + 1)
    return resized_window(image, size, shorter, crop, top, left)


def resize(image, size):
    """torchvision Resize (antialiased bilinear, PIL semantics) of a whole uint8 image [H, W, C]
    of static shape -> uint8. An int `size` sets the shorter side (longer side
    int(size * long / short)); (h, w) is exact."""
    check_rank(image, 3, "resize.image", "[H, W, C]")
    h, w = image.shape[:2]
    if isinstance(size, (int, np.integer)):
        if size <= 0:
            raise ValueError(f"resize.size: expected a positive int, got {size!r}")
        short, long = min(h, w), max(h, w)
        new_long = size * long // short
        size = (size, new_long) if h <= w else (new_long, size)
    return resized_window(image, (h, w), 0, size, 0, 0)


def _fallback_box(height, width, ratio):
    """torchvision's centre-crop fallback box size (h, w) int32 after ten failed attempts (height,
    width may be traced)."""
    height, width = jnp.asarray(height, jnp.int32), jnp.asarray(width, jnp.int32)
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    h = jnp.where(narrow, jnp.round(width / min(ratio)).astype(jnp.int32), height)
    w = jnp.where(wide, jnp.round(height * max(ratio)).astype(jnp.int32), width)
    return h, w


def random_resized_crop_params(key, height, width, scale=(0.08, 1.0),
                               ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10):
    """torchvision RandomResizedCrop.get_params with fixed shapes: (top, left, h, w) int32 of an
    image of (height, width) (ints, or int32 traced: the true size on a canvas).

    All `attempts` (area fraction ~ U(scale), log aspect ratio ~ U(log ratio), w =
    round(sqrt(area * aspect)), h = round(sqrt(area / aspect))) are drawn at once and the first
    one that fits is kept; if none fits, torchvision's centre crop clamped to `ratio`.
    """
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"random_resized_crop.scale: expected 0 < min <= max, got {scale!r}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"random_resized_crop.ratio: expected 0 < min <= max, got {ratio!r}")
    height, width = jnp.asarray(height, jnp.int32), jnp.asarray(width, jnp.int32)
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = (height * width) * jax.random.uniform(k_area, (attempts,), minval=scale[0],
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
                        ratio=(3.0 / 4.0, 4.0 / 3.0), size=None):
    """torchvision RandomResizedCrop(out_size, scale, ratio, bilinear) of one uint8 image
    [H, W, C] -> uint8 [out_h, out_w, C]. `size`: the true (h, w) when the image sits on a canvas
    (default: the whole array)."""
    check_rank(image, 3, "random_resized_crop.image", "[H, W, C]")
    h, w = image.shape[:2] if size is None else (size[0], size[1])
    box = random_resized_crop_params(key, h, w, scale, ratio)
    return resized_box(image, box, out_size)


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
