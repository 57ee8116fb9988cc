"""bow_jax.models: backbones returning named feature maps, and prediction heads.

    backbone = create_backbone('resnet18', cifar_stem=True)
    dims = feature_dims(backbone, (2, 32, 32, 3))       # {'stem': (2, 32, 32, 64), ..., 'pooled': (2, 512)}
    check_feature_names(['layer3'], dims, 'config.obow.bow_levels', 'resnet18')
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bow_jax.lib.errors import InputError
from bow_jax.models.heads import (CosineBoWHead, DynamicBoWHead, LinearClassifier, RotationHead,
                                  WeightGenerator, l2_normalize)
from bow_jax.models.nin import NIN
from bow_jax.models.resnet import (ResNet, ResNet18, ResNet34, ResNet50, to_torch_layout,
                                   torchvision_key)
from bow_jax.models.norm import BatchNorm
from bow_jax.models.wide_resnet import OBoWWideResNet, WideResNet

BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "wrn28": lambda **kw: WideResNet(**{"depth": 28, **kw}),
    "wrn_obow": OBoWWideResNet,  # official OBoW CIFAR WRN; default WRN-16-2, strides (1, 2, 2)
    "nin": NIN,
}


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The backbone `name` ('resnet18', 'resnet34', 'resnet50', 'wrn28', 'wrn_obow', 'nin') built
    with `kwargs`.

    e.g. create_backbone('resnet18', cifar_stem=True, width=16), create_backbone('wrn28',
    widen_factor=10), create_backbone('wrn_obow', depth=16, widen_factor=2, strides=(1, 2, 2))
    (the official OBoW code's CIFAR WRN), create_backbone('nin', num_blocks=4).
    Raises ValueError for an unknown name or an option the architecture does not have.
    """
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; valid names: {sorted(BACKBONES)}.")
    try:
        return BACKBONES[name](**kwargs)
    except TypeError as e:  # an option the architecture does not have
        raise InputError(f"backbone {name!r} does not accept options {sorted(kwargs)}: {e}") from e


def feature_dims(module: nn.Module, input_shape: Sequence[int]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the named outputs of `module` for an input of `input_shape` (NHWC); costs no FLOPs."""
    def forward():
        x = jnp.zeros(tuple(input_shape), jnp.float32)
        return module.init_with_output(jax.random.key(0), x, train=False)[0]

    outputs = jax.eval_shape(forward)
    return {name: tuple(out.shape) for name, out in outputs.items()}


def check_feature_names(names: Iterable[str], available: Iterable[str], field: str,
                        model_name: str = "the backbone") -> None:
    """Raise a ValueError naming config `field` if a requested feature map does not exist.

    `available` is a list of names or a `feature_dims` dict.
    """
    available = list(available.keys() if isinstance(available, Mapping) else available)
    for name in names:
        if name not in available:
            raise InputError(f"{field}: {name!r} is not a feature map of {model_name}; "
                             f"available: {available}")


__all__ = [
    "BACKBONES", "create_backbone", "feature_dims", "check_feature_names",
    "ResNet", "ResNet18", "ResNet34", "ResNet50", "WideResNet", "OBoWWideResNet", "NIN",
    "BatchNorm", "torchvision_key",
    "to_torch_layout",
    "RotationHead", "LinearClassifier", "CosineBoWHead", "DynamicBoWHead", "WeightGenerator",
    "l2_normalize",
]
