"""bow_jax.data."""
