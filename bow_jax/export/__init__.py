"""bow_jax.export."""
