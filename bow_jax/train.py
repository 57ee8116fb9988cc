"""The one generic training loop: `train_and_evaluate(config, workdir)`. No method maths here.

Per step: the host produces this process's slice of the global batch indices (a function of
(seed, step), so any step can be resumed), the device gathers and crops the views, and one jitted,
donated `train_step` does the rest. Metrics are accumulated on the device and fetched only every
`config.log_every` steps.
"""
import os
import signal
import threading
import itertools
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
from absl import logging

from bow_jax.data import datasets, pipeline
from bow_jax.data.splits import load_split
from bow_jax.lib import checkpoint, sharding, writers
from bow_jax.methods import DataInfo, create_method


class StopRequest:
    """Set by SIGTERM (or SIGINT): the loop saves a checkpoint at the next step and returns."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("Signal %d received: saving a checkpoint and stopping.", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def data_info_for(config, train_data) -> DataInfo:
    """Steps per epoch (drop-last) and total steps, checked before anything is compiled."""
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


def setup(config, workdir: str):
    """Everything a run needs, validated: data, method, mesh, initial or restored state."""
    train_data = load_split(config, "train")
    data_info = data_info_for(config, train_data)
    method = create_method(config, data_info)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(method.init_state, key)  # also validates shapes before compiling
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.keep_checkpoints,
                                   keep_period=config.keep_every_steps)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            abstract)
    state = ckpt.restore(abstract, config)
    if state is None:
        state = jax.jit(method.init_state, out_shardings=replicated)(key)
    else:
        logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    return train_data, data_info, method, mesh, ckpt, state


def compile_view_fn(method, mesh, seed: int):
    """`make_views(images, labels, index, step)`, jitted: gathers a batch from the on-device
    dataset and makes its views, keyed by (seed, step), plus the batch's 'label' (methods ignore
    it; OBoW's monitor head reads it); the output is sharded over the mesh."""
    view_key = jax.random.fold_in(jax.random.key(seed), 1)

    def make_views(images, labels, index, step):
        views = method.make_views(images[index], jax.random.fold_in(view_key, step))
        return {**views, "label": labels[index]}

    return jax.jit(make_views, out_shardings=sharding.batch_sharded(mesh))


def device_batches(config, train_data, method, mesh, start_step: int) -> Iterator:
    """Global batches of views on the device, for steps start_step, start_step + 1, ...

    In memory: the dataset is put on every device once; per step only this process's slice of
    the global batch indices crosses from the host. Streamed (TFDS): the host pipeline makes the
    views with `method.tf_views` and this process's slice is sharded onto its devices.
    """
    if isinstance(train_data, datasets.TfdsSource):
        if method.tf_views is None:
            raise ValueError(f"config.data.in_memory=False: method {config.method!r} has no "
                             "streaming (TFDS) views; use in-memory data.")
        host = pipeline.tfds_train_views(
            train_data.builder, train_data.split, global_batch=config.batch_size,
            seed=config.seed, view_fn=method.tf_views, start_step=start_step,
            num_examples=train_data.num_examples)
        for batch in host:
            yield sharding.shard_batch(batch, mesh)
        return
    images = sharding.replicate(train_data.images, mesh)
    labels = sharding.replicate(train_data.labels, mesh)
    loader = pipeline.IndexLoader(len(train_data), config.batch_size, config.seed,
                                  start_step=start_step)
    make_views = compile_view_fn(method, mesh, config.seed)
    for step in itertools.count(start_step):
        yield make_views(images, labels, sharding.shard_batch(next(loader)["index"], mesh), step)


def train_and_evaluate(config, workdir: str,
                       hooks: Iterable[Callable[[int], None]] = ()) -> Optional[dict]:
    """Trains (resuming from `workdir` when it holds a checkpoint), then evaluates if asked.

    `hooks` are called with the step number after each step (tests use them to send SIGTERM).
    Returns the evaluation results, or None when stopped early by a signal.
    """
    train_data, data_info, method, mesh, ckpt, state = setup(config, workdir)
    start_step, total_steps = int(state.step), data_info.total_steps
    writer = writers.MetricWriter(workdir, start_step=start_step)
    progress = writers.Progress(total_steps, config.batch_size, start_step)

    batches = device_batches(config, train_data, method, mesh, start_step)
    accumulate = jax.jit(lambda total, m: jax.tree.map(jnp.add, total, m), donate_argnums=0)

    summed, count = None, 0
    stopped = False
    with StopRequest() as stop:
        train_step = jax.jit(method.train_step, donate_argnums=0,
                             out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
        for step in range(start_step, total_steps):
            state, metrics = train_step(state, next(batches))
            summed = metrics if summed is None else accumulate(summed, metrics)
            count += 1
            done = step + 1
            if done % config.log_every == 0 or done == total_steps:
                means = {k: v / count for k, v in jax.device_get(summed).items()}
                writer.write_scalars(done, {**means, **progress.report(done)})
                summed, count = None, 0
            for hook in hooks:
                hook(done)
            if stop.requested or done % config.checkpoint_every_steps == 0 or done == total_steps:
                ckpt.save(done, state, config)
            if stop.requested and done < total_steps:
                stopped = True
                break
    ckpt.close()
    writer.close()
    if stopped or not config.eval.after_training:
        return None
    from bow_jax.evaluate import runner  # pylint: disable=import-outside-toplevel
    return runner.evaluate_state(config, workdir, method, state, mesh)
