"""Metrics out: stdout, a JSON-lines file and TensorBoard event files; progress with ETA.

This is the only module that imports CLU for logging. TensorBoard needs TensorFlow + tensorboard
(the `tfds` extra); without them training still runs and writes stdout and JSON lines.
"""
import json
import os
import time
from typing import Mapping, Optional

import jax
import numpy as np
from absl import logging

from bow_jax.lib import files


def _tensorboard_writer(logdir: str):
    try:
        from clu import metric_writers  # pylint: disable=import-outside-toplevel
    except ImportError:
        logging.warning("TensorBoard logging off: install the 'tfds' extra (tensorflow, "
                        "tensorboard, clu) to enable it.")
        return None
    return metric_writers.SummaryWriter(logdir)


class MetricWriter:
    """Writes scalars on process 0 only; other processes get a silent writer."""

    def __init__(self, workdir: str, tensorboard: bool = True, filename: str = "metrics.jsonl",
                 start_step: Optional[int] = None):
        """`start_step`: the step training resumes from; JSON rows logged after it (by a run that
        crashed after its last checkpoint) are dropped, so each step appears once in the file."""
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, filename)
            if start_step is not None:
                drop_rows_after(path, start_step)
            self._jsonl = open(path, "a", encoding="utf-8")
            self._tb = _tensorboard_writer(workdir) if tensorboard else None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(scalars.items())))
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.write_scalars(step, scalars)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def drop_rows_after(path: str, step: int) -> None:
    """Rewrites the JSON-lines file at `path` (atomically) without the rows past `step`; a torn
    last line (a crash mid-write) is dropped too."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        files.atomic_write_text(path, "".join(kept))


class Progress:
    """Steps/s, images/s and ETA between two reports (wall clock, host side)."""

    def __init__(self, total_steps: int, images_per_step: int, start_step: int = 0):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self._last_step = start_step
        self._last_time: Optional[float] = None

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        if self._last_time is None or step == self._last_step:
            self._last_time, self._last_step = now, step
            return {}
        steps_per_s = (step - self._last_step) / (now - self._last_time)
        self._last_time, self._last_step = now, step
        eta_s = (self.total_steps - step) / max(steps_per_s, 1e-9)
        return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.images_per_step,
                "eta_min": eta_s / 60}
