"""Device-side image augmentations in pure JAX (NHWC, keyed randomness, jit/vmap-able).

Conventions
-----------
* Images come from the host as uint8; `to_float` maps them to float32 in [0, 1]. The colour ops
  (jitter, grayscale, blur) expect that [0, 1] float range, as torchvision's tensor ops do.
* Single-image functions take `(key, image)` with `image` of shape [H, W, C]. Every photometric op
  also accepts a *group* of views [..., H, W, C]: one random draw is then shared by the whole group,
  and the contrast mean is taken over the whole group (OBoW draws the photometric augmentation of
  its 96x96 patches once, on the 256x256 image they are cut from).
* `*_batch` functions split the key into one key per image (`jax.random.split(key, B)`) and vmap.
* Geometric ops that only select pixels (flip, rot90, crops, patches, cutmix) keep the dtype;
  resampling ops (`resize`, `resized_crop`, `random_resized_crop`) return float32 on the *input's*
  value scale (uint8 in -> float32 in 0..255; call `to_float` before or after as needed).

Reference semantics: torchvision transforms (ColorJitter, RandomGrayscale, RandomHorizontalFlip,
RandomCrop, RandomResizedCrop, CenterCrop, Resize) and PIL (`ImageFilter.GaussianBlur`, bilinear
resize), which are what the RotNet / OBoW PyTorch code used. Deviations are stated where they occur.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RotNet's CIFAR statistics (FeatureLearningRotNet), given there on the 0..255 scale.
CIFAR_MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))
# ITU-R 601 luma, as PIL's convert("L") (torchvision's tensor path uses 0.2989 for red).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# ColorJitter op ids, in torchvision's numbering of `fn_idx`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# PIL's GaussianBlur is this many box-blur passes per axis.
PIL_BLUR_PASSES = 3


# --------------------------------------------------------------------------------------------
# Helpers


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


def _pair(size, name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{name}: expected a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _check_rank(image, rank: int, name: str, what: str):
    if image.ndim != rank:
        raise ValueError(f"{name}: expected {what} (rank {rank}), got shape {image.shape}")


def _check_float_rgb(image, name: str):
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected float images in [0, 1] (use to_float), got {image.dtype}")
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected RGB images [..., H, W, 3], got shape {image.shape}")


def _check_prob(p, name: str):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p!r}")


def _coin(key, p):
    """True with probability p (torchvision draws torch.rand(1) < p)."""
    return jax.random.uniform(key) < p


def random_apply(key, fn: Callable, image, p: float):
    """Apply `fn(image)` with probability p (torchvision RandomApply), else return image unchanged.

    lax.cond runs one branch when not batched; under vmap it becomes a select of both.
    """
    _check_prob(p, "random_apply.p")
    return lax.cond(_coin(key, p), fn, lambda x: x, image)


# --------------------------------------------------------------------------------------------
# Value range


def to_float(x):
    """uint8 images in [0, 255] -> float32 in [0, 1]."""
    if x.dtype != jnp.uint8:
        raise ValueError(f"to_float: expected uint8 images, got dtype {x.dtype}")
    return x.astype(jnp.float32) / 255.0


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """Per-channel (x - mean) / std on the last axis (torchvision Normalize, NHWC)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"normalize: expected float images (use to_float first), got {x.dtype}")
    if len(mean) != x.shape[-1] or len(std) != x.shape[-1]:
        raise ValueError(
            f"normalize: mean/std need {x.shape[-1]} entries (channels), "
            f"got {len(mean)}/{len(std)}")
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


# --------------------------------------------------------------------------------------------
# RotNet rotations


def rotate4(images):
    """All four rotations (0, 90, 180, 270 degrees counter-clockwise) of every image (RotNet).

    images [B, H, W, C] with H == W -> (rotated [4B, H, W, C], labels int32 [4B]), image-major:
    image 0 at rotations 0..3, then image 1, ... Rotation k is np.rot90(image, k): exact, no
    interpolation.
    """
    _check_rank(images, 4, "rotate4.images", "[B, H, W, C]")
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
    _check_prob(p, "random_flip.p")
    return jnp.where(_coin(key, p), hflip(image), image)


random_flip_batch = per_image(random_flip)


# --------------------------------------------------------------------------------------------
# Colour (torchvision's float-tensor formulas)


def rgb_to_grayscale(image):
    """Luma 0.299 R + 0.587 G + 0.114 B of [..., 3] -> [..., 1]."""
    return jnp.sum(image * jnp.asarray(GRAY_WEIGHTS, image.dtype), axis=-1, keepdims=True)


def _blend(image, other, factor):
    """torchvision _blend for floats: factor * image + (1 - factor) * other, clamped to [0, 1]."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
    """Multiply by `factor` (blend with black), clamp to [0, 1]."""
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image, factor):
    """Blend with the mean grey level (one scalar over the image, or over a group of views)."""
    return _blend(image, jnp.mean(rgb_to_grayscale(image)), factor)


def adjust_saturation(image, factor):
    """Blend each pixel with its own grey level."""
    return _blend(image, rgb_to_grayscale(image), factor)


def rgb_to_hsv(image):
    """RGB [..., 3] in [0, 1] -> (h, s, v), each [...], h in [0, 1) (colorsys convention)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.max(image, axis=-1)
    minc = jnp.min(image, axis=-1)
    chroma = maxc - minc
    grey = chroma == 0
    # Guarded divisions: grey pixels have s = 0 and h = 0, and must not produce NaN gradients.
    s = jnp.where(grey, 0.0, chroma / jnp.where(grey, 1.0, maxc))
    safe = jnp.where(grey, 1.0, chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h / 6.0, 1.0)
    return h, s, maxc


def hsv_to_rgb(h, s, v):
    """(h, s, v) each [...] -> RGB [..., 3] (the sector formula of colorsys / torchvision)."""
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    sector = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # Rows: the value of (r, g, b) in each of the six hue sectors.
    table = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    channels = [jnp.choose(sector, row, mode="clip") for row in table]
    return jnp.stack(channels, axis=-1)


def adjust_hue(image, factor):
    """Shift hue by `factor` in [-0.5, 0.5] turns: RGB -> HSV, h = (h + factor) mod 1, -> RGB."""
    h, s, v = rgb_to_hsv(image)
    return hsv_to_rgb(jnp.mod(h + factor, 1.0), s, v)


# The ColorJitter ops, indexed by op id (BRIGHTNESS, CONTRAST, SATURATION, HUE).
COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _check_jitter(brightness, contrast, saturation, hue):
    for name, value in (("brightness", brightness), ("contrast", contrast),
                        ("saturation", saturation)):
        if not value >= 0:
            raise ValueError(f"color_jitter.{name}: expected a non-negative number, got {value!r}")
    if not 0 <= hue <= 0.5:
        raise ValueError(f"color_jitter.hue: expected a number in [0, 0.5], got {hue!r}")


def jitter_params(key, brightness: float, contrast: float, saturation: float, hue: float):
    """torchvision ColorJitter.get_params: (order int32 [4], factors float32 [4]).

    order is a random permutation of (brightness, contrast, saturation, hue) ids; factors are
    b, c, s ~ U[max(0, 1 - x), 1 + x] and h ~ U[-hue, hue], indexed by op id.
    """
    _check_jitter(brightness, contrast, saturation, hue)
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
    order = jax.random.permutation(k_order, 4)

    def around_one(k, x):
        return jax.random.uniform(k, minval=max(0.0, 1.0 - x), maxval=1.0 + x)

    factors = jnp.stack([around_one(k_b, brightness), around_one(k_c, contrast),
                         around_one(k_s, saturation),
                         jax.random.uniform(k_h, minval=-hue, maxval=hue)])
    return order.astype(jnp.int32), factors


def apply_color_jitter(image, order, factors, enabled: Sequence[bool] = (True,) * 4):
    """Apply the four colour ops in `order` with `factors` (both indexed by op id).

    `enabled` (static) turns ops off, as torchvision does for a strength of 0.
    """
    def branch(op_id):
        if not enabled[op_id]:
            return lambda x, f: x
        return lambda x, f: COLOR_OPS[op_id](x, f[op_id])

    branches = [branch(op_id) for op_id in range(4)]
    for position in range(4):
        image = lax.switch(order[position], branches, image, factors)
    return image


def color_jitter(key, image, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1):
    """torchvision ColorJitter on float [..., H, W, 3] in [0, 1]: four ops in a random order."""
    _check_float_rgb(image, "color_jitter.image")
    order, factors = jitter_params(key, brightness, contrast, saturation, hue)
    enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
    return apply_color_jitter(image, order, factors, enabled)


color_jitter_batch = per_image(color_jitter)


def grayscale(image):
    """Three-channel grey image of float RGB [..., 3]."""
    return jnp.broadcast_to(rgb_to_grayscale(image), image.shape)


def random_grayscale(key, image, p: float = 0.1):
    """torchvision RandomGrayscale: 3-channel grey with probability p."""
    _check_prob(p, "random_grayscale.p")
    _check_float_rgb(image, "random_grayscale.image")
    return jnp.where(_coin(key, p), grayscale(image), image)


random_grayscale_batch = per_image(random_grayscale)


# --------------------------------------------------------------------------------------------
# Gaussian blur, as PIL ImageFilter.GaussianBlur(radius=sigma)
#
# PIL approximates a Gaussian of standard deviation sigma by 3 passes of a box blur per axis
# (horizontal passes first, then vertical), each box of *fractional* radius r = l + a
# (Gwosdek et al. 2011, "Theoretical foundations of Gaussian convolution by extended box
# filtering"): weight 1/(2r+1) on the 2l+1 central taps and a/(2r+1) on the two taps at
# distance l+1, so the three passes have variance exactly sigma^2. Edges are replicated.
# We do the same passes in float32. PIL computes each pass in 2^-24 fixed point and rounds to
# uint8 after every pass; that rounding is the only residual difference. tests/test_augment.py
# checks a fixed-point NumPy model against PIL (bit-exact), our float passes against the same
# model without rounding (1e-3 on the 0..255 scale), and measures float vs PIL on a photo:
# |diff| < 3/255, mean < 0.8/255, largest for small sigma where the per-pass rounding cancels a
# change of less than half a grey level per pass.
# (A sampled Gaussian kernel is not a substitute: for sigma < 1 it blurs much less than PIL.)


def pil_box_radius(sigma, passes: int = PIL_BLUR_PASSES):
    """Fractional box radius r = l + a of one of PIL's `passes` box blurs for std sigma."""
    var = sigma * sigma / passes
    box_len = jnp.sqrt(12.0 * var + 1.0)
    l = jnp.floor((box_len - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    return l + a


def _max_box_taps(max_sigma: float, passes: int) -> int:
    """Static half-width (l_max + 1) of the box kernel for every sigma <= max_sigma."""
    var = max_sigma * max_sigma / passes
    return int(math.floor((math.sqrt(12.0 * var + 1.0) - 1.0) / 2.0)) + 1


def _box_pass(x, radius, half: int, axis: int):
    """One fractional box blur along `axis`, edges replicated; `half` static taps each side."""
    l = jnp.floor(radius)
    norm = 1.0 / (2.0 * radius + 1.0)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (half, half)
    xp = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    out = jnp.zeros_like(x)
    for k in range(-half, half + 1):
        weight = jnp.where(abs(k) <= l, norm, jnp.where(abs(k) == l + 1, (radius - l) * norm, 0.0))
        out = out + weight * lax.slice_in_dim(xp, half + k, half + k + n, axis=axis)
    return out


def gaussian_blur(image, sigma, *, max_sigma: float | None = None):
    """PIL `ImageFilter.GaussianBlur(radius=sigma)` on float [..., H, W, C] in [0, 1].

    `sigma` may be traced (e.g. random); the kernel width is then fixed by the static `max_sigma`
    (required when sigma is not a concrete number). Edges are replicated, as in PIL.
    """
    if max_sigma is None:
        try:
            max_sigma = float(sigma)
        except (TypeError, jax.errors.ConcretizationTypeError):
            raise ValueError("gaussian_blur: sigma is traced; pass max_sigma= (a static upper "
                             "bound on sigma) so the kernel width is fixed") from None
    if not max_sigma >= 0:
        raise ValueError(f"gaussian_blur.sigma: expected sigma >= 0, got {max_sigma!r}")
    if image.ndim < 3:
        raise ValueError(f"gaussian_blur.image: expected [..., H, W, C], got shape {image.shape}")
    half = _max_box_taps(max_sigma, PIL_BLUR_PASSES)
    radius = pil_box_radius(jnp.asarray(sigma, jnp.float32))
    x = image.astype(jnp.float32)
    for axis in (-2, -3):  # PIL: all horizontal passes, then all vertical passes
        for _ in range(PIL_BLUR_PASSES):
            x = _box_pass(x, radius, half, axis=x.ndim + axis)
    return x.astype(image.dtype) if jnp.issubdtype(image.dtype, jnp.floating) else x


def random_blur(key, image, p: float = 0.5, sigma_min: float = 0.1, sigma_max: float = 2.0):
    """OBoW's RandomApply(GaussianBlur(sigma ~ U[sigma_min, sigma_max]), p)."""
    _check_prob(p, "random_blur.p")
    if not 0 <= sigma_min <= sigma_max:
        raise ValueError(f"random_blur: expected 0 <= sigma_min <= sigma_max, got "
                         f"{sigma_min!r}, {sigma_max!r}")
    k_apply, k_sigma = jax.random.split(key)
    sigma = jax.random.uniform(k_sigma, minval=sigma_min, maxval=sigma_max)
    blur = functools.partial(gaussian_blur, sigma=sigma, max_sigma=sigma_max)
    return random_apply(k_apply, blur, image, p)


random_blur_batch = per_image(random_blur)


# --------------------------------------------------------------------------------------------
# Geometric ops


def random_crop_params(key, height: int, width: int, size, padding: int):
    """torchvision RandomCrop.get_params on the padded image: (top, left) int32 scalars."""
    th, tw = _pair(size, "random_crop.size")
    ph, pw = height + 2 * padding, width + 2 * padding
    if th > ph or tw > pw:
        raise ValueError(f"random_crop.size: crop {(th, tw)} larger than padded image {(ph, pw)}")
    k_top, k_left = jax.random.split(key)
    top = jax.random.randint(k_top, (), 0, ph - th + 1)
    left = jax.random.randint(k_left, (), 0, pw - tw + 1)
    return top, left


def random_crop_with_padding(key, image, size, padding: int = 4):
    """torchvision RandomCrop(size, padding) with zero padding, on one image [H, W, C]."""
    _check_rank(image, 3, "random_crop_with_padding.image", "[H, W, C]")
    if padding < 0:
        raise ValueError(f"random_crop_with_padding.padding: expected >= 0, got {padding!r}")
    th, tw = _pair(size, "random_crop_with_padding.size")
    h, w, c = image.shape
    top, left = random_crop_params(key, h, w, (th, tw), padding)
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return lax.dynamic_slice(padded, (top, left, 0), (th, tw, c))


random_crop_with_padding_batch = per_image(random_crop_with_padding)


def center_crop(image, size):
    """torchvision CenterCrop of [..., H, W, C] (offsets round((H - h) / 2), half to even)."""
    th, tw = _pair(size, "center_crop.size")
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
    _check_rank(image, 3, "resized_crop.image", "[H, W, C]")
    out_h, out_w = _pair(size, "resized_crop.size")
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
    _check_rank(image, 3, "resize.image", "[H, W, C]")
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
    _check_rank(image, 3, "random_resized_crop.image", "[H, W, C]")
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
    _check_rank(image, 3, "jittered_patches.image", "[H, W, C]")
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
    _check_rank(images, 4, "cutmix.images", "[B, H, W, C]")
    _check_rank(targets, 2, "cutmix.targets", "[B, K]")
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


# --------------------------------------------------------------------------------------------
# Composite recipes


def photometric_shared(key, views, *, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                       gray_p: float = 0.2, blur_p: float = 0.5, blur_sigma=(0.1, 2.0),
                       flip: bool = True):
    """One OBoW photometric draw shared by a group of views [..., H, W, 3] (float in [0, 1]).

    Order of the OBoW crop recipe: RandomApply(ColorJitter, jitter_p) -> RandomGrayscale(gray_p)
    -> RandomApply(GaussianBlur(sigma ~ U(blur_sigma)), blur_p) -> RandomHorizontalFlip. With a
    single image [H, W, 3] this is the per-image recipe; with [V, H, W, 3] the contrast mean is
    over the whole group. blur_p=0 skips the blur (OBoW patches); flip=False skips the flip.
    """
    _check_float_rgb(views, "photometric.images")
    if len(jitter) != 4:
        raise ValueError(f"photometric.jitter: expected (brightness, contrast, saturation, hue), "
                         f"got {jitter!r}")
    if len(blur_sigma) != 2:
        raise ValueError(f"photometric.blur_sigma: expected (min, max), got {blur_sigma!r}")
    _check_prob(jitter_p, "photometric.jitter_p")
    # Fixed split: switching one op off does not change the draws of the others.
    k_jitter_on, k_jitter, k_gray, k_blur, k_flip = jax.random.split(key, 5)
    x = views
    if jitter_p > 0 and any(v > 0 for v in jitter):
        x = random_apply(k_jitter_on, lambda y: color_jitter(k_jitter, y, *jitter), x, jitter_p)
    if gray_p > 0:
        x = random_grayscale(k_gray, x, gray_p)
    if blur_p > 0:
        x = random_blur(k_blur, x, blur_p, *blur_sigma)
    if flip:
        x = random_flip(k_flip, x)
    return x


def photometric(key, images, *, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                gray_p: float = 0.2, blur_p: float = 0.5, blur_sigma=(0.1, 2.0),
                flip: bool = True):
    """`photometric_shared` drawn independently for each element of axis 0 of images [B, ...].

    images [B, H, W, 3]: one draw per image (OBoW crops). images [B, V, H, W, 3]: one draw per
    image shared by its V views (OBoW patches).
    """
    recipe = functools.partial(photometric_shared, jitter=jitter, jitter_p=jitter_p,
                               gray_p=gray_p, blur_p=blur_p, blur_sigma=blur_sigma, flip=flip)
    return per_image(recipe)(key, images)
