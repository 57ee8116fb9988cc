"""The one step driver: every loop that runs steps goes through `run(loop, state)`.

Pre-training (`pretrain.py`, and so each stage of the BoWNet chain), the augmented linear probe
(`protocols/augmented_linear.py`) and semi-supervised fine-tuning (`protocols/semisupervised.py`)
differ only in their `Loop`: the step, the batches, where they write, their scalars and hooks.
What every loop gets from here:

- **Bounded run-ahead.** The host dispatches at most `RUN_AHEAD_STEPS` steps ahead of the device,
  so a stop's checkpoint is committed within a few steps' time of the signal (a preemption gives
  ~30 s), and a loop's views never pile up on the device.
- **One stop convention.** A SIGTERM / SIGINT on any process becomes one decision of every
  process (`lib/stop.py`); the loop saves that step, waits for it to be committed and raises
  `stop.Stopped` (main.py: one line, exit 0; the same command resumes).
- **Checkpoints** every `checkpoint_every` steps, at the end and on a stop, each announced by one
  line once it is committed on disk.
- **Nothing non-finite passes.** The logged means are checked for NaN / infinity (free: they are
  fetched anyway) and every state is checked before it is saved (`checkpoint.Checkpointer.save`),
  so the newest checkpoint is always the last good one (`checkpoint.NonFiniteError`).
- **Metric rows** every `log_every` steps: stdout, `<workdir>/metrics.jsonl` and TensorBoard
  (`lib/writers.py`), with rate and ETA; a resumed loop drops the rows past its checkpoint.
"""
import collections
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.lib import checkpoint, profiling, stop, writers

RUN_AHEAD_STEPS = 2  # steps the host may dispatch ahead of the device (see RunAhead)

StepFn = Callable[[Any, Any, int], tuple]  # (state, batch, step index) -> (state, metrics)


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


@dataclasses.dataclass
class Loop:
    """What one loop runs. Steps are numbered from 0; `state.step` is the number of steps done.

    step: `(state, batch, index) -> (state, metrics)` dispatches step `index` (one jitted,
        donated function; metrics: {name: float32 scalar}, not donated).
    batches: the batches of steps state.step, state.step + 1, ...
    total_steps: the loop ends once this many steps are done.
    images_per_step: the global batch (for the images/s of the metric rows).
    title: what the loop's lines start with ('' for pre-training, e.g. 'linear probe step_4').
    workdir: where metrics.jsonl and the TensorBoard events go (None: stdout only).
    log_every: steps between metric rows (and checks of the logged means); the last step logs.
    checkpointer, checkpoint_every, settings: save the state every `checkpoint_every` steps, at
        the end and on a stop, with `settings` (the config, or a dict a restore compares);
        checkpointer None: nothing is saved (a stop then loses the loop).
    checkpoint_meta: more JSON for each checkpoint's meta (e.g. fine-tuning's test scores).
    scalars: `(state, done) -> {name: float}`, values logged with step `done` (a row of their own
        when the step logs nothing else): a k-NN monitor, test scores at an epoch's end; {} when
        not due.
    hooks: called with the number of steps done after each step (tests send signals there;
        profiling).
    advice: appended to a non-finite error (what usually makes this loop diverge).
    trace: a `profiling.TraceWindow` (a jax.profiler trace of a few steps), closed however the
        loop ends.
    """
    step: StepFn
    batches: Iterator
    total_steps: int
    images_per_step: int
    title: str = ""
    workdir: Optional[str] = None
    log_every: int = 50
    checkpointer: Optional[checkpoint.Checkpointer] = None
    checkpoint_every: int = 1000
    settings: Any = None
    checkpoint_meta: Callable[[], dict] = dict
    scalars: Callable[[Any, int], dict] = lambda state, done: {}
    hooks: Sequence[Callable[[int], None]] = ()
    advice: str = ""
    trace: Optional[profiling.TraceWindow] = None

    def name(self) -> str:
        return self.title or "training"


def run(loop: Loop, state):
    """Runs `loop` from `state.step` to `loop.total_steps`; returns the final state.

    Raises stop.Stopped after saving (and committing) the step at which every process agreed to
    stop; checkpoint.NonFiniteError (nothing non-finite saved) when a logged mean or a state to
    save holds NaN / infinity; errors.WriteError when a checkpoint cannot be written. Pending
    checkpoint writes are committed however the loop ends."""
    start = int(state.step)
    # Also compiles the state check now, not in the grace period of the first stop's save.
    checkpoint.check_finite(state, f"The starting state of the {loop.name()} (step {start})")
    writer = writers.MetricWriter(loop.workdir, start_step=start, title=loop.title)
    try:
        with stop.AgreedStop() as stopper:
            return _steps(loop, state, start, writer, stopper)
    finally:
        if loop.trace is not None:
            loop.trace.close()
        if loop.checkpointer is not None:
            loop.checkpointer.wait()
        writer.close()


class _Accumulated:
    """The metrics of the steps since the last row, summed on the device (one small jitted add,
    not donated: the run-ahead bound waits on each step's own metrics)."""

    _add = staticmethod(jax.jit(lambda total, m: jax.tree.map(jnp.add, total, m)))

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, metrics) -> None:
        self.total = metrics if self.total is None else self._add(self.total, metrics)
        self.count += 1

    def means(self) -> dict:
        """{name: float} means since the last call (which resets them)."""
        total, count = jax.device_get(self.total), self.count
        self.total, self.count = None, 0
        return {k: float(np.asarray(v)) / count for k, v in (total or {}).items()}


def _steps(loop: Loop, state, start: int, writer, stopper: stop.AgreedStop):
    progress = writers.Progress(loop.total_steps, loop.images_per_step, start)
    run_ahead, accumulated = RunAhead(), _Accumulated()
    last_saved = None if loop.checkpointer is None else loop.checkpointer.latest_step()
    for index in range(start, loop.total_steps):
        run_ahead.before_dispatch()
        state, metrics = loop.step(state, next(loop.batches), index)
        run_ahead.after_dispatch(metrics)
        accumulated.add(metrics)
        done = index + 1
        scalars = loop.scalars(state, done)
        if done % loop.log_every == 0 or done == loop.total_steps:
            means = accumulated.means()
            check_metrics(loop, done, means, last_saved)
            writer.write_scalars(done, {**means, **scalars, **progress.report(done)})
        elif scalars:
            writer.write_scalars(done, scalars)
        if loop.trace is not None:
            loop.trace(done, metrics)
        for hook in loop.hooks:
            hook(done)
        stopping = done < loop.total_steps and stopper.should_stop(done)
        if stopping or done % loop.checkpoint_every == 0 or done == loop.total_steps:
            last_saved = save(loop, done, state) or last_saved
        if stopping:
            raise stop.Stopped(stopped_message(loop, done))
    return state


def check_metrics(loop: Loop, done: int, means: dict, last_saved: Optional[int]) -> None:
    """checkpoint.NonFiniteError naming the step and the metrics when a logged mean is NaN or
    infinite."""
    bad = sorted(k for k, v in means.items() if not np.isfinite(v))
    if bad:
        raise checkpoint.NonFiniteError(
            f"Non-finite metrics at step {done} of the {loop.name()}: {', '.join(bad)} (mean over "
            f"the last {loop.log_every} steps or fewer) hold NaN or infinity. Stopped; "
            f"{_kept(loop, last_saved)} {loop.advice}".rstrip())


def _kept(loop: Loop, last_saved: Optional[int]) -> str:
    """What a non-finite stop keeps: the last good checkpoint, or none (none saved yet, or no
    checkpointer), in words rather than 'step None'."""
    if loop.checkpointer is None:
        return "this loop saves no checkpoints."
    if last_saved is None:
        return "no checkpoint was saved yet: nothing saved is lost, and a rerun starts over."
    return f"nothing was saved past the last good checkpoint (step {last_saved})."


def save(loop: Loop, done: int, state) -> Optional[int]:
    """Starts the checkpoint of step `done` (announced once committed); its step, or None when
    the loop has no checkpointer."""
    if loop.checkpointer is None:
        return None
    folder = loop.checkpointer.folder(done)
    prefix = f"{loop.title}: " if loop.title else ""
    try:
        loop.checkpointer.save(done, state, loop.settings, extra_meta=loop.checkpoint_meta(),
                               message=f"{prefix}checkpoint: step {done}/{loop.total_steps} -> "
                                       f"{folder}")
    except checkpoint.NonFiniteError as e:  # finite logged means, non-finite state
        raise checkpoint.NonFiniteError(f"{e} {loop.advice}".rstrip()) from None
    return done


def stopped_message(loop: Loop, done: int) -> str:
    """The one line of a stop: where the step went and how to go on (its checkpoint committed)."""
    if loop.checkpointer is None:
        where = "not saved (no checkpoint folder)"
    else:
        loop.checkpointer.wait()  # committed (and announced) before the process exits
        where = f"saved in {loop.checkpointer.folder(done)}"
    return (f"{loop.name()} stopped by a signal at step {done}/{loop.total_steps}, {where}; the "
            f"same command resumes it.")
