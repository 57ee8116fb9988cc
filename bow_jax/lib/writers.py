"""Metrics out: stdout, a JSON-lines file and TensorBoard event files; progress with rate and ETA.

TensorBoard event files come from tensorboardX (a core dependency, no TensorFlow needed); our
lines go through `logs.say` (stdout, process 0). Long phases (feature extraction, probes, k-means)
wrap their loop in `progress(...)`; the training loop reports `Progress` figures with its metrics.
"""
import importlib
import json
import os
import sys
import time
from typing import Iterable, Iterator, Mapping, Optional, TypeVar

import jax
import numpy as np
import tqdm

from bow_jax.lib import files, logs

T = TypeVar("T")
# Reported by Progress.report; printed after the metrics, in their own format.
PROGRESS_KEYS = ("steps_per_s", "images_per_s", "eta_min")


def _import_tensorboardx():
    """tensorboardX, without importing PyTorch for it.

    tensorboardX's package __init__ imports torch whenever it is installed (the `torch` extra),
    only to recognise torch tensors; that costs seconds and GBs of address space in a JAX run
    that logs Python floats. A None entry in sys.modules makes `import torch` raise ImportError,
    which tensorboardX handles; the entry is removed at once, so later `import torch` works.
    """
    if "torch" in sys.modules:
        return importlib.import_module("tensorboardX")
    sys.modules["torch"] = None
    try:
        return importlib.import_module("tensorboardX")
    finally:
        del sys.modules["torch"]


tensorboardX = _import_tensorboardx()


def format_scalars(step: int, scalars: Mapping[str, float], title: str = "") -> str:
    """One stdout line: 'step 20: loss=1.2345, lr=0.1 | 3.1 steps/s, 198 images/s, ETA 4 min'
    (metrics sorted by name; the `Progress` figures last), after '<title>: ' when given."""
    metrics = ", ".join(f"{k}={v:.5g}" for k, v in sorted(scalars.items())
                        if k not in PROGRESS_KEYS)
    line = f"{title + ': ' if title else ''}step {int(step)}: {metrics}"
    if "steps_per_s" in scalars:
        line += (f" | {scalars['steps_per_s']:.3g} steps/s, {scalars['images_per_s']:.4g} "
                 f"images/s, ETA {format_duration(60 * scalars['eta_min'])}")
    return line


def format_duration(seconds: float) -> str:
    """'4.2 s', '42 s', '17 min', '3.2 h': the precision an ETA deserves."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class MetricWriter:
    """Writes scalars on process 0 only (stdout line, `<workdir>/<filename>` JSON lines, TensorBoard
    event files in `workdir` when `tensorboard`; workdir None: stdout only); other processes get a
    silent writer."""

    def __init__(self, workdir: Optional[str], tensorboard: bool = True,
                 filename: str = "metrics.jsonl", start_step: Optional[int] = None,
                 title: str = ""):
        """`start_step`: the step training resumes from; JSON rows logged after it (by a run that
        crashed after its last checkpoint) are dropped, so each step appears once in the file.
        `title`: what each stdout line starts with (e.g. 'linear probe step_4')."""
        self.active = jax.process_index() == 0
        self.title = title
        self._jsonl = None
        self._tb = None
        if self.active and workdir is not None:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, filename)
            if start_step is not None:
                drop_rows_after(path, start_step)
            self._jsonl = open(path, "a", encoding="utf-8")
            if tensorboard:
                # TensorBoard hides the events a crashed run logged past its checkpoint, as above.
                purge = start_step + 1 if start_step else None
                self._tb = tensorboardX.SummaryWriter(workdir, purge_step=purge, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        logs.say(format_scalars(step, scalars, self.title))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, int(step))

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


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "",
             unit: str = "it", every_s: float = 60.0, quiet_below_s: float = 10.0) -> Iterator[T]:
    """Yields the items of `iterable`, showing the rate and the ETA of a long phase on process 0.

    On a terminal (stderr is a TTY): a tqdm bar on stderr, refreshed at most once a second and
    cleared when done. Otherwise (CI logs, `> log.txt`): a `logs.say` line every `every_s`
    seconds (count, rate, ETA) and one at the end, but nothing for a phase shorter than
    `quiet_below_s`, so logs stay short and a days-long phase still reports. Other processes:
    silent. `total`: the expected number of items (default len(iterable) where it has one).
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if jax.process_index() != 0:
        yield from iterable
    elif sys.stderr.isatty():
        yield from tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                             mininterval=1.0, dynamic_ncols=True, leave=False)
    else:
        yield from _progress_lines(iterable, total, desc, unit, every_s, quiet_below_s)


def _progress_line(desc: str, count: int, total: Optional[int], unit: str, seconds: float) -> str:
    rate = count / max(seconds, 1e-9)
    eta = (f", ETA {format_duration((total - count) / max(rate, 1e-9))}"
           if total is not None and count < total else "")
    of_total = f" of {total}" if total is not None else ""
    return (f"{desc}: {count}{of_total} {unit} in {format_duration(seconds)} "
            f"({rate:.3g} {unit}/s{eta})")


def _progress_lines(iterable: Iterable[T], total: Optional[int], desc: str, unit: str,
                    every_s: float, quiet_below_s: float) -> Iterator[T]:
    """`progress` for logs: a line every `every_s`, and an end line (also when the consumer stops
    early) unless the phase took less than `quiet_below_s`."""
    count, start = 0, time.perf_counter()
    last = start
    try:
        for count, item in enumerate(iterable, 1):
            yield item
            now = time.perf_counter()
            if now - last >= every_s and (total is None or count < total):
                logs.say(_progress_line(desc, count, total, unit, now - start))
                last = now
    finally:
        seconds = time.perf_counter() - start
        if seconds >= quiet_below_s or last != start:
            stopped = "" if total is None or count == total else " (stopped early)"
            logs.say(_progress_line(desc, count, total, unit, seconds) + stopped)
