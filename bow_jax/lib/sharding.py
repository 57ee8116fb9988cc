"""One home for the device mesh and how arrays are laid out on it.

Data parallelism is `jax.jit` over a 1-D mesh named 'data' that spans every device of every
process: state is replicated, batches are sharded on their leading axis. Under jit the program sees
the global batch, so BatchNorm statistics, gradient means and queue writes are global (SyncBN and
all-gather semantics) without a collective written by hand.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bow_jax.lib.errors import InputError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D 'data' mesh over `devices` (default: all devices of all processes).

    Axis type Auto: the compiler places collectives; we annotate only inputs and outputs.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over 'data', the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(value: int, divisor: int, field: str, what: str) -> None:
    """Raise a ValueError naming the config `field` unless `divisor` divides `value`."""
    if divisor <= 0 or value % divisor:
        raise InputError(f"{field}={value} must be divisible by {what} ({divisor}).")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of `tree` whole on every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turn this process's slice of a batch (numpy leaves) into global arrays sharded on 'data'."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
