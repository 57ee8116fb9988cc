"""Self-supervised methods. Each module has `create(config, data_info) -> Method`."""
import importlib

from bow_jax.methods.common import DataInfo, Method

METHODS = ("rotnet", "bownet", "obow")


def create_method(config, data_info: DataInfo) -> Method:
    """The method named by `config.method`."""
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}; expected one of {list(METHODS)}.")
    module = importlib.import_module(f"bow_jax.methods.{config.method}")
    return module.create(config, data_info)
