"""The one place that talks to Orbax: checkpoints that are whole, verified and finite.

A checkpoint (folder `<directory>/<step>`) is the whole training state (item `state`) plus a JSON
item `meta`: the config and a fingerprint of the state (per-leaf checksums, computed on the
device). Orbax writes each checkpoint to a temporary folder and renames it when complete.

Guarantees:
- A non-finite state is never saved (`NonFiniteError`), so good checkpoints are never rotated out
  of `max_to_keep` by bad ones.
- `restore()` checks each step from the newest down: folder complete, `meta` readable, the saved
  shapes equal to this config's state (else a ValueError naming the config fields that differ:
  that is a config error, not damage), the restored state's fingerprint equal to the saved one,
  and finite. A damaged step is skipped with a warning naming its folder; once an intact step is
  found, the damaged ones are moved aside to `<directory>/<reason>-<step>-<time>` (never deleted)
  so that Orbax's rotation does not count them and the next save of that step number does not
  collide. When no step is intact, `CorruptCheckpointError` names every folder and moves nothing.
- A save that fails on the disk (full, read-only, permissions) raises `WriteError` naming the
  folder and the system's reason at the next `save`, `wait` or `close`; its `message` is never
  printed. The older steps are untouched (Orbax writes to a temporary folder first).
"""
import errno
import json
import logging as py_logging
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from bow_jax.lib import logs
from bow_jax.lib.errors import ExplainedError, InputError, WriteError

# Config sections that decide the shape of the state: a checkpoint written under different values
# cannot be restored into this run's state.
STATE_DEFINING_FIELDS = ("method", "model")
FINGERPRINT_VERSION = 1
_KNUTH = 2654435761  # odd multiplier: position weights w_i = 1 + i * _KNUTH are odd, so invertible


class NonFiniteError(ExplainedError, RuntimeError):
    """A loss or a state holds NaN or infinity: training stops, nothing is saved."""


def last_good(step: Optional[int]) -> str:
    """The sentence of a non-finite error on what is kept: the newest checkpoint `step`, or (None)
    that none was saved yet, so there is nothing to lose and nothing to resume."""
    if step is None:
        return "No checkpoint was saved yet: nothing saved is lost, and a rerun starts over."
    return f"The newest kept checkpoint ({step}) is the last good one."


class CorruptCheckpointError(ExplainedError, ValueError):
    """A checkpoint folder is incomplete, unreadable, fails its fingerprint or is non-finite."""


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort()) if isinstance(
        config, ml_collections.ConfigDict) else dict(config)


def leaf_name(path) -> str:
    """'params/backbone/conv1/kernel': the same for a dataclass state and its raw (dict) restore."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_words(x: jax.Array) -> jax.Array:
    """The bit pattern of `x` as a flat uint32 vector (any dtype; PRNG keys by their key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size in (4, 8):  # 8-byte words become two uint32 words (a trailing axis of 2)
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    narrow = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32).reshape(-1)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 [2]: (sum of words, sum of words * (1 + i * 2654435761)), both modulo 2**32.

    Integer sums wrap exactly, so the result does not depend on the reduction order (same on any
    device count or backend); the odd position weights make any change of one word, or a swap of
    two, change the second sum."""
    words = _leaf_words(x)
    weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(_KNUTH) + jnp.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * weights, dtype=jnp.uint32)])


def _leaf_finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


@jax.jit
def _inspect(state):
    """(bool [L] finite per leaf, uint32 [L, 2] checksums per leaf): one dispatch, one fetch."""
    leaves = jax.tree.leaves(state)
    if not leaves:
        return jnp.zeros((0,), bool), jnp.zeros((0, 2), jnp.uint32)
    return (jnp.stack([_leaf_finite(x) for x in leaves]),
            jnp.stack([_leaf_checksum(x) for x in leaves]))


def inspect(state: Any) -> tuple:
    """({leaf name: [sum, weighted sum]} fingerprint, [names of non-finite leaves]) of `state`.

    Computed on the device by one jitted reduction and fetched as two small arrays."""
    names = [leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    finite, sums = jax.device_get(_inspect(state))
    fingerprint = {n: [int(a), int(b)] for n, (a, b) in zip(names, np.asarray(sums))}
    return fingerprint, [n for n, ok in zip(names, np.asarray(finite)) if not ok]


def check_finite(state: Any, where: str) -> None:
    """Raises NonFiniteError naming `where` and the non-finite leaves of `state` (evaluate calls
    this before scoring a state)."""
    _, bad = inspect(state)
    if bad:
        raise NonFiniteError(
            f"{where}: the state holds NaN or infinity in {len(bad)} leaves ({', '.join(bad[:8])}"
            f"{', ...' if len(bad) > 8 else ''}). It was not trained stably: see the run's "
            "metrics.jsonl, lower config.optim.lr or train in float32.")


def _is_process_0() -> bool:
    return jax.process_index() == 0


# A failed asynchronous write ends Orbax's event loop while TensorStore still completes the other
# writes of that save; each then reports "Event loop is closed" through sys.unraisablehook (one
# traceback per array, ~1,000 lines). The failure itself reaches us as an exception, which the
# Checkpointer re-raises as WriteError: these echoes say nothing more.
def _is_loop_closed_echo(unraisable) -> bool:
    """Also Orbax's read coroutines closed half-way through a damaged restore (each prints the
    TensorStore spec; the restore already raised CorruptCheckpointError naming the folder)."""
    code = getattr(unraisable.object, "cr_code", None)
    return ((isinstance(unraisable.exc_value, RuntimeError)
             and str(unraisable.exc_value) == "Event loop is closed")
            or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename))


class _OrbaxErrorFilter(py_logging.Filter):
    """Drops Orbax's ERROR records (each a full traceback), and asyncio's "exception was never
    retrieved" for Orbax's abandoned writes, while library logging is quiet: every Orbax failure
    reaches the Checkpointer as an exception that it re-raises, naming the folder and the reason.
    `--verbosity=0` shows them."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno < py_logging.ERROR or not logs.is_quiet():
            return True
        tb = record.exc_info[2] if record.exc_info else None
        files = [record.pathname] + [f.filename for f in traceback.extract_tb(tb)]
        return not any(f"{os.sep}orbax{os.sep}" in name for name in files)


_installed = []
_last_echo = [0.0]  # time.monotonic() of the latest "Event loop is closed" echo
STRAGGLER_QUIET_S = 0.5  # a failed save's stragglers are done once they are this long quiet
STRAGGLER_MAX_S = 10.0


def _silence_orbax_teardown() -> None:
    """Installs (once per process) the unraisable-hook and log filters above."""
    if _installed:
        return
    _installed.append(True)
    previous = sys.unraisablehook

    def hook(unraisable):
        if _is_loop_closed_echo(unraisable):
            _last_echo[0] = time.monotonic()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    for name in ("absl", "asyncio"):
        py_logging.getLogger(name).addFilter(_OrbaxErrorFilter())


def _wait_for_stragglers() -> None:
    """After a failed save: waits until TensorStore's writes still in flight have all reported
    (their echoes stop), at most STRAGGLER_MAX_S. One that completes while the interpreter shuts
    down aborts the process (status 134, 'terminate called ...') after our error message."""
    start = time.monotonic()
    while time.monotonic() - start < STRAGGLER_MAX_S:
        if time.monotonic() - max(_last_echo[0], start) >= STRAGGLER_QUIET_S:
            return
        time.sleep(0.05)


def system_reason(error: BaseException) -> str:
    """The operating system's words for why a write failed ('No space left on device'), from an
    OSError or TensorStore's "[os_error_code='28']"; else the error's type and first line."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    match = re.search(r"os_error_code='?(\d+)", str(error))
    if match:
        return os.strerror(int(match.group(1)))
    if "RESOURCE_EXHAUSTED" in str(error):
        return os.strerror(errno.ENOSPC)
    return short_reason(error)


def short_reason(error: BaseException, limit: int = 160) -> str:
    """'Type: first line' of the innermost cause of `error` (Orbax wraps TensorStore's words in
    'See full TensorStore details'), without the JSON spec and the database path TensorStore
    adds, at most `limit` characters."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    error = seen[-1]
    text = (str(error).strip().splitlines() or [""])[0]
    text = re.split(r" \{|\[source", text)[0].strip()
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _with_errno(error: OSError, number: Optional[int]) -> OSError:
    """`error` with `.errno` set: OSError(errno, text) would print as '[Errno 28] text'."""
    error.errno = number
    return error


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints plus every `keep_period`-th step."""

    def __init__(self, directory: str, max_to_keep: int = 3, keep_period: Optional[int] = None):
        self.directory = os.path.abspath(directory)
        _silence_orbax_teardown()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
            cleanup_tmp_directories=True)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta"),
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()})
        except OSError as e:
            raise _with_errno(WriteError(f"Cannot create the checkpoint folder "
                                         f"{self.directory}: {system_reason(e)}."), e.errno) from e
        # (step, message or None) of the save in flight: the message is printed once, by
        # whoever first sees the commit (the watcher thread, or `wait`/`close`/the next `save`).
        self._pending = None
        self._pending_lock = threading.Lock()

    def folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, settings, extra_meta: Optional[dict] = None,
             message: Optional[str] = None) -> None:
        """Starts an asynchronous save of `state` with `settings` (a config or a dict) in its
        meta (device arrays are copied before this returns, so the state may be donated right
        after). `message` is printed (`logs.say`) once the step is committed on disk, exactly
        once, never for a failed save.

        Raises NonFiniteError, saving nothing, when the state holds NaN or infinity; WriteError
        (naming the folder and the system's reason) when the previous save failed or this one
        cannot start."""
        self._finish_previous()
        fingerprint, bad = inspect(state)
        if bad:
            raise NonFiniteError(
                f"Step {step}: the state holds NaN or infinity in {len(bad)} leaves "
                f"({', '.join(bad[:8])}); not saved. {last_good(self.latest_step())}")
        meta = {"config": config_to_dict(settings), **(extra_meta or {}),
                "fingerprint": {"version": FINGERPRINT_VERSION, "leaves": fingerprint}}
        existed = os.path.isdir(self.folder(step))
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # pylint: disable=broad-except  # the disk's refusal, any form
            raise self._write_error(step, e) from None
        self._pending = (step, message)
        if message is not None:
            if not existed:  # a folder already there would announce a commit that has not come
                threading.Thread(target=self._watch, args=(step,), daemon=True,
                                 name=f"bow_jax checkpoint {step}").start()

    def _watch(self, step: int) -> None:
        """Announces `step` as soon as Orbax has finished with it and its final folder exists
        (Orbax renames the temporary folder only after every item is written)."""
        while self._manager.is_saving_in_progress() and self._pending_step() == step:
            time.sleep(0.05)
        if os.path.isdir(self.folder(step)):
            self._announce(step)

    def _pending_step(self) -> Optional[int]:
        pending = self._pending
        return None if pending is None else pending[0]

    def _announce(self, step: Optional[int] = None) -> None:
        """Prints the pending message (of `step`, or whichever is pending), once."""
        with self._pending_lock:
            if self._pending is None or (step is not None and self._pending[0] != step):
                return
            _, message = self._pending
            self._pending = None
        if message is not None:
            logs.say(message)

    def _finish_previous(self) -> None:
        """Waits for the save in flight; its message once committed, else WriteError."""
        step = self._pending_step()
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except  # the disk's refusal, any form
            with self._pending_lock:
                self._pending = None
            _wait_for_stragglers()
            raise self._write_error(step, e) from None
        self._announce()

    def _write_error(self, step: Optional[int], error: BaseException) -> WriteError:
        where = self.folder(step) if step is not None else self.directory
        number = getattr(error, "errno", None)
        reason = system_reason(error)
        if number is None and reason == os.strerror(errno.ENOSPC):
            number = errno.ENOSPC
        kept = self.latest_step()
        return _with_errno(WriteError(f"Checkpoint {where} could not be written: {reason}. "
                          + (f"The newest intact checkpoint is step {kept}; " if kept is not None
                             else "No checkpoint was kept; ")
                          + "free space (or fix the folder), then the same command resumes."),
                           number)


    def read_meta(self, step: Optional[int] = None) -> dict:
        """The `meta` item of `step` (default latest); CorruptCheckpointError naming the folder
        when it is missing or unreadable."""
        step = self.latest_step() if step is None else step
        self._require_complete(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # pylint: disable=broad-except  # any failure: unreadable
            raise CorruptCheckpointError(
                f"{self.folder(step)}: its 'meta' item cannot be read ({short_reason(e)}).") from e
        if not isinstance(meta, dict) or "config" not in meta:
            raise CorruptCheckpointError(f"{self.folder(step)}: its 'meta' item holds no config.")
        return meta

    def _require_complete(self, step: int) -> None:
        missing = [item for item in ("state", "meta")
                   if not os.path.isdir(os.path.join(self.folder(step), item))]
        if missing:
            raise CorruptCheckpointError(
                f"{self.folder(step)} is incomplete: no {' or '.join(missing)} item (a copy or "
                "a write that did not finish).")

    def restore(self, abstract_state: Any, config=None, step: Optional[int] = None):
        """The state saved at `step`, laid out like `abstract_state` (a tree of
        jax.ShapeDtypeStruct with shardings; None: the raw saved tree).

        step None: the newest intact step, skipping (with a warning naming the folder) and then
        moving aside damaged ones; None when there is no checkpoint at all. An explicit `step`
        is not replaced by another: CorruptCheckpointError when it is damaged.
        Raises ValueError naming the config fields when the saved state has another shape or was
        written under another config.method/model; CorruptCheckpointError when no step is intact
        (naming each folder and why)."""
        if step is not None:
            return self._restore_step(step, abstract_state, config)
        rejected = {}
        state = None
        for candidate in sorted(self.all_steps(), reverse=True):
            try:
                state = self._restore_step(candidate, abstract_state, config)
                break
            except CorruptCheckpointError as e:
                logs.warn(f"skipping checkpoint: {e}")  # the message names the folder
                rejected[candidate] = e
        if state is None and rejected:
            raise CorruptCheckpointError(
                f"No intact checkpoint in {self.directory}:\n"
                + "".join(f"  {e}\n" for e in rejected.values())
                + "Nothing was moved or deleted. Restore the folders from a backup, or move "
                "them out of the way to start the run from scratch (or use another --workdir).")
        self._move_aside(rejected)
        return state

    def _restore_step(self, step: int, abstract_state: Any, config):
        meta = self.read_meta(step)
        if config is not None:
            check_same_config(meta["config"], config_to_dict(config), self.folder(step))
        if abstract_state is not None:
            self._check_shapes(step, abstract_state, meta["config"], config)
        args = (ocp.args.StandardRestore(abstract_state) if abstract_state is not None
                else ocp.args.StandardRestore())
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except Exception as e:  # pylint: disable=broad-except  # TensorStore: damaged files
            raise CorruptCheckpointError(
                f"{self.folder(step)}: its state cannot be read ({short_reason(e)}).") from e
        self._verify(step, state, meta.get("fingerprint"))
        return state

    def _verify(self, step: int, state: Any, saved: Optional[dict]) -> None:
        """CorruptCheckpointError when `state` differs from the fingerprint saved with it or
        holds non-finite numbers."""
        fingerprint, bad = inspect(state)
        if saved is None:
            logging.warning("%s has no fingerprint (written by an older version): not verified.",
                            self.folder(step))
        else:
            saved = saved.get("leaves", {})
            differ = sorted(n for n in set(saved) | set(fingerprint)
                            if saved.get(n) != fingerprint.get(n))
            if differ:
                raise CorruptCheckpointError(
                    f"{self.folder(step)} is corrupted: {len(differ)} of {len(fingerprint)} "
                    f"arrays differ from the fingerprint saved with them ({', '.join(differ[:4])}"
                    f"{', ...' if len(differ) > 4 else ''}).")
        if bad:
            raise CorruptCheckpointError(
                f"{self.folder(step)} holds NaN or infinity ({', '.join(bad[:4])}).")

    def _check_shapes(self, step: int, abstract_state: Any, saved_config: dict, config) -> None:
        """ValueError naming the config fields that differ when the saved arrays have other
        shapes than `abstract_state` (compared on Orbax's metadata tree, before reading)."""
        try:
            saved_tree = self._manager.item_metadata(step)["state"]
            saved_tree = getattr(saved_tree, "tree", saved_tree)
            saved = {leaf_name(p): tuple(x.shape)
                     for p, x in jax.tree_util.tree_leaves_with_path(saved_tree)}
        except Exception as e:  # pylint: disable=broad-except  # unreadable metadata: damaged
            raise CorruptCheckpointError(
                f"{self.folder(step)}: its array metadata cannot be read "
                f"({short_reason(e)}).") from e
        wanted = {leaf_name(p): _saved_shape(x)
                  for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        differ = sorted(n for n in set(saved) | set(wanted) if saved.get(n) != wanted.get(n))
        if not differ:
            return
        shapes = ", ".join(f"{n}: {saved.get(n)} -> {wanted.get(n)}" for n in differ[:4])
        fields = (config_differences(saved_config, config_to_dict(config))
                  if config is not None else [])
        raise InputError(
            f"The checkpoint {self.folder(step)} holds a state of another shape than this config "
            "defines. Fields that differ from the run's config: "
            + (", ".join(_state_fields_first(fields, saved_config)[:12]) or "none found")
            + f". Arrays (saved -> this config): {shapes}"
            + (", ..." if len(differ) > 4 else "") + ". Use the config the checkpoint was "
            "trained with (or another --workdir).")

    def _move_aside(self, rejected: dict) -> None:
        """Renames each rejected step folder to `<reason>-<step>-<time>` (process 0 only, then
        every process re-reads the folder list)."""
        if not rejected:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if _is_process_0():
            for step, error in rejected.items():
                reason = "incomplete" if "incomplete" in str(error) else "corrupt"
                target = os.path.join(self.directory, f"{reason}-{step}-{stamp}")
                os.rename(self.folder(step), target)
                logs.warn(f"moved the damaged checkpoint {self.folder(step)} aside to {target} "
                          "(not deleted).")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("bow_jax checkpoint move aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the save in flight is committed (printing its message). Raises
        WriteError when it failed."""
        self._finish_previous()

    def close(self) -> None:
        """`wait`, then releases Orbax's threads (also when the save failed). Raises WriteError
        when the save in flight failed."""
        try:
            self._finish_previous()
        finally:
            self._manager.close()


def _saved_shape(x) -> tuple:
    """The shape Orbax stores for abstract leaf `x` (a PRNG key is stored as its key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape)


def _state_fields_first(fields: list, saved_config: dict) -> list:
    """Differences in the sections that shape the state (model, the method's own section, data)
    before the others (schedules, paths), which cannot change a shape."""
    sections = ("config.model.", f"config.{saved_config.get('method')}.", "config.data.")
    return sorted(fields, key=lambda f: not f.startswith(sections))


def check_same_config(saved: dict, current: dict, where: str) -> None:
    """Refuse, with the differing field named, a checkpoint from a run whose state differs."""
    for field in STATE_DEFINING_FIELDS:
        if saved.get(field) != current.get(field):
            raise InputError(
                f"The checkpoint {where} was written with config.{field}={saved.get(field)!r}, "
                f"but this run has config.{field}={current.get(field)!r}. Use another --workdir "
                "or the config the checkpoint was trained with.")


def config_differences(saved: dict, current: dict, prefix: str = "config") -> list:
    """['config.a.b: saved -> current', ...] for every leaf that differs (sorted); prefix ''
    names the leaves by their keys alone ('a.b')."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, name))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def refuse_other_settings(saved: dict, settings: dict, where: str, what: str,
                          remedy: str) -> None:
    """ValueError when `saved` (the settings recorded in the checkpoint or file `where`) are not
    `settings`: it names `what` wrote it, each differing leaf ('a.b: saved -> current', keys as
    in `settings`, the first six) and `remedy`."""
    differ = config_differences(saved, settings, "")
    if differ:
        raise InputError(f"{where} was written by {what} with other settings "
                         f"({'; '.join(differ[:6])}{'; ...' if len(differ) > 6 else ''}). "
                         f"{remedy}")


def restore_matching(checkpointer: Checkpointer, init: Any,
                     check: Callable[[dict, str], None]) -> tuple:
    """(state, meta) of `checkpointer`'s newest intact step, laid out like `init` (a state with
    an int `step` field, e.g. `TrainState`), once `check(saved settings, folder)` has accepted
    the settings it was saved with; (init, None) when there is no checkpoint.

    The newest step's settings are checked before its arrays are read (a state of other settings
    would fail in `restore` less clearly: a shape error); when that step is damaged `restore`
    skips it (warning, moved aside) and the step it falls back on is checked too. `check`
    refuses by raising (ValueError, e.g. `refuse_other_settings`); CorruptCheckpointError when
    no step is intact."""
    latest = checkpointer.latest_step()
    if latest is None:
        return init, None
    try:
        check(checkpointer.read_meta(latest)["config"], checkpointer.folder(latest))
    except CorruptCheckpointError:
        pass  # restore() skips it, and the step it picks is checked below
    state = checkpointer.restore(abstract_like(init))
    if state is None:
        return init, None
    step = int(state.step)
    meta = checkpointer.read_meta(step)
    check(meta["config"], checkpointer.folder(step))
    return state, meta


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`, for `Checkpointer.restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
