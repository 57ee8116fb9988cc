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
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Stopped(RuntimeError):
    """A stop signal ended a long phase that is not the training loop (the augmented linear
    probe, fine-tuning) after its current step was checkpointed: a planned stop. main.py prints
    its message as one line and exits 0, as for a training run stopped by a signal, so a
    scheduler that requeues on preemption reruns the same command, which resumes."""


class AgreedStop:
    """Context manager: installs SIGTERM/SIGINT handlers (main thread only) that set a local flag;
    `should_stop(step)` returns the decision shared by every process."""

    def __init__(self):
        self.local = False
        self._previous = {}
        self._preemption = jax.process_count() > 1  # tried; off once the client says no

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("Process %d received signal %d: every process saves a checkpoint at the "
                        "next agreed step and stops.", jax.process_index(), signum)
        self.local = True

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
        if jax.process_count() == 1:
            return self.local
        flags = np.asarray(multihost_utils.process_allgather(np.int32(self.local)))
        agreed = bool(flags.any())
        if agreed and jax.process_index() == 0:
            logging.warning("Stop requested by process(es) %s: every process saves step %d and "
                            "stops.", np.flatnonzero(flags).tolist(), step)
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
