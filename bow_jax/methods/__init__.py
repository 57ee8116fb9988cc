"""Self-supervised methods. Each module has `create(config, data_info) -> Method` and
`default_config()` (its config section, `config.<method>`)."""
import importlib

import jax

from bow_jax.data import pipeline
from bow_jax.lib import sharding
from bow_jax.lib.errors import InputError
from bow_jax.methods.interface import DataInfo, Method

METHODS = ("rotnet", "bownet", "obow")


def method_module(name: str):
    """The module of method `name` ('rotnet' | 'bownet' | 'obow'); InputError names the field."""
    if name not in METHODS:
        raise InputError(f"config.method={name!r}; expected one of {list(METHODS)}.")
    return importlib.import_module(f"bow_jax.methods.{name}")


def create_method(config, data_info: DataInfo, training: bool = True) -> Method:
    """The method named by `config.method`, its config checked before anything compiles
    (InputError naming the field).

    training: True for the tasks that train (train, bownet_chain); False for those that only
    use a trained state (evaluate, export, finetune, ...): then only the checks that concern
    the state's shapes and its use apply, not those of the views or of the training batch."""
    return method_module(config.method).create(config, data_info, training=training)


def data_info_for(config, train_data, training: bool = True) -> DataInfo:
    """Steps per epoch (drop-last) and total steps of `config` on `train_data`, checked before
    anything is compiled.

    training: True raises InputError naming config.batch_size when the global batch does not
    divide over the devices; False (tasks that do not train) leaves the batch unchecked: the
    steps then only place the restored state on its schedule."""
    num_examples = len(train_data)
    if training:
        sharding.check_divisible(config.batch_size, jax.device_count(), "config.batch_size",
                                 "the number of devices")
    steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0
                       else _steps_per_epoch(num_examples, config.batch_size, training))
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.num_epochs * steps_per_epoch)
    image_shape = getattr(train_data, "image_shape", None)  # None: streamed, sizes vary
    return DataInfo(image_shape=image_shape, num_examples=num_examples,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def _steps_per_epoch(num_examples: int, batch_size: int, training: bool) -> int:
    """`pipeline.steps_per_epoch`; a task that does not train gets at least 1 (its optimizer
    needs a schedule, not batches: the training data may be cut by config.data.limit)."""
    if training:
        return pipeline.steps_per_epoch(num_examples, batch_size)
    return max(1, num_examples // max(1, batch_size))
