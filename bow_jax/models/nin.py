"""Network-in-Network of RotNet on CIFAR (gidariss/FeatureLearningRotNet, NetworkInNetwork.py).

Every conv unit is Conv(k, stride 1, pad (k-1)/2, no bias) -> BN -> ReLU. With width w (192):

    conv1: 5x5 3->w, 1x1 w->5w/6 (160), 1x1 ->w/2 (96), MaxPool(3, s2, p1)   32 -> 16
    conv2: 5x5 ->w, 1x1 w->w, 1x1 w->w, AvgPool(3, s2, p1)                     16 -> 8
    conv3: 3x3, 1x1, 1x1 at w   (+ AvgPool(3, s2, p1) if use_avg_on_conv3; False in the CIFAR recipe)
    conv4..conv{num_blocks}: 3x3, 1x1, 1x1 at w

Outputs 'conv1'..'conv{num_blocks}' (each after its block's pooling, as in the official code) and
'pooled' = global average of the last block. The rotation classifier is a separate head.

Pooling with padding follows PyTorch: max-pool pads with -inf; AvgPool2d(3, 2, 1) has
count_include_pad=True, so border windows divide by 9 including the zero padding.

Init: the official `weight_initialization()` is never called, so the nets used torch's defaults:
conv weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform a=sqrt(5)), BN scale 1 bias 0.
BatchNorm numerics are PyTorch's (`models.norm.BatchNorm`).
(Torch releases before 1.0, which RotNet ran on, drew BN scales from U(0, 1); we use today's 1.)
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bow_jax.models.norm import torch_batch_norm
from bow_jax.models.resnet import global_average_pool, torch_conv, torch_default_kernel_init


class NINUnit(nn.Module):
    """Conv(k, no bias, 'same' padding) -> BN -> ReLU: the official code's "BasicBlock"."""
    features: int
    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = torch_conv(self.features, self.kernel_size, name="conv",
                       kernel_init=torch_default_kernel_init, dtype=self.dtype)(x)
        return nn.relu(torch_batch_norm(train, name="bn", dtype=self.dtype)(x))


class NIN(nn.Module):
    """RotNet's Network-in-Network (see the module docstring).

    Attributes:
      num_blocks: number of conv blocks (>= 3; 4 in the RotNet CIFAR recipe).
      width: channel width w (192 in the paper; small for tests); block 1 uses 5w/6 and w/2.
      use_avg_on_conv3: average-pool after block 3 (official default True, CIFAR configs False).
      dtype: compute dtype; parameters and BN statistics stay float32.
    """
    num_blocks: int = 4
    width: int = 192
    use_avg_on_conv3: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.num_blocks < 3:
            raise ValueError(f"NIN num_blocks={self.num_blocks} must be >= 3.")
        w = self.width
        block_specs = [((5, w), (1, w * 5 // 6), (1, w // 2)),
                       ((5, w), (1, w), (1, w))]
        block_specs += [((3, w), (1, w), (1, w))] * (self.num_blocks - 2)
        features = {}
        x = jnp.asarray(x, self.dtype)
        for b, spec in enumerate(block_specs):
            for u, (kernel_size, channels) in enumerate(spec):
                x = NINUnit(channels, kernel_size, dtype=self.dtype,
                            name=f"block{b + 1}_unit{u + 1}")(x, train)
            if b == 0:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            elif b == 1 or (b == 2 and self.use_avg_on_conv3 and self.num_blocks > 3):
                x = _torch_avg_pool_3x3_s2(x)
            features[f"conv{b + 1}"] = x
        features["pooled"] = global_average_pool(x)
        return features


def _torch_avg_pool_3x3_s2(x):
    """torch AvgPool2d(3, stride 2, padding 1) with count_include_pad=True (divide by 9 always)."""
    return nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)


NIN4 = functools.partial(NIN, num_blocks=4)
