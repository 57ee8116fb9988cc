"""bow_jax.protocols."""
