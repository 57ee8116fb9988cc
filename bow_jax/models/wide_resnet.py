"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k, the CIFAR backbone of BoWNet (WRN-28-10),
and the variant of the official OBoW code for small images (`OBoWWideResNet`, see its docstring).

`WideResNet` (backbone name 'wrn28'):

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
WRN code and torchvision; BN scale 1 bias 0; fc torch.nn.Linear default. BN numerics as PyTorch
(`models.norm.BatchNorm`).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bow_jax.lib.errors import InputError
from bow_jax.models.norm import torch_batch_norm
from bow_jax.models.resnet import TorchLinear, global_average_pool, torch_conv


def _is_identity(x, out_planes: int, stride: int) -> bool:
    """Whether a block on `x` [B, H, W, C] keeps its shape (identity shortcut) or projects."""
    return stride == 1 and x.shape[-1] == out_planes


def _residual_branch(x, out_planes: int, stride: int, train: bool, dtype,
                     dropout_rate: float = 0.0):
    """conv1 (3x3, `stride`) -> bn2 -> ReLU -> [dropout] -> conv2 (3x3): the residual branch of
    both WRN blocks. Called inside a block's compact `__call__`, so the block owns the submodules
    (same names, same parameter tree). [B, H, W, C] -> [B, H/stride, W/stride, out_planes]."""
    y = torch_conv(out_planes, 3, stride, name="conv1", dtype=dtype)(x)
    y = nn.relu(torch_batch_norm(train, name="bn2", dtype=dtype)(y))
    if dropout_rate > 0:
        y = nn.Dropout(dropout_rate, deterministic=not train)(y)
    return torch_conv(out_planes, 3, name="conv2", dtype=dtype)(y)


def _add_shortcut(x, shortcut_in, y, out_planes: int, stride: int, dtype):
    """`y` plus the block's shortcut: `x` itself when the block keeps its shape, else a 1x1
    `shortcut_conv` (stride `stride`) of `shortcut_in` (the pre-activated x or x itself)."""
    if _is_identity(x, out_planes, stride):
        return x + y
    return torch_conv(out_planes, 1, stride, name="shortcut_conv", dtype=dtype)(shortcut_in) + y


class WideBasicBlock(nn.Module):
    """Pre-activation basic block of a Wide ResNet (see the module docstring)."""
    out_planes: int
    stride: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        o = nn.relu(torch_batch_norm(train, name="bn1", dtype=self.dtype)(x))
        y = _residual_branch(o, self.out_planes, self.stride, train, self.dtype,
                             self.dropout_rate)
        return _add_shortcut(x, o, y, self.out_planes, self.stride, self.dtype)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor returning named feature maps.

    Attributes:
      depth: total depth, 6n + 4 (28 -> 4 blocks per group).
      widen_factor: k; group widths 16k, 32k, 64k.
      dropout_rate: dropout between the two convs of a block (needs a 'dropout' rng when > 0 and train).
      num_classes: optional fc on the pooled vector ('logits').
      dtype: compute dtype; parameters and BN statistics stay float32.

    Raises InputError (at the first call) for a depth that is not 6n + 4 (n >= 1).
    """
    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depth < 10 or (self.depth - 4) % 6:
            raise InputError(f"WideResNet depth={self.depth} must be 6n+4 with n >= 1 (e.g. 28).")
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



# -- The official OBoW Wide ResNet for small images (github.com/valeoai/obow). ---------------------

class OBoWWideBlock(nn.Module):
    """One block of the official OBoW WRN (see `OBoWWideResNet`). Params: conv1, bn2, conv2, and
    bn1 (pre-activation) for an identity block or shortcut_conv (1x1) for a projection block."""
    out_planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        # Identity blocks are pre-activated; projection blocks see x (already post-ReLU: the
        # stem and every group end with BN-ReLU) directly, in both branches.
        y = x
        if _is_identity(x, self.out_planes, self.stride):
            y = nn.relu(torch_batch_norm(train, name="bn1", dtype=self.dtype)(x))
        y = _residual_branch(y, self.out_planes, self.stride, train, self.dtype)
        return _add_shortcut(x, x, y, self.out_planes, self.stride, self.dtype)


class OBoWWideResNet(nn.Module):
    """The Wide ResNet of the official OBoW code for small images (github.com/valeoai/obow),
    backbone name 'wrn_obow'. NHWC in, a dict of named maps out:

        conv3x3(16) -> BN -> ReLU                                        'stem'   [B, H, W, 16]
        group g = 1, 2, 3: (depth - 4) / 6 blocks of width (16, 32, 64)[g-1] * widen_factor, the
          first with stride strides[g-1], then the group's own BN -> ReLU     'block{g}' (>= 0)
        global average of 'block3', float32                              'pooled' [B, 64k]

    A block whose input and output widths match and whose stride is 1 is pre-activated,
    x + conv3x3(relu(bn2(conv3x3(relu(bn1(x)))))); any other block is
    conv1x1(x, stride) + conv3x3(relu(bn2(conv3x3(x, stride)))) with no pre-activation.
    Convolutions have no bias and weights N(0, 2 / (k*k*C_out)); BN scale 1, bias 0, PyTorch
    numerics (`models.norm.BatchNorm`). WRN-16-2: 690,384 parameters, 'pooled' 128-d; at 32x32 with
    strides (1, 2, 2) block1 32x32x32, block2 16x16x64, block3 8x8x128.

    Unlike `WideResNet` (BoWNet's, whose 'block1'/'block2' are the pre-activation residual
    stream), every named map here is post-ReLU, so any of them is a BoW level. torchvision has no
    such network: there is no torchvision export for it.

    Attributes:
      depth: 6n + 4 (16 -> 2 blocks per group).
      widen_factor: k; group widths 16k, 32k, 64k.
      strides: the first block's stride of each of the three groups.
      dtype: compute dtype; parameters and BN statistics stay float32.

    Raises InputError for a depth that is not 6n + 4 (n >= 1) or strides that are not 3 ints.
    """
    depth: int = 16
    widen_factor: int = 2
    strides: Sequence[int] = (1, 2, 2)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depth < 10 or (self.depth - 4) % 6:
            raise InputError(f"OBoWWideResNet depth={self.depth} must be 6n+4 with n >= 1 "
                             "(e.g. 16).")
        if len(tuple(self.strides)) != 3:
            raise InputError(f"OBoWWideResNet strides={self.strides!r}: expected 3 ints, one "
                             "per group.")
        norm = functools.partial(torch_batch_norm, train, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(norm(name="bn1")(torch_conv(16, 3, name="conv1", dtype=self.dtype)(x)))
        features = {"stem": x}
        for g, (multiplier, stride) in enumerate(zip((16, 32, 64), self.strides)):
            for j in range((self.depth - 4) // 6):
                x = OBoWWideBlock(multiplier * self.widen_factor, int(stride) if j == 0 else 1,
                                  dtype=self.dtype, name=f"block{g + 1}_{j}")(x, train)
            x = nn.relu(norm(name=f"block{g + 1}_bn")(x))
            features[f"block{g + 1}"] = x
        features["pooled"] = global_average_pool(x)
        return features
