"""Prediction heads, independent of the backbone: they take pooled vectors [N, C].

* RotationHead      RotNet: linear layer -> 4 rotation logits.
* LinearClassifier  OBoW's linear probe / monitor head: [BatchNorm without affine] -> linear N(0, 0.01).
* CosineBoWHead     BoWNet eq. 5: logits_k = gamma * Phi(x)^T w_k / ||w_k||.
* DynamicBoWHead    OBoW: weights generated from the vocabulary, logits = kappa * f^T G(V)_k.

A 4-D input [N, H, W, C] to RotationHead / LinearClassifier is global-average-pooled first.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bow_jax.models.norm import BatchNorm
from bow_jax.lib.ops import l2_normalize
from bow_jax.models.resnet import TorchLinear, global_average_pool, torch_default_kernel_init


def _as_pooled(x: jax.Array) -> jax.Array:
    """[N, C] stays; a feature map [N, H, W, C] is global-average-pooled."""
    if x.ndim == 4:
        return global_average_pool(x)
    if x.ndim != 2:
        raise ValueError(f"head input must be [N, C] or [N, H, W, C]; got shape {x.shape}.")
    return x


class RotationHead(nn.Module):
    """RotNet's classifier: Linear(C, num_rotations) with torch.nn.Linear default init."""
    num_rotations: int = 4

    @nn.compact
    def __call__(self, x):
        return TorchLinear(self.num_rotations, name="fc")(_as_pooled(x).astype(jnp.float32))


class LinearClassifier(nn.Module):
    """OBoW linear-probe head: optional BatchNorm(affine=False), then Linear N(0, 0.01), bias 0.

    BatchNorm (when `batch_norm`) has PyTorch numerics (`models.norm.BatchNorm`: eps 1e-5, momentum
    0.1, unbiased running variance) and uses batch statistics when `train`, running statistics
    otherwise.
    """
    num_classes: int
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _as_pooled(x).astype(jnp.float32)
        if self.batch_norm:
            x = BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                          name="bn")(x)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                        bias_init=nn.initializers.zeros, name="fc")(x)


class CosineBoWHead(nn.Module):
    """BoWNet's BoW prediction layer (Gidaris et al. CVPR 2020, eq. 5).

        logits_k = gamma * Phi^T w_k / max(||w_k||_2, 1e-12),   k = 1..K

    Only the K weight vectors w_k (columns of `kernel` [C, K]) are L2-normalised, at every call; the
    feature Phi [N, C] is not (the paper applies the normalised w_k to Phi directly), there is no
    bias, and one learnable scalar gamma (`gamma`, init `gamma_init`) sets the magnitude of all
    weights. The softmax of the logits is the predicted BoW. `kernel` starts with torch.nn.Linear's
    default init (only its directions matter).
    """
    num_words: int
    gamma_init: float = 1.0

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        kernel = self.param("kernel", torch_default_kernel_init, (x.shape[-1], self.num_words))
        gamma = self.param("gamma", nn.initializers.constant(self.gamma_init), ())
        return gamma * (x @ l2_normalize(kernel, axis=0))


class WeightGenerator(nn.Module):
    """OBoW's weight generator G: vocabulary [K, C_l] -> unit-norm prediction weights [K, C].

        G(V) = L2norm( relu( BN( L2norm(V) @ A ) ) @ B + b )

    A [C_l, hidden] has no bias; BN normalises each hidden unit over the K words (batch statistics
    when `train`, running statistics otherwise; PyTorch BatchNorm1d numerics, `models.norm`);
    B [hidden, C], b [C]. Linear layers use torch.nn.Linear's default init, like the official code.
    """
    num_channels_out: int
    hidden_dim: int

    @nn.compact
    def __call__(self, vocabulary, train: bool):
        v = l2_normalize(vocabulary.astype(jnp.float32))
        h = TorchLinear(self.hidden_dim, use_bias=False, name="fc1")(v)
        h = BatchNorm(use_running_average=not train, name="bn")(h)
        w = TorchLinear(self.num_channels_out, name="fc2")(nn.relu(h))
        return l2_normalize(w)


class DynamicBoWHead(nn.Module):
    """OBoW's dynamic BoW prediction head: one weight generator per BoW level.

        logits_l = kappa_l * f @ G_l(V_l)^T        f: pooled student features [N, C], not normalised

    Call `head(features, vocabularies, train)` with `vocabularies` a sequence of [K_l, C_l] arrays
    (one per level; generators are named `generator_{l}`). `features` is one [N, C] array, giving a
    tuple of [N, K_l] logits, or a sequence of crop groups, giving one such tuple per group; the
    weights (and the generators' BatchNorm update) are computed once per call either way, as in the
    official code.

    kappa is fixed (a constant, `kappa` for every level) unless `learn_kappa`, in which case it is
    a parameter 'kappa' of shape [num_levels] initialised to `kappa`. hidden_dim defaults to 2 * C.
    """
    num_channels_out: int
    kappa: float
    hidden_dim: Optional[int] = None
    learn_kappa: bool = False

    def __call__(self, features, vocabularies: Sequence[jax.Array], train: bool):
        weights, kappas = self._weights_and_kappas(vocabularies, train)
        single = hasattr(features, "shape")  # one array, or a sequence of crop groups
        groups = (features,) if single else tuple(features)
        logits = tuple(
            tuple((k * f.astype(jnp.float32)) @ w.T for k, w in zip(kappas, weights))
            for f in groups)
        return logits[0] if single else logits

    def generate_weights(self, vocabularies: Sequence[jax.Array], train: bool):
        """The unit-norm generated weights G_l(V_l), one [K_l, C] array per level."""
        return self._weights_and_kappas(vocabularies, train)[0]

    def torchvision_fc(self, vocabularies: Sequence[jax.Array]):
        """(weight [K, C], bias [K]) of OBoW's exported fc: kappa * G(V) of the last level, eval mode.

        Eval mode uses the generator BN's running statistics, as the official conversion does.
        """
        weights, kappas = self._weights_and_kappas(vocabularies, train=False)
        weight = kappas[-1] * weights[-1]
        return weight, jnp.zeros(weight.shape[0], weight.dtype)

    @nn.compact
    def _weights_and_kappas(self, vocabularies, train):
        if hasattr(vocabularies, "shape"):
            raise ValueError("vocabularies must be a sequence of [K_l, C_l] arrays (one per BoW "
                             "level), not a single array.")
        hidden = self.hidden_dim or 2 * self.num_channels_out
        weights = tuple(
            WeightGenerator(self.num_channels_out, hidden, name=f"generator_{l}")(v, train)
            for l, v in enumerate(vocabularies))
        if self.learn_kappa:
            kappa = self.param("kappa", nn.initializers.constant(self.kappa), (len(weights),))
            kappas = tuple(kappa[l] for l in range(len(weights)))
        else:
            kappas = (jnp.float32(self.kappa),) * len(weights)
        return weights, kappas
