"""Learning-rate and momentum schedules, and the optimizer built from a config.

All schedules are functions of the optimizer step count (what optax passes), so they resume with
the state. Epoch-stepped schedules (RotNet's LUT, OBoW's per-epoch cosine) are step functions of
`step // steps_per_epoch`, as in the reference code.
"""
import math
from typing import Sequence

import jax.numpy as jnp
import optax

from bow_jax.lib import errors


def step_lr(base_lr: float, milestones: Sequence[int], decay: float, steps_per_epoch: int):
    """lr = base_lr · decay^(number of milestone epochs passed). RotNet/BoWNet step schedules."""
    bounds = jnp.asarray(sorted(milestones), jnp.int32)

    def schedule(step):
        epoch = step // steps_per_epoch
        return base_lr * decay ** jnp.sum(epoch >= bounds)

    return schedule


def warmup_cosine_per_epoch(base_lr: float, end_lr: float, num_epochs: int, warmup_epochs: int,
                            steps_per_epoch: int):
    """OBoW's schedule: linear warm-up per *step* from exactly 0 over `warmup_epochs`, then a cosine
    from base_lr towards end_lr stepped once per *epoch* (end_lr is never reached)."""
    warmup_steps = warmup_epochs * steps_per_epoch
    cosine_epochs = max(num_epochs - warmup_epochs, 1)

    def schedule(step):
        epoch = step // steps_per_epoch
        progress = (epoch - warmup_epochs) / cosine_epochs
        cosine = end_lr + (base_lr - end_lr) * 0.5 * (1 + jnp.cos(math.pi * progress))
        if warmup_steps == 0:
            return cosine
        warmup = base_lr * step / warmup_steps
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def teacher_momentum(step, total_steps: int, base: float = 0.99):
    """OBoW/BYOL teacher EMA momentum: 1 − (1 − base)·½(1 + cos(π t / T)), per step, in float32."""
    t = jnp.asarray(step, jnp.float32)
    return 1.0 - (1.0 - jnp.float32(base)) * 0.5 * (1.0 + jnp.cos(jnp.pi * t / total_steps))


def make_lr_schedule(optim, steps_per_epoch: int, num_epochs: int):
    """The schedule named by `config.optim.schedule`."""
    if optim.schedule == "step":
        return step_lr(optim.lr, optim.milestones, optim.decay, steps_per_epoch)
    if optim.schedule == "cosine":
        return warmup_cosine_per_epoch(optim.lr, optim.end_lr, num_epochs, optim.warmup_epochs,
                                       steps_per_epoch)
    if optim.schedule == "constant":
        return lambda step: jnp.asarray(optim.lr, jnp.float32)
    raise errors.InputError(f"config.optim.schedule={optim.schedule!r}; expected 'step', "
                            "'cosine' or 'constant'.")


def torch_sgd(learning_rate, *, momentum: float = 0.9, nesterov: bool = False,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
    """PyTorch's SGD (torch.optim.SGD): weight decay added to the gradient of every parameter
    (BN and biases too, as in the reference code), then momentum (optionally Nesterov), then the
    learning rate (a float or a schedule of the step). The one SGD of every loop: pre-training,
    the linear probes and fine-tuning."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def make_optimizer(optim, lr_schedule) -> optax.GradientTransformation:
    """`torch_sgd` of config.optim (InputError naming config.optim.name for anything else)."""
    if optim.name != "sgd":
        raise errors.InputError(f"config.optim.name={optim.name!r}; only 'sgd' is implemented.")
    return torch_sgd(lr_schedule, momentum=optim.momentum, nesterov=optim.nesterov,
                     weight_decay=optim.weight_decay)
