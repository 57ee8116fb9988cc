"""Profiling the way flax and big_vision do it: a jax.profiler trace of a window of steps, and a
parameter count per module.

`TraceWindow` is a step hook: the driver calls it with the number of steps done (and that step's
outputs) after every step and `close()` when the loop ends, however it ends. It makes the same
calls as `clu.periodic_actions.Profile` (`jax.profiler.start_trace` / `stop_trace`), without
importing clu.periodic_actions, which imports TensorFlow. The trace (`<host>.xplane.pb` and
`<host>.trace.json.gz` under `<dir>/plugins/profile/<timestamp>/`) opens in TensorBoard's profile
plugin (`tensorboard --logdir=<workdir>/profile`) or in Perfetto (ui.perfetto.dev, the
.trace.json.gz).

Every process traces its own devices, as jax's multi-host profiling does. One process writes to
`<workdir>/profile`; with several processes each writes to `<workdir>/profile/process_<i>`, since
the trace files are named after the host and processes that share a host would overwrite each
other's.

`parameter_overview` uses `clu.parameter_overview`, which (unlike clu.periodic_actions and
clu.metric_writers) imports no TensorFlow.
"""
import os
from typing import Any, Mapping, Optional

import jax
from clu import parameter_overview as clu_overview

from bow_jax.lib import logs
from bow_jax.lib.errors import InputError

PROFILE_DIR = "profile"  # below the workdir


def trace_dir(workdir: str) -> str:
    """Where this process writes its trace: `<workdir>/profile`, or
    `<workdir>/profile/process_<i>` when the run has several processes (see the module doc)."""
    folder = os.path.join(workdir, PROFILE_DIR)
    if jax.process_count() > 1:
        folder = os.path.join(folder, f"process_{jax.process_index()}")
    return folder


class TraceWindow:
    """A jax.profiler trace of steps [start_step, start_step + num_steps) (0-based step indices:
    the trace starts once `start_step` steps are done and stops once `start_step + num_steps`
    are). Off when num_steps is 0.

    A run that resumes inside the window traces the rest of it; `start_step` 0 starts after the
    first step (the hook first runs then; that step is mostly compilation anyway). One trace per
    instance: a window, once closed, does not start again.

    Raises InputError (naming config.profile_start_step / config.profile_num_steps) when either
    is negative.
    """

    def __init__(self, workdir: str, start_step: int, num_steps: int):
        if start_step < 0:
            raise InputError(f"config.profile_start_step={start_step}: must be >= 0 (the number "
                             "of steps done when the trace starts).")
        if num_steps < 0:
            raise InputError(f"config.profile_num_steps={num_steps}: must be >= 0 (steps to "
                             "trace; 0 = no trace).")
        self.logdir = os.path.join(workdir, PROFILE_DIR)  # TensorBoard's, for every process
        self.folder = trace_dir(workdir)
        self.start_step = int(start_step)
        self.stop_step = int(start_step) + int(num_steps)
        self.active = False  # a trace of ours is running
        self.first = None  # steps done when the trace started
        self._taken = num_steps == 0  # nothing (more) to trace

    @classmethod
    def from_config(cls, config, workdir: str) -> "TraceWindow":
        """The window of `config.profile_start_step` / `config.profile_num_steps`."""
        return cls(workdir, config.profile_start_step, config.profile_num_steps)

    def __call__(self, done: int, outputs: Any = None) -> None:
        """After a step: `done` steps completed; `outputs` (any pytree of arrays, e.g. the new
        state or the metrics) is waited on before the trace starts, so earlier steps' device
        work stays out of it, and before it stops, so the last step's device work is in it.
        Without `outputs` the last step may still be running on the device at the stop."""
        if self.active and done >= self.stop_step:
            jax.block_until_ready(outputs)
            self._stop(done)
        elif not self._taken and self.start_step <= done < self.stop_step:
            jax.block_until_ready(outputs)
            jax.profiler.start_trace(self.folder)
            self.active, self.first, self._taken = True, done, True

    def close(self, done: Optional[int] = None) -> None:
        """Stops a trace still running (the loop ended or stopped inside the window); a no-op
        otherwise. Call it from the driver's `finally`. `done`: the steps completed, if known,
        for the message."""
        if self.active:
            self._stop(done)

    def _stop(self, done: Optional[int]) -> None:
        """Stops the trace and says which steps it holds and where it went."""
        self.active = False  # first: a failing stop is not retried by close()
        jax.profiler.stop_trace()
        steps = (f"steps {self.first}-{done - 1}" if done is not None
                 else f"steps from {self.first} on")
        logs.say(f"profile: {steps} traced -> {self.folder} "
                 f"(view: tensorboard --logdir={self.logdir})")

    def __enter__(self) -> "TraceWindow":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def parameter_overview(params: Mapping[str, Any], table: bool = False) -> str:
    """The parameter count of each top-level entry of `params` (e.g. 'backbone', 'bow_head';
    a Flax `params` collection, or variables without the collection level) and the total, one
    line each, counts with thousands separators:

        parameters: 11,689,512
          backbone  11,176,512
          head         513,000

    Leaves are anything with a `.shape` (arrays, jax.ShapeDtypeStruct). `table`: also clu's
    table of every variable (name, shape, size; no statistics, so no device work).
    Raises TypeError when `params` is not a mapping.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"parameter_overview: expected a dict of parameters, got {type(params)}.")
    counts = {str(name): _count(value) for name, value in params.items()}
    width = max([len(name) for name in counts] + [0])
    total = sum(counts.values())
    digits = len(f"{total:,}")
    lines = [f"parameters: {total:,}"]
    lines += [f"  {name:<{width}}  {count:>{digits},}" for name, count in counts.items()]
    if table:
        lines.append(clu_overview.get_parameter_overview(_plain(params), include_stats=False))
    return "\n".join(lines)


def _count(value: Any) -> int:
    """Parameters in one entry: a nested dict (clu counts it) or a single array."""
    if isinstance(value, Mapping):
        return int(clu_overview.count_parameters(_plain(value)))
    return int(clu_overview.count_parameters({"value": value}))


def _plain(tree: Mapping[str, Any]) -> dict:
    """`tree` as nested plain dicts: clu accepts only dict / FrozenDict, not other mappings."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
