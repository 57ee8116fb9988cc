"""bow_jax.evaluate."""
