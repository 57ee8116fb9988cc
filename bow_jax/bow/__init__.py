"""bow_jax.bow."""
