"""BatchNorm with PyTorch's numerics (torch.nn.BatchNorm1d / BatchNorm2d), as a Flax Linen module.

For each channel c, with n the number of elements averaged per channel (N for [N, C], N*H*W for
[N, H, W, C]):

    train:  mu = mean(x_c),  s2 = mean((x_c - mu)^2)              (biased batch variance)
            y = (x_c - mu) / sqrt(s2 + eps) * scale_c + bias_c
            running_mean <- momentum * running_mean + (1 - momentum) * mu
            running_var  <- momentum * running_var  + (1 - momentum) * s2 * n / (n - 1)   (unbiased)
    eval:   y = (x_c - running_mean) / sqrt(running_var + eps) * scale_c + bias_c

eps 1e-5; `momentum` is Flax's convention (weight of the old value): 0.9 here is torch's
momentum=0.1. Flax's own nn.BatchNorm keeps the *biased* s2 in its running variance; PyTorch keeps
the unbiased one, so a network trained with flax.linen.BatchNorm and exported to torchvision would
differ in eval mode by a factor n/(n-1) per update (visible with small batches). This module
follows PyTorch (torch.nn.functional.batch_norm; PyTorch docs of BatchNorm2d).

Variable names are Flax's: params 'scale' [C] (torch 'weight') and 'bias' [C]; batch_stats 'mean'
and 'var' [C] (torch 'running_mean' / 'running_var'), so checkpoints and the torchvision name table
work unchanged. `use_scale=False, use_bias=False` is torch's `affine=False` (no params at all).

Precision: the statistics are computed in float32 (two passes: the mean, then the mean squared
deviation, which is closer to torch's Welford than E[x^2] - E[x]^2) and kept in float32; the output
is cast to `dtype` (default: the input's dtype), so bf16 compute keeps float32 statistics, as
flax.linen.BatchNorm does.

Data parallelism: there is no `axis_name`. Under `jax.jit` over a device mesh with the batch
sharded, `jnp.mean` over the batch axes is a mean over the global batch, so the statistics are
those of SyncBN with no collective written here.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


class BatchNorm(nn.Module):
    """PyTorch-numerics BatchNorm over all axes but the last (the channel axis).

    Attributes:
      use_running_average: eval mode (running statistics) if True, train mode (batch statistics
        and a running-statistics update) if False; may instead be passed to `__call__`.
      momentum: Flax convention, new_running = momentum * running + (1 - momentum) * batch;
        0.9 is PyTorch's default momentum=0.1.
      epsilon: added to the variance (PyTorch's eps, 1e-5).
      dtype: output dtype (e.g. jnp.bfloat16); None keeps the input's. Statistics, the
        normalisation arithmetic and the params are float32.
      use_scale / use_bias: the affine parameters 'scale' (init 1) and 'bias' (init 0); both
        False is PyTorch's affine=False.

    Call: `bn(x, use_running_average=None, mask=None)` with x [..., C] (at least 2-D). `mask`
    (optional, shape x.shape[:-1], bool or 0/1) marks the elements of a padded batch that count
    in the train-mode statistics; n is then the number of marked elements per channel.

    Raises ValueError (at trace time) in train mode when, without a mask, n < 2: PyTorch refuses
    such a batch ("Expected more than 1 value per channel when training") and the unbiased
    variance is undefined. Initialisation is exempt (it does not touch the statistics).
    """
    use_running_average: Optional[bool] = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, mask=None):
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"BatchNorm input must be [..., C] with at least 2 dims; got shape "
                             f"{x.shape}.")
        features = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean",
                                     lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable("batch_stats", "var",
                                    lambda: jnp.ones((features,), jnp.float32))
        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            mean, var, count = _batch_moments(x32, mask)
            if not self.is_initializing():
                if mask is None and count < 2:
                    raise ValueError(
                        f"BatchNorm in train mode needs more than 1 value per channel (got input "
                        f"shape {x.shape}); PyTorch refuses this too. Use a larger batch or eval "
                        "mode.")
                unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        return self._normalize(x32, mean, var, x.dtype)

    def _normalize(self, x32, mean, var, input_dtype):
        """(x - mean) * rsqrt(var + eps) [* scale] [+ bias] in float32, cast to the output dtype."""
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            mul = mul * self.param("scale", self.scale_init, mean.shape, self.param_dtype
                                   ).astype(jnp.float32)
        y = (x32 - mean) * mul
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, mean.shape, self.param_dtype
                               ).astype(jnp.float32)
        return y.astype(self.dtype or input_dtype)


def _batch_moments(x32, mask):
    """Per-channel mean and biased variance of float32 x [..., C] over all other axes.

    Returns (mean [C], var [C], n): n is a Python int without a mask, else a float32 scalar (the
    number of marked elements). Two passes (mean, then mean squared deviation) for accuracy.
    """
    axes = tuple(range(x32.ndim - 1))
    if mask is None:
        mean = jnp.mean(x32, axis=axes)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes)
        return mean, var, math.prod(x32.shape[:-1])
    weight = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x32.shape[:-1])[..., None]
    count = jnp.sum(weight)
    safe = jnp.maximum(count, 1.0)
    mean = jnp.sum(weight * x32, axis=axes) / safe
    var = jnp.sum(weight * jnp.square(x32 - mean), axis=axes) / safe
    return mean, var, count


def torch_batch_norm(train: bool, *, name: str, dtype: Any = jnp.float32, **kwargs) -> BatchNorm:
    """The backbones' BatchNorm: PyTorch numerics (this module), batch statistics when `train`,
    running statistics otherwise; `kwargs` go to `BatchNorm` (e.g. use_scale=False)."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     param_dtype=jnp.float32, name=name, **kwargs)
