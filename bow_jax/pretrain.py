"""Pre-training: a method's `train_step` on the step driver (`lib/loop.py`). No method maths here.

Per step: the host produces this process's slice of the global batch (indices into in-memory
images, or streamed images decoded into canvases; a function of (seed, step), so any step can be
resumed), the device cuts the views (`data/batches.py`), and one jitted, donated `train_step`
does the rest. Everything else a long
run needs (bounded run-ahead, the agreed stop, checkpoints, non-finite checks, metric rows) is the
driver's.
"""
import dataclasses
from typing import Callable, Iterable, Iterator, Optional

import jax

from bow_jax.data import batches as batch_source
from bow_jax.lib import logs, loop, profiling, sharding


def device_batches(config, train_data, method, mesh, start_step: int,
                   unreadable_counts=None) -> Iterator:
    """Global batches of the method's views on the device, for steps start_step, start_step + 1,
    ... (`data.batches.training_batches`: `method.make_views` cuts them on the device from
    in-memory images or streamed canvases alike). unreadable_counts: streamed images read and
    unreadable so far, kept up to date in place (`pipeline.UnreadableImages`)."""
    return batch_source.training_batches(
        train_data, batch_size=config.batch_size, seed=config.seed, mesh=mesh,
        start_step=start_step, device_views=method.make_views,
        unreadable_counts=unreadable_counts)


UNREADABLE_META = "unreadable_images"  # checkpoint meta: streamed images read / unreadable
DEVICES_META = "device_count"  # checkpoint meta: the number of devices that ran the steps


def saved_unreadable_counts(meta: dict) -> dict:
    """The streamed images read and found unreadable before the checkpoint of `meta`
    ({'read', 'unreadable'}; {} for a new run), so that a restart goes on counting the share
    that config.data.max_unreadable_fraction bounds instead of starting it again. The counts
    are process 0's (each process counts its own shard; shards are alike)."""
    return dict(meta.get(UNREADABLE_META, {}))


@dataclasses.dataclass(frozen=True)
class Stage:
    """A BoWNet chain stage, for the messages of its training: its name (its folder, e.g.
    'rotnet') and where its settings live in the command's config (e.g. 'config.bownet.rotnet':
    the stage configs are derived, `tasks.bownet_chain`, so a stage's config.optim.lr is not the
    field the user sets)."""
    name: str
    field: str


def likely_causes(config, stage: Optional[Stage] = None) -> str:
    """The settings that usually make a run diverge, with this run's values, named as the user
    sets them (a BoWNet chain `stage`'s own fields)."""
    field = stage.field if stage else "config"
    where = f"In the BoWNet chain's {stage.name!r} stage: likely" if stage else "Likely"
    dtype = config.model.get("kwargs", {}).get("dtype", "float32")
    return (f"{where} causes: {field}.optim.lr={config.optim.lr} too high (lower it, or "
            f"lengthen {field}.optim.warmup_epochs)" + (
                f"; {field}.model.kwargs.dtype={dtype} (low precision overflows: try float32)"
                if "16" in str(dtype) else "") + ". Then run the same command with the new "
            "setting: it resumes from the last good checkpoint, if one was saved.")


def monitored(monitor, state, step: int, total_steps: int) -> dict:
    """The monitor's scalars at `step` ({} when it is off or not due)."""
    if monitor is None or not monitor.due(step, total_steps):
        return {}
    return {name: float(value) for name, value in monitor(state).items()}


def training_loop(run, hooks: Iterable[Callable[[int], None]] = (), monitor=None,
                  stage: Optional[Stage] = None) -> loop.Loop:
    """The `lib.loop.Loop` of pre-training `run` (a `tasks.common.Run`) from its state's step;
    `stage`: the BoWNet chain stage it trains, if any (named in its messages)."""
    config, mesh = run.config, run.mesh
    total_steps = run.data_info.total_steps
    train_step = jax.jit(run.method.train_step, donate_argnums=0,
                         out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
    counts = saved_unreadable_counts(run.restored_meta)
    return loop.Loop(
        step=lambda state, batch, index: train_step(state, batch),
        batches=device_batches(config, run.train_data, run.method, mesh, int(run.state.step),
                               counts),
        checkpoint_meta=lambda: {UNREADABLE_META: dict(counts),
                                 DEVICES_META: jax.device_count()},
        total_steps=total_steps, images_per_step=config.batch_size, workdir=run.workdir,
        log_every=config.log_every, checkpointer=run.checkpointer,
        checkpoint_every=config.checkpoint_every_steps, settings=config,
        scalars=lambda state, done: monitored(monitor, state, done, total_steps),
        hooks=tuple(hooks), advice=likely_causes(config, stage),
        trace=profiling.TraceWindow.from_config(config, run.workdir))


def train(run, hooks: Iterable[Callable[[int], None]] = (), monitor=None,
          stage: Optional[Stage] = None):
    """Trains `run` (a `tasks.common.Run`: method, mesh, state, checkpointer) from its state's
    step to `run.data_info.total_steps` on the step driver (`lib.loop`), checkpointing every
    `config.checkpoint_every_steps` and at the end; returns the final state (also `run.state`).

    Raises stop.Stopped when a signal stopped it (the same step saved on every process; the same
    command resumes), checkpoint.NonFiniteError when a logged loss or the state to save is
    NaN/infinite (no non-finite checkpoint is ever written). `hooks` are called with the step
    number after each step (tests use them to send SIGTERM). `monitor` (e.g.
    `protocols.monitor.KnnMonitor`): `monitor.due(step, total_steps)` says when,
    `monitor(state) -> {name: float}` scores the state then; its values are logged with that
    step's metrics. `stage`: the BoWNet chain stage it trains, if any (`Stage`).
    """
    logs.say(profiling.parameter_overview(run.state.params))
    run.state = loop.run(training_loop(run, hooks, monitor, stage), run.state)
    return run.state
