"""The one generic training loop: `train(run)`. No method maths here.

Per step: the host produces this process's slice of the global batch indices (a function of
(seed, step), so any step can be resumed), the device gathers and crops the views, and one jitted,
donated `train_step` does the rest. Metrics are accumulated on the device and fetched only every
`config.log_every` steps.

Long runs lose nothing: every logged mean is checked for NaN/infinity (free: already fetched) and
every state is checked before it is saved (one jitted reduction, in lib/checkpoint.py), so a
diverged run stops with `checkpoint.NonFiniteError` and its last kept checkpoint is the last good
one; a stop signal on any process becomes one decision of every process (lib/stop.py); and the
host runs at most RUN_AHEAD_STEPS steps ahead of the device, so a stop's checkpoint is committed
within a few steps' time of the signal.
"""
import collections
import itertools
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.data import datasets, pipeline
from bow_jax.lib import checkpoint, logs, sharding, stop, writers

RUN_AHEAD_STEPS = 2  # steps the host may dispatch ahead of the device (see RunAhead)


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


class RunAhead:
    """Bounds how far the host dispatches ahead of the device: `before_dispatch()` blocks until
    the step `depth` steps back has finished, so at most `depth` steps are in flight. Without it
    the host queues many steps (12 seen on the CIFAR demo), and a stop signal's checkpoint waits
    for all of them (31 s, past a cloud preemption's ~30 s grace). Blocks on that step's small
    metrics, never on the (donated) state."""

    def __init__(self, depth: Optional[int] = None):
        self.depth = RUN_AHEAD_STEPS if depth is None else depth
        self._pending = collections.deque()

    def after_dispatch(self, metrics) -> None:
        self._pending.append(metrics)

    def before_dispatch(self) -> None:
        while len(self._pending) >= self.depth:
            jax.block_until_ready(self._pending.popleft())

    def in_flight(self) -> int:
        """Steps dispatched whose metrics are not ready yet (tests)."""
        return sum(not all(x.is_ready() for x in jax.tree.leaves(m)) for m in self._pending)


def likely_causes(config) -> str:
    """The settings that usually make a run diverge, with this run's values."""
    dtype = config.model.get("kwargs", {}).get("dtype", "float32")
    return (f"Likely causes: config.optim.lr={config.optim.lr} too high (lower it, or lengthen "
            "config.optim.warmup_epochs)" + (
                f"; config.model.kwargs.dtype={dtype} (low precision overflows: try float32)"
                if "16" in str(dtype) else "") + ". Resume from the last good checkpoint with "
            "the fix: the same command with the new setting.")


def nonfinite_message(config, step: int, names, last_good) -> str:
    """What a user reads when the loss goes NaN: the step, the terms, the likely causes."""
    return (f"Non-finite metrics at step {step}: {', '.join(names)} (mean over the last "
            f"{config.log_every} steps) hold NaN or infinity. Training stopped; nothing was saved "
            f"past the last good checkpoint (step {last_good}). " + likely_causes(config))


def check_metrics(config, step: int, means: dict, last_good) -> None:
    """Raises checkpoint.NonFiniteError when any logged mean is NaN or infinite."""
    bad = sorted(k for k, v in means.items() if not np.all(np.isfinite(v)))
    if bad:
        raise checkpoint.NonFiniteError(nonfinite_message(config, step, bad, last_good))


def train(run, hooks: Iterable[Callable[[int], None]] = (), monitor=None):
    """Trains `run` (a `tasks.common.Run`: method, mesh, state, checkpointer) from its state's
    step to `run.data_info.total_steps`, checkpointing every `config.checkpoint_every_steps` and
    at the end. Returns the final state, or None when stopped early by a signal (after saving the
    same step on every process).

    Raises checkpoint.NonFiniteError (after waiting for pending good saves) when a logged loss or
    the state to save is NaN/infinite: no non-finite checkpoint is ever written.
    `hooks` are called with the step number after each step (tests use them to send SIGTERM).
    `monitor` (e.g. `evaluate.monitor.KnnMonitor`): `monitor.due(step, total_steps)` says when,
    `monitor(state) -> {name: float}` scores the state then; its values are logged with that
    step's metrics (a row of their own when the step logs nothing else).
    """
    ckpt, state = run.checkpointer, run.state
    start_step, total_steps = int(state.step), run.data_info.total_steps
    # Also compiles the state check now, not in the grace period of the first stop's save.
    checkpoint.check_finite(state, f"The starting state (step {start_step}) in {run.workdir}")
    writer = writers.MetricWriter(run.workdir, start_step=start_step)
    try:
        with stop.AgreedStop() as stopper:
            state, stopped = _loop(run, state, start_step, total_steps, writer, stopper, hooks,
                                   monitor)
    finally:
        ckpt.wait()  # the last good checkpoint is committed, even when an error stops training
        writer.close()
    run.state = state
    return None if stopped else state


def monitored(monitor, state, step: int, total_steps: int) -> dict:
    """The monitor's scalars at `step` ({} when it is off or not due)."""
    if monitor is None or not monitor.due(step, total_steps):
        return {}
    return {name: float(value) for name, value in monitor(state).items()}


def _loop(run, state, start_step, total_steps, writer, stopper, hooks, monitor):
    """The step loop of `train`; returns (state, stopped early)."""
    config, mesh, ckpt = run.config, run.mesh, run.checkpointer
    progress = writers.Progress(total_steps, config.batch_size, start_step)
    batches = device_batches(config, run.train_data, run.method, mesh, start_step)
    # Not donated: the run-ahead bound waits on each step's own metrics.
    accumulate = jax.jit(lambda total, m: jax.tree.map(jnp.add, total, m))
    train_step = jax.jit(run.method.train_step, donate_argnums=0,
                         out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
    run_ahead = RunAhead()
    summed, count, last_good = None, 0, ckpt.latest_step()
    for step in range(start_step, total_steps):
        run_ahead.before_dispatch()
        state, metrics = train_step(state, next(batches))
        run_ahead.after_dispatch(metrics)
        summed = metrics if summed is None else accumulate(summed, metrics)
        count += 1
        done = step + 1
        scores = monitored(monitor, state, done, total_steps)
        if done % config.log_every == 0 or done == total_steps:
            means = {k: v / count for k, v in jax.device_get(summed).items()}
            check_metrics(config, done, means, last_good)
            writer.write_scalars(done, {**means, **scores, **progress.report(done)})
            summed, count = None, 0
        elif scores:
            writer.write_scalars(done, scores)
        for hook in hooks:
            hook(done)
        stopping = stopper.should_stop(done) and done < total_steps
        if stopping or done % config.checkpoint_every_steps == 0 or done == total_steps:
            try:
                ckpt.save(done, state, config)
            except checkpoint.NonFiniteError as e:  # finite logged means, non-finite state
                raise checkpoint.NonFiniteError(f"{e} {likely_causes(config)}") from None
            last_good = done
            logs.say(f"checkpoint: step {done} -> {ckpt.folder(done)}")
        if stopping:
            logs.warn(f"Stopped at step {done}: checkpoint saved; the same command resumes.")
            return state, True
    return state, False
