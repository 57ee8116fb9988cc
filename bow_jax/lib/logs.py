"""What a run prints: our own lines on stdout, library chatter off unless asked for.

Two kinds of output, kept apart on purpose:

* Our lines (progress, metrics, checkpoints saved, where results went) are plain `print`s on
  process 0, through `say` (stdout) and `warn` (stderr). They never depend on a log level, so a
  quiet run still says what it does, and a 64-process run says it once.
* Library logging (Orbax writes ~50 INFO lines per checkpoint save; JAX announces every backend it
  could not load, e.g. "Unable to initialize backend 'tpu'"; TensorFlow's C++ start-up banners) is
  set to WARNING by `setup`, the first thing `main.py` calls. `--verbosity=0` (absl's flag, also
  `-v 0`) brings INFO back, `--verbosity=1` DEBUG.

Libraries log through Python's `logging` (JAX, Orbax via absl), absl's C++ logging (XLA,
TensorFlow: TF_CPP_MIN_LOG_LEVEL) or write to file descriptor 2 before any of those is configured
(TensorFlow's oneDNN banner at import): `quiet_native_stderr` covers the last.
"""
import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator, Optional

import jax
from absl import logging as absl_logging

import bow_jax

# Loggers of the libraries we run; each is set explicitly because some set their own level.
LIBRARY_LOGGERS = ("absl", "jax", "jaxlib", "orbax", "tensorflow", "tensorflow_datasets",
                   "etils", "tensorboardX", "PIL", "matplotlib")

_QUIET_TF_CPP_LEVEL = "2"  # TensorFlow / XLA C++: 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR
_state = {"quiet": True}


def absl_verbosity(verbosity: Optional[int]) -> int:
    """absl's verbosity for `--verbosity` (None: the flag was not given -> -1, WARNING)."""
    return -1 if verbosity is None else max(int(verbosity), absl_logging.FATAL)


def level_for(verbosity: Optional[int]) -> int:
    """Python logging level for absl's `--verbosity`: None (not given) or -1 WARNING, 0 INFO,
    1 or more DEBUG, -2 ERROR, -3 FATAL."""
    return absl_logging.converter.absl_to_standard(min(absl_verbosity(verbosity), 1))


def setup(verbosity: Optional[int] = None) -> None:
    """Sets every library's logging to the level of `verbosity` (see `level_for`).

    Call it before any backend is initialised or TensorFlow is imported: TF_CPP_MIN_LOG_LEVEL is
    read once, at the C++ library's first log line. The user's own TF_CPP_MIN_LOG_LEVEL (set
    before the process started) is kept when `verbosity` is None; the '1' that `import jax`
    puts there is not the user's (`bow_jax.USER_TF_CPP_MIN_LOG_LEVEL`).
    """
    level = level_for(verbosity)
    _state["quiet"] = level > logging.INFO
    if verbosity is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = (bow_jax.USER_TF_CPP_MIN_LOG_LEVEL
                                              or _QUIET_TF_CPP_LEVEL)
    else:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if level <= logging.INFO else _QUIET_TF_CPP_LEVEL
    warnings.formatwarning = _format_warning if _state["quiet"] else _DEFAULT_FORMAT
    absl_logging.set_verbosity(absl_verbosity(verbosity))  # absl's logger; root under app.run
    logging.getLogger().setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)


_DEFAULT_FORMAT = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (classes defined in bow_jax) as 'warning: <message>', like `warn`;
    other libraries' keep Python's format (file, line and source)."""
    if category.__module__.startswith("bow_jax"):
        return f"warning: {message}\n"
    return _DEFAULT_FORMAT(message, category, filename, lineno, line)


def is_quiet() -> bool:
    """True while library INFO logging is off (the default after `setup()`)."""
    return _state["quiet"]


def say(message: str) -> None:
    """Prints `message` as one line on stdout, on process 0 only, flushed at once (so it shows in
    order with other processes' output and in `tail -f` of a redirected log)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def warn(message: str, all_processes: bool = False) -> None:
    """Prints 'warning: <message>' on stderr, on process 0 (or on every process, each line
    prefixed with its index, when `all_processes` and the run has several)."""
    index = jax.process_index()
    if index != 0 and not all_processes:
        return
    prefix = f"[process {index}] " if all_processes and jax.process_count() > 1 else ""
    print(f"{prefix}warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """While library logging is quiet, sends file descriptor 2 to /dev/null for the block.

    For imports whose C++ side prints banners before any log level applies (TensorFlow's
    "oneDNN custom operations are on" at `import tensorflow`). Python exceptions still propagate;
    only text written to stderr inside the block is lost, so keep the block to the import.
    """
    if not is_quiet():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
