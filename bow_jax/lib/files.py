"""Files that appear whole or not at all: the one home for atomic writes.

Every result, vocabulary, export and figure is written to a temporary file in the destination's
folder, flushed to disk, then renamed over the destination. A crash, SIGTERM or full disk leaves
either the old file or none, never half of one. The file gets the permissions `open()` would
give it (0666 less the umask, usually 0644), not mkstemp's private 0600: results are for sharing.
"""
import contextlib
import os
import stat
import tempfile

import jax


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """`with atomic_open(path, 'wb') as f: ...` writes `path` atomically ('w' text is UTF-8)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _mode_for(path: str) -> int:
    """The permission bits `open(path, 'w')` would leave: those of the file it replaces, else
    0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, e.g. 0o022. Read from /proc on Linux; elsewhere by setting and
    restoring it (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_config_json(workdir: str, config, name: str = "config.json") -> str:
    """Writes the resolved `config` (an ml_collections ConfigDict) to `<workdir>/<name>`,
    indented, keys sorted, atomically, on process 0 only; returns the path (on every process).

    Values JSON cannot hold (tuples become lists; other objects their repr) are written
    best-effort, as ConfigDict.to_json_best_effort does: the file is for reading, the Python
    config file and overrides stay the source of a run.
    """
    path = os.path.join(workdir, name)
    if jax.process_index() == 0:
        atomic_write_text(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return path
