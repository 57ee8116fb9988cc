"""Stops that every process agrees on.

A SIGTERM or SIGINT reaches one process (a preempted host, a user's Ctrl-C); JAX's preemption
service can notify another. Each sets only a local flag. `AgreedStop.should_stop(step)` turns the
flags into one decision: with several processes, one tiny all-gather of the flags per call (the
same call on every process, at the same steps), OR JAX's
`multihost_utils.reached_preemption_sync_point(step)` where the distributed client runs the
preemption service. So every process saves the same step and exits 0, instead of one process
leaving the collectives while the others wait in them forever.

A process that dies is not a stop: the survivors fail in their next collective (gloo/NCCL report
the lost peer) or, at the latest, when JAX's coordination service misses its heartbeats
(`jax.distributed.initialize(heartbeat_timeout_seconds=...)`, 100 s by default).
"""
import contextlib
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from bow_jax.lib import logs


class Stopped(BaseException):
    """A stop signal ended the run as planned: a step loop (`lib/loop.py`) after its current step
    was saved and committed, or a phase outside the loops (`signals_stop_at_once`). main.py prints
    its message as one line and exits 0, so a scheduler that requeues on preemption reruns the
    same command, which resumes.

    A BaseException, as KeyboardInterrupt: raised from a signal handler it may surface anywhere,
    and a broad `except Exception` on its way (an image decoder's, a checkpoint reader's) must not
    turn it into another error or swallow it."""


class AgreedStop:
    """Context manager: installs SIGTERM/SIGINT handlers (main thread only) that set a local flag;
    `should_stop(step)` returns the decision shared by every process."""

    def __init__(self):
        self.local = False
        self._signal = None  # the signal number received, until it is announced
        self._previous = {}
        self._preemption = jax.process_count() > 1  # tried; off once the client says no

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame  # only flags: printing from a handler could re-enter a stream mid-write
        self.local, self._signal = True, signum

    def request(self) -> None:
        """Asks for a stop from code (tests, a time limit)."""
        self.local = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            # A handler installed outside Python (e.g. by the TSL runtime) reads back as None and
            # cannot be reinstalled: fall back to the default action (terminate).
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def should_stop(self, step: int) -> bool:
        """True on every process, at the same `step`, once any process asked to stop. Must be
        called by every process at the same steps (a collective when process_count > 1)."""
        if self._signal is not None:  # said here, not in the handler
            logs.warn(f"process {jax.process_index()} received signal {self._signal}: every "
                      f"process saves a checkpoint at the next agreed step and stops.",
                      all_processes=True)
            self._signal = None
        if jax.process_count() == 1:
            return self.local
        flags = np.asarray(multihost_utils.process_allgather(np.int32(self.local)))
        agreed = bool(flags.any())
        if agreed and jax.process_index() == 0:
            logs.warn(f"Stop requested by process(es) {np.flatnonzero(flags).tolist()}: every "
                      f"process saves step {step} and stops.")
        return self._preemption_notice(step) or agreed

    def _preemption_notice(self, step: int) -> bool:
        """JAX's preemption sync point (a cluster's notice), where the client supports it."""
        if not self._preemption:
            return False
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except (RuntimeError, AttributeError) as e:  # service off or not initialised
            logging.info("JAX preemption sync point unavailable (%s); signals only.", e)
            self._preemption = False
            return False


@contextlib.contextmanager
def signals_stop_at_once(what: str = "the run"):
    """Outside the step loops (feature passes, probes on cached features, SVMs, exports), a
    SIGTERM / SIGINT raises `Stopped` at once, so the process ends as a planned stop (main.py:
    one line, exit 0) rather than killed (status 143, nothing said). Nothing is lost that the
    same command does not redo: results, caches and checkpoints are written atomically, and a
    finished phase is read back. Inside a loop, `AgreedStop` replaces these handlers (and puts
    them back), so a loop still saves its step first. Main thread only; a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        del frame
        raise Stopped(f"{what} stopped by signal {signum} outside a training loop; the same "
                      f"command goes on from its last checkpoint and cached results.")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
