"""One writer per workdir: an exclusive lock held by every task that writes there.

`with WorkdirLock(workdir): ...` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<workdir>/.lock`. The
kernel drops the lock when the process ends, however it ends (SIGKILL, OOM, a lost host), so a
lock left behind never blocks a restart; the file itself stays and holds the holder's host, pid,
start time and command, which a refused run prints.

Several processes of one run (multi-host): only process 0 takes the lock, and the others learn
the outcome from it (one tiny broadcast), so a second run fails on every process at once. Why
process 0 only: all processes of a run write the same workdir (process 0 writes metrics, config
and Orbax's commit; every process writes its array shards), so their locks would refuse each
other; the group is identified by its process 0. On a shared filesystem flock works across hosts
where the filesystem supports it (NFSv4, Lustre with flock); on others it only guards one host.
Re-entrant within a process: a task that runs another task in the same workdir keeps one lock.
"""
import datetime
import fcntl
import json
import os
import socket
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from bow_jax.lib import errors
from bow_jax.lib.errors import ExplainedError

LOCK_NAME = ".lock"
_held = {}  # realpath -> [file object, depth]
_guard = threading.Lock()


class WorkdirLockedError(ExplainedError, RuntimeError):
    """Another process (group) holds the workdir."""


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.datetime.now().isoformat(timespec="seconds"),
                       "command": shortened(" ".join(sys.argv))})


def shortened(command: str, limit: int = 600) -> str:
    """`command`, its middle elided past `limit` characters: the start names the program and its
    config, the end holds the overrides that win (absl applies the last of repeated flags)."""
    if len(command) <= limit:
        return command
    head = limit // 3
    return f"{command[:head]} ... {command[-(limit - head - 5):]}"


def _describe(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')} ({holder.get('command')})")


def _acquire(path: str):
    """The open, locked lock file; WorkdirLockedError naming the holder."""
    try:
        f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    except OSError as e:  # a read-only or full file system, no rights
        raise errors.WriteError(f"--workdir={os.path.dirname(path)}: cannot write its lock file "
                                f"{path} ({e.strerror or e}).") from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        workdir = os.path.dirname(path)
        raise WorkdirLockedError(  # pylint: disable=raise-missing-from
            f"--workdir={workdir} is in use by another run: {_describe(path)} holds {path}. "
            "Wait for it to finish or stop it, or use another --workdir.")
    f.seek(0)
    f.truncate()
    f.write(_holder_text())
    f.flush()
    return f


def _check_enclosing(workdir: str) -> None:
    """WorkdirLockedError when a folder above `workdir` is the workdir of a live run of another
    process (its lock file is held): a BoWNet chain's stage folders, or a run's eval/, belong
    to the run that holds the chain's workdir. A lock file left by a finished run is free."""
    parent = os.path.dirname(workdir)
    while parent != workdir:
        path = os.path.join(parent, LOCK_NAME)
        if path not in _held and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by close
            except OSError:
                raise WorkdirLockedError(  # pylint: disable=raise-missing-from
                    f"--workdir={workdir} lies inside {parent}, the workdir of another run: "
                    f"{_describe(path)} holds {path}. Wait for it to finish or stop it, or use "
                    "another --workdir.")
        workdir, parent = parent, os.path.dirname(parent)


class WorkdirLock:
    """Context manager holding the exclusive lock on `workdir` (created if missing)."""

    def __init__(self, workdir: str):
        self.workdir = os.path.realpath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)

    def __enter__(self):
        error = None
        if jax.process_index() == 0:
            try:
                self._take()
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(ok) and error is None:
                error = WorkdirLockedError(
                    f"--workdir={self.workdir} is in use by another run (process 0 could not "
                    f"lock {self.path}; its log names the holder).")
        if error is not None:
            raise error
        return self

    def _take(self) -> None:
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:  # a file of that name, a read-only or full file system, no rights
            raise errors.WriteError(f"--workdir={self.workdir}: cannot be created or used as a "
                                    f"folder ({e.strerror or e}).") from e
        with _guard:
            if self.path in _held:
                _held[self.path][1] += 1
            else:
                _check_enclosing(self.workdir)
                _held[self.path] = [_acquire(self.path), 1]

    def __exit__(self, *exc):
        if jax.process_index() != 0:
            return
        with _guard:
            entry = _held.get(self.path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self.path]
                fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
                entry[0].close()
