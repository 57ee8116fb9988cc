"""ResNet-18/34/50 with torchvision's structure, parameter count and initialisation (Flax Linen, NHWC).

The backbone returns a dict of named feature maps so that methods pick BoW levels by name:

    'stem'    after conv1-bn1-relu(-maxpool)                     [B, H/4, W/4, w]   (H, W with cifar_stem)
    'layer1'  .. 'layer4'  outputs of torchvision's layer1..4     [B, h, w, C]
    'pooled'  global average pool of 'layer4', float32           [B, C]
    'logits'  fc(pooled), only when num_classes is set            [B, num_classes]

With a 224 input, layer3 is 14x14 and layer4 7x7 (OBoW's conv4 / conv5); OBoW calls them block3/block4.

Numerics follow PyTorch: explicit symmetric padding (Flax 'SAME' pads stride-2 convolutions
asymmetrically, torch does not), max-pool padding with -inf, and BatchNorm = `models.norm.BatchNorm`
(eps 1e-5, torch momentum 0.1 = Flax 0.9, running variance from the unbiased batch variance, as
torch keeps it), `use_running_average = not train`. BatchNorm has no `axis_name`: under `jax.jit`
over a mesh the batch statistics are those of the global batch (SyncBN).

Initialisation is torchvision's: convolutions kaiming_normal(mode='fan_out', nonlinearity='relu'),
i.e. N(0, 2 / (k*k*C_out)) (plain normal, not truncated); BatchNorm scale 1, bias 0 (no zero-init of
the last BN of a block); fc = torch.nn.Linear default, weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

Flax -> torchvision state_dict names (1:1; see `torchvision_key` and `to_torch_layout`):

    Flax path (collection / modules / leaf)          torchvision key                 layout change
    params/conv1/kernel                              conv1.weight                    HWIO -> OIHW
    params/bn1/{scale,bias}                          bn1.{weight,bias}
    batch_stats/bn1/{mean,var}                       bn1.{running_mean,running_var}  (see note)
    params/layer{i}_{j}/conv{n}/kernel               layer{i}.{j}.conv{n}.weight     HWIO -> OIHW
    params/layer{i}_{j}/bn{n}/{scale,bias}           layer{i}.{j}.bn{n}.{weight,bias}
    params/layer{i}_{j}/downsample_conv/kernel       layer{i}.{j}.downsample.0.weight
    params/layer{i}_{j}/downsample_bn/{scale,bias}   layer{i}.{j}.downsample.1.{weight,bias}
    params/fc/{kernel,bias}                          fc.{weight,bias}                [in,out] -> [out,in]

Note: torch's BatchNorm has a `num_batches_tracked` buffer, ours has no counter (it only matters
for torch's momentum=None); an exporter writes it itself. running_var is the same quantity in both
(the unbiased batch variance is averaged in), so exported eval-mode outputs match torch's.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.lib.errors import InputError
from bow_jax.models.norm import torch_batch_norm
# -- Initialisers and layers shared by every backbone and head (torch conventions). ---------------

# torchvision ResNet: kaiming_normal_(mode='fan_out', nonlinearity='relu') = N(0, 2 / fan_out),
# fan_out = k*k*C_out. JAX's `he_normal` is truncated and fan_in, hence the explicit form.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch.nn.Conv2d / nn.Linear default weight init: kaiming_uniform_(a=sqrt(5)) = U(-b, b) with
# b = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in); variance_scaling(1/3, uniform) has bound
# sqrt(3 * (1/3) / fan_in), the same.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """torch.nn.Linear / Conv2d default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchLinear(nn.Module):
    """A Dense layer with torch.nn.Linear's default init; params 'kernel' [in, out] and 'bias' [out].

    Written out (instead of wrapping nn.Dense) because the torch bias bound needs fan_in, which a
    Flax bias initialiser never sees, and a wrapper would add a nesting level to the param tree.
    """
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_default_kernel_init, (fan_in, self.features), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def torch_conv(features: int, kernel_size: int, stride: int = 1, *, name: str,
               kernel_init=kaiming_normal_fan_out, dtype: Any = jnp.float32,
               padding: Optional[int] = None) -> nn.Conv:
    """Conv2d without bias, torch-style symmetric padding (k-1)//2 unless `padding` is given."""
    pad = (kernel_size - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=kernel_init,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def global_average_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C] mean over space, accumulated in float32 (also for bf16 maps)."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# -- Residual blocks. ------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3(stride)-BN-ReLU-3x3-BN, + identity or 1x1(stride)-BN, ReLU."""
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 1  # class constant, not a module field

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(torch_conv, dtype=self.dtype)
        norm = functools.partial(torch_batch_norm, train, dtype=self.dtype)
        out_planes = self.planes * self.expansion
        y = nn.relu(norm(name="bn1")(conv(self.planes, 3, self.stride, name="conv1")(x)))
        y = norm(name="bn2")(conv(out_planes, 3, name="conv2")(y))
        return nn.relu(y + _shortcut(x, out_planes, self.stride, conv, norm))


class Bottleneck(nn.Module):
    """torchvision Bottleneck "v1.5": 1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1(4x)-BN, + shortcut, ReLU."""
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(torch_conv, dtype=self.dtype)
        norm = functools.partial(torch_batch_norm, train, dtype=self.dtype)
        out_planes = self.planes * self.expansion
        y = nn.relu(norm(name="bn1")(conv(self.planes, 1, name="conv1")(x)))
        # v1.5: the stride sits in the 3x3 conv (v1 had it in the first 1x1).
        y = nn.relu(norm(name="bn2")(conv(self.planes, 3, self.stride, name="conv2")(y)))
        y = norm(name="bn3")(conv(out_planes, 1, name="conv3")(y))
        return nn.relu(y + _shortcut(x, out_planes, self.stride, conv, norm))


def _shortcut(x, out_planes, stride, conv, norm):
    """Identity, or torchvision's `downsample` = 1x1 conv (stride) + BN when the shape changes."""
    if stride == 1 and x.shape[-1] == out_planes:
        return x
    return norm(name="downsample_bn")(conv(out_planes, 1, stride, name="downsample_conv")(x))


# -- The network. ----------------------------------------------------------------------------------

class ResNet(nn.Module):
    """torchvision ResNet returning named feature maps (see the module docstring).

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      bottleneck: Bottleneck blocks (ResNet-50) instead of BasicBlocks.
      width: channels of the stem and of layer1's 3x3 convs (64 in torchvision; small for tests).
      cifar_stem: 3x3 stride-1 conv and no max-pool instead of 7x7/2 + max-pool 3x3/2 (32x32 inputs).
      num_classes: if set, an fc layer on the pooled vector ('logits'); for torchvision parity.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters and BN statistics stay float32.
      remat: recompute each residual block's activations in the backward pass instead of storing
        them (flax.linen.remat): less memory for bigger batches, same parameters and results.
    """
    stage_sizes: Sequence[int]
    bottleneck: bool = False
    width: int = 64
    cifar_stem: bool = False
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        features = {}
        x = jnp.asarray(x, self.dtype)
        if self.cifar_stem:
            x = torch_conv(self.width, 3, 1, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(torch_batch_norm(train, name="bn1", dtype=self.dtype)(x))
        else:
            x = torch_conv(self.width, 7, 2, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(torch_batch_norm(train, name="bn1", dtype=self.dtype)(x))
            # nn.max_pool pads with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features["stem"] = x

        block_cls = Bottleneck if self.bottleneck else BasicBlock
        if self.remat:  # __call__(self, x, train): `train` (argument 2) is a static Python bool
            block_cls = nn.remat(block_cls, static_argnums=(2,))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = block_cls(self.width * 2 ** i, stride, dtype=self.dtype,
                              name=f"layer{i + 1}_{j}")(x, train)
            features[f"layer{i + 1}"] = x

        features["pooled"] = global_average_pool(x)
        if self.num_classes:
            features["logits"] = TorchLinear(self.num_classes, name="fc")(features["pooled"])
        return features


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=False)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True)


# -- torchvision naming. ---------------------------------------------------------------------------

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}
_MODULE_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LAYER_RE = re.compile(r"^layer(\d+)_(\d+)$")


def torchvision_key(flax_path: Sequence[str]) -> str:
    """The torchvision ResNet state_dict key of a Flax variable path.

    `flax_path` is the tuple of dict keys, with or without the leading collection name, e.g.
    ('params', 'layer2_0', 'downsample_conv', 'kernel') -> 'layer2.0.downsample.0.weight',
    ('batch_stats', 'bn1', 'var') -> 'bn1.running_var'.
    Raises InputError for a path that is not a ResNet variable (no module, or an unknown leaf).
    """
    path = [str(p) for p in flax_path]
    if path and path[0] in ("params", "batch_stats"):
        path = path[1:]
    if len(path) < 2 or path[-1] not in _LEAF_TO_TORCH:
        raise InputError(f"flax_path={tuple(flax_path)!r} is not a ResNet variable path "
                         f"(expected modules then one of {sorted(_LEAF_TO_TORCH)}).")
    parts = []
    for name in path[:-1]:
        layer = _LAYER_RE.match(name)
        if layer:
            parts.append(f"layer{layer.group(1)}.{layer.group(2)}")
        else:
            parts.append(_MODULE_TO_TORCH.get(name, name))
    return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


# torch's axis order of a Flax kernel, by rank: conv HWIO -> OIHW, dense [in, out] -> [out, in].
_TORCH_KERNEL_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def torch_axes(flax_path: Sequence[str], ndim: int) -> Optional[tuple]:
    """The `np.transpose` axes taking the Flax variable at `flax_path` (of rank `ndim`) to torch's
    layout, or None where the layouts agree (everything but conv and dense kernels)."""
    return _TORCH_KERNEL_AXES.get(ndim) if flax_path[-1] == "kernel" else None


def to_torch_layout(flax_path: Sequence[str], value) -> np.ndarray:
    """`value` rearranged to torch's layout: conv kernels HWIO -> OIHW, dense kernels transposed."""
    value = np.asarray(value)
    axes = torch_axes(flax_path, value.ndim)
    return value if axes is None else np.transpose(value, axes)


def from_torch_layout(flax_path: Sequence[str], value) -> np.ndarray:
    """Inverse of `to_torch_layout`: OIHW -> HWIO conv kernels, [out, in] -> [in, out] dense."""
    value = np.asarray(value)
    axes = torch_axes(flax_path, value.ndim)
    return value if axes is None else np.transpose(value, np.argsort(axes))
