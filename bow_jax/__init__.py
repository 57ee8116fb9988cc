"""bow_jax: RotNet, BoWNet and OBoW self-supervised learning in JAX/Flax."""
import os as _os

# The user's own TF_CPP_MIN_LOG_LEVEL, read before anything imports JAX: `import jax` sets the
# variable to '1' when it is unset, and `lib.logs.setup` must tell the user's choice from that.
USER_TF_CPP_MIN_LOG_LEVEL = _os.environ.get("TF_CPP_MIN_LOG_LEVEL")
