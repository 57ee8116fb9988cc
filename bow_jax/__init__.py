"""bow_jax: RotNet, BoWNet and OBoW self-supervised learning in JAX/Flax."""
