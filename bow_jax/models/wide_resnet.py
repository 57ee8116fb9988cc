"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016), the CIFAR backbone of BoWNet (WRN-28-10).

Pre-activation basic blocks, (d - 4) / 6 blocks per group (4 for d = 28), group widths 16k, 32k, 64k,
strides 1, 2, 2, then a final BN-ReLU and global average pooling (640-d for WRN-28-10). A block is

    o = relu(bn1(x)); y = conv3x3(o, stride); y = relu(bn2(y)); y = dropout(y); y = conv3x3(y)
    return y + (x                    if the shape is unchanged
                else conv1x1(o, stride))   # the projection sees the pre-activated input

(the layout of the reference implementations; WRN-28-10 with a 10-way fc has 36,479,194 parameters).

Named outputs: 'stem' (first 3x3 conv, 16 ch), 'block1', 'block2' (residual stream after groups 1
and 2: pre-activation, can be negative), 'block3' (group 3 followed by the final BN-ReLU, i.e. the
non-negative map that is pooled; BoWNet builds its CIFAR vocabulary on it), 'pooled' [B, 64k],
and 'logits' when num_classes is set.

Init (stated choice): convs kaiming_normal fan_out, N(0, 2 / (k*k*C_out)), as in the reference
WRN code and torchvision; BN scale 1 bias 0; fc torch.nn.Linear default. BN numerics as PyTorch.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bow_jax.models.resnet import TorchLinear, global_average_pool, torch_batch_norm, torch_conv


class WideBasicBlock(nn.Module):
    """Pre-activation basic block of a Wide ResNet (see the module docstring)."""
    out_planes: int
    stride: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(torch_conv, dtype=self.dtype)
        norm = functools.partial(torch_batch_norm, train, dtype=self.dtype)
        o = nn.relu(norm(name="bn1")(x))
        y = conv(self.out_planes, 3, self.stride, name="conv1")(o)
        y = nn.relu(norm(name="bn2")(y))
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv(self.out_planes, 3, name="conv2")(y)
        if self.stride == 1 and x.shape[-1] == self.out_planes:
            return x + y
        return conv(self.out_planes, 1, self.stride, name="shortcut_conv")(o) + y


class WideResNet(nn.Module):
    """WRN-depth-widen_factor returning named feature maps.

    Attributes:
      depth: total depth, 6n + 4 (28 -> 4 blocks per group).
      widen_factor: k; group widths 16k, 32k, 64k.
      dropout_rate: dropout between the two convs of a block (needs a 'dropout' rng when > 0 and train).
      num_classes: optional fc on the pooled vector ('logits').
      dtype: compute dtype; parameters and BN statistics stay float32.
    """
    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth={self.depth} must be 6n+4 with n >= 1 (e.g. 28).")
        blocks_per_group = (self.depth - 4) // 6
        features = {}
        x = jnp.asarray(x, self.dtype)
        x = torch_conv(16, 3, name="conv1", dtype=self.dtype)(x)
        features["stem"] = x
        for g, (multiplier, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
            for j in range(blocks_per_group):
                x = WideBasicBlock(multiplier * self.widen_factor, stride if j == 0 else 1,
                                   self.dropout_rate, dtype=self.dtype,
                                   name=f"block{g + 1}_{j}")(x, train)
            features[f"block{g + 1}"] = x
        x = nn.relu(torch_batch_norm(train, name="final_bn", dtype=self.dtype)(x))
        features["block3"] = x
        features["pooled"] = global_average_pool(x)
        if self.num_classes:
            features["logits"] = TorchLinear(self.num_classes, name="fc")(features["pooled"])
        return features


WRN28_10 = functools.partial(WideResNet, depth=28, widen_factor=10)
