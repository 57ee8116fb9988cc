"""Device-side image augmentation in pure JAX (NHWC, keyed randomness, jit/vmap-able): the value
range of images, and one namespace for the `geometric` and `photometric` ops.

Conventions
-----------
* Images come from the host as uint8; `to_float` maps them to float32 in [0, 1] (what the colour
  ops of `photometric` expect, as torchvision's tensor ops do); the resampling ops of
  `geometric` take and return uint8 (rounded as PIL rounds);
  `normalize` makes the network input.
* Single-image functions take `(key, image)` with `image` of shape [H, W, C]; `*_batch` functions
  split the key into one key per image (`jax.random.split(key, B)`) and vmap (`keyed.per_image`).
* `geometric`: which pixels a view sees (flip, rotations, crops, resize, patches, CutMix);
  `photometric`: its colours (jitter, grayscale, blur, the OBoW recipe). Both are re-exported
  here under their own names.

Reference semantics: torchvision transforms and PIL (bilinear resize, GaussianBlur), which the
RotNet / BoWNet / OBoW PyTorch code used. Deviations are stated where they occur.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

# The geometric and photometric ops, under the names their callers have always used.
from bow_jax.data.geometric import (  # noqa: F401
    axis_taps, center_crop, cutmix, cutmix_params, hflip, jittered_patch_params, jittered_patches,
    jittered_patches_batch, random_crop_params, random_crop_with_padding,
    random_crop_with_padding_batch, random_flip, random_flip_batch, random_resized_crop,
    random_resized_crop_batch, random_resized_crop_params, resample, resize, resize_center_crop,
    resize_random_crop, resized_box, resized_window, rotate4)
from bow_jax.data.keyed import per_image, random_apply  # noqa: F401
from bow_jax.data.photometric import (  # noqa: F401
    BRIGHTNESS, COLOR_OPS, CONTRAST, GRAY_WEIGHTS, HUE, PIL_BLUR_PASSES, SATURATION,
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, apply_color_jitter,
    color_jitter, color_jitter_batch, gaussian_blur, grayscale, hsv_to_rgb, jitter_params,
    photometric, photometric_shared, pil_box_radius, random_blur, random_blur_batch,
    random_grayscale, random_grayscale_batch, rgb_to_grayscale, rgb_to_hsv)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RotNet's CIFAR statistics (FeatureLearningRotNet), given there on the 0..255 scale.
CIFAR_MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))


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
