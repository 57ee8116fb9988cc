"""A few real training steps outside the training loop (no checkpoints, no writers), on a chosen
mesh: what the 1-vs-8-device tests compare. Uses the loop's own batch source and jitting."""
import jax

from bow_jax import pretrain
from bow_jax.data.splits import load_split
from bow_jax.lib import sharding
from bow_jax.methods import create_method, data_info_for


def run_steps(config, mesh, num_steps):
    """`num_steps` steps from the initial state, batches from `pretrain.device_batches`; returns the
    final state on the host."""
    data = load_split(config, "train")
    method = create_method(config, data_info_for(config, data))
    replicated = sharding.replicated(mesh)
    state = jax.jit(method.init_state, out_shardings=replicated)(jax.random.key(config.seed))
    step_fn = jax.jit(method.train_step, donate_argnums=0, out_shardings=(replicated, replicated))
    batches = pretrain.device_batches(config, data, method, mesh, start_step=0)
    for _ in range(num_steps):
        state, _ = step_fn(state, next(batches))
    return jax.device_get(state)
