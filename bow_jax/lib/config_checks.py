"""Checks of config values that hold several numbers or names (crop scales, aspect ratios, colour
jitter, blur sigmas, feature names), made before anything compiles.

ml_collections turns a command-line value into the field's type as best it can:
`--config.obow.crop_scale=(0.5)` becomes the 1-tuple (0.5,), `--config.obow.crop_scale=big` the
1-tuple ('big',). Without these checks such a value passes the config and fails at the first
batch, deep in a traced function (`IndexError: tuple index out of range`). Each check raises
`InputError` naming the field, its value and what is expected, and returns the value as a tuple.
"""
import math
from typing import Any, Optional

from bow_jax.lib.errors import InputError


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def number_tuple(value: Any, field: str, length: int, expected: str) -> tuple:
    """`value` as a tuple of `length` finite numbers; InputError naming `field`, the value and
    `expected` (what the numbers mean) otherwise."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(items) != length or not all(_is_number(x) for x in items):
        raise InputError(f"{field}={value!r}; expected {length} numbers: {expected}.")
    return tuple(float(x) for x in items)


def interval(value: Any, field: str, low: float = 0.0, high: Optional[float] = None,
             meaning: str = "(min, max)") -> tuple:
    """(lo, hi) with low < lo <= hi (<= high when given): a sampling range such as a crop's
    area fraction (low 0, high 1) or an aspect ratio (low 0). InputError naming `field`."""
    bound = f"{low:g} < min <= max" + (f" <= {high:g}" if high is not None else "")
    lo, hi = number_tuple(value, field, 2, f"{meaning} with {bound}")
    if not (low < lo <= hi and (high is None or hi <= high)):
        raise InputError(f"{field}={value!r}; expected {meaning} with {bound}.")
    return lo, hi


def probability(value: Any, field: str) -> float:
    """A probability in [0, 1]; InputError naming `field` otherwise."""
    if not _is_number(value) or not 0 <= value <= 1:
        raise InputError(f"{field}={value!r}; expected a probability in [0, 1].")
    return float(value)


def color_jitter(value: Any, field: str) -> tuple:
    """torchvision's ColorJitter strengths (brightness, contrast, saturation, hue): the first
    three >= 0, hue in [0, 0.5]. InputError naming `field` otherwise."""
    expected = "(brightness, contrast, saturation, hue), the first three >= 0, hue in [0, 0.5]"
    strengths = number_tuple(value, field, 4, expected)
    if min(strengths[:3]) < 0 or not 0 <= strengths[3] <= 0.5:
        raise InputError(f"{field}={value!r}; expected {expected}.")
    return strengths


def names(value: Any, field: str, what: str = "backbone output names") -> tuple:
    """A non-empty tuple of non-empty strings (e.g. feature maps 'layer3', 'layer4');
    InputError naming `field` otherwise."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items or not all(isinstance(x, str) and x for x in items):
        raise InputError(f"{field}={value!r}; expected a non-empty tuple of {what}, e.g. "
                         f"\"('layer3', 'layer4')\".")
    return items
