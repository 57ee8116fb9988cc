"""bow_jax.lib."""
