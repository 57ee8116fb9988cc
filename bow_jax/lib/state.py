"""The training state: one pytree that holds everything training depends on.

A checkpoint is this pytree; nothing else is needed to continue a run exactly. Methods with more
state (OBoW: teacher, vocabulary queues, running statistics) subclass `TrainState`.
"""
from typing import Any

import flax
import jax
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # typed key; the key of step t is fold_in(rng, t)

    def step_key(self) -> jax.Array:
        """This step's randomness: a function of (seed, step) alone, so resumed runs match."""
        return jax.random.fold_in(self.rng, self.step)

    def apply_gradients(self, grads, tx: optax.GradientTransformation, **changes):
        """One optimizer step; `changes` replace other fields (e.g. new batch_stats)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)
