"""Self-supervised methods. Each module has `create(config, data_info) -> Method` and
`default_config()` (its config section, `config.<method>`)."""
import importlib

import jax

from bow_jax.data import pipeline
from bow_jax.lib import sharding
from bow_jax.methods.interface import DataInfo, Method

METHODS = ("rotnet", "bownet", "obow")


def method_module(name: str):
    """The module of method `name` ('rotnet' | 'bownet' | 'obow'); ValueError names the field."""
    if name not in METHODS:
        raise ValueError(f"config.method={name!r}; expected one of {list(METHODS)}.")
    return importlib.import_module(f"bow_jax.methods.{name}")


def create_method(config, data_info: DataInfo) -> Method:
    """The method named by `config.method`."""
    return method_module(config.method).create(config, data_info)


def data_info_for(config, train_data) -> DataInfo:
    """Steps per epoch (drop-last) and total steps of `config` on `train_data`, checked before
    anything is compiled. ValueError when the global batch does not divide over the devices."""
    num_examples = len(train_data)
    sharding.check_divisible(config.batch_size, jax.device_count(), "config.batch_size",
                             "the number of devices")
    steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0
                       else pipeline.steps_per_epoch(num_examples, config.batch_size))
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.num_epochs * steps_per_epoch)
    image_shape = getattr(train_data, "image_shape", None)  # None: streamed, sizes vary
    return DataInfo(image_shape=image_shape, num_examples=num_examples,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)
