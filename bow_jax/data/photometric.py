"""Photometric augmentation in pure JAX: the colours of a view (float [..., H, W, 3] in [0, 1]).

torchvision's ColorJitter (float-tensor formulas, random op order), RandomGrayscale, PIL's
GaussianBlur (as PIL computes it: three fractional box blurs per axis), and the OBoW recipe
(jitter -> grayscale -> blur -> flip) drawn once per image or once per group of views.

Every op also accepts a *group* of views [..., H, W, 3]: one random draw is then shared by the
whole group, and the contrast mean is taken over the whole group (OBoW draws the photometric
augmentation of its 96x96 patches once, on the 256x256 image they are cut from;
github.com/valeoai/obow). Expects the [0, 1] float range of `augment.to_float`, as torchvision's
tensor ops do.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bow_jax.data.geometric import random_flip
from bow_jax.data.keyed import check_float_rgb, check_prob, coin, per_image, random_apply

# ITU-R 601 luma, as PIL's convert("L") (torchvision's tensor path uses 0.2989 for red).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# ColorJitter op ids, in torchvision's numbering of `fn_idx`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# PIL's GaussianBlur is this many box-blur passes per axis.
PIL_BLUR_PASSES = 3


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
    check_float_rgb(image, "color_jitter.image")
    order, factors = jitter_params(key, brightness, contrast, saturation, hue)
    enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
    return apply_color_jitter(image, order, factors, enabled)


color_jitter_batch = per_image(color_jitter)


def grayscale(image):
    """Three-channel grey image of float RGB [..., 3]."""
    return jnp.broadcast_to(rgb_to_grayscale(image), image.shape)


def random_grayscale(key, image, p: float = 0.1):
    """torchvision RandomGrayscale: 3-channel grey with probability p."""
    check_prob(p, "random_grayscale.p")
    check_float_rgb(image, "random_grayscale.image")
    return jnp.where(coin(key, p), grayscale(image), image)


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
    check_prob(p, "random_blur.p")
    if not 0 <= sigma_min <= sigma_max:
        raise ValueError(f"random_blur: expected 0 <= sigma_min <= sigma_max, got "
                         f"{sigma_min!r}, {sigma_max!r}")
    k_apply, k_sigma = jax.random.split(key)
    sigma = jax.random.uniform(k_sigma, minval=sigma_min, maxval=sigma_max)
    blur = functools.partial(gaussian_blur, sigma=sigma, max_sigma=sigma_max)
    return random_apply(k_apply, blur, image, p)


random_blur_batch = per_image(random_blur)


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
    check_float_rgb(views, "photometric.images")
    if len(jitter) != 4:
        raise ValueError(f"photometric.jitter: expected (brightness, contrast, saturation, hue), "
                         f"got {jitter!r}")
    if len(blur_sigma) != 2:
        raise ValueError(f"photometric.blur_sigma: expected (min, max), got {blur_sigma!r}")
    check_prob(jitter_p, "photometric.jitter_p")
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
