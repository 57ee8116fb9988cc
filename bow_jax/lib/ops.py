"""Array operations every layer shares (models, bow, evaluate), written once."""
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize(p=2): x / max(||x||_2, eps) along `axis`; same shape and
    dtype as `x`.

    Written as x * rsqrt(max(sum x^2, eps^2)): the same value, and a finite (zero) gradient for
    an all-zero vector, where the gradient of the norm itself would be NaN.
    """
    sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))
