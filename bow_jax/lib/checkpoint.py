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
"""
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

# Config sections that decide the shape of the state: a checkpoint written under different values
# cannot be restored into this run's state.
STATE_DEFINING_FIELDS = ("method", "model")
FINGERPRINT_VERSION = 1
_KNUTH = 2654435761  # odd multiplier: position weights w_i = 1 + i * _KNUTH are odd, so invertible


class NonFiniteError(RuntimeError):
    """A loss or a state holds NaN or infinity: training stops, nothing is saved."""


class CorruptCheckpointError(ValueError):
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


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints plus every `keep_period`-th step."""

    def __init__(self, directory: str, max_to_keep: int = 3, keep_period: Optional[int] = None):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config, extra_meta: Optional[dict] = None) -> None:
        """Starts an asynchronous save (device arrays are copied before this returns, so the
        state may be donated right after). Raises NonFiniteError, saving nothing, when the state
        holds NaN or infinity."""
        fingerprint, bad = inspect(state)
        if bad:
            raise NonFiniteError(
                f"Step {step}: the state holds NaN or infinity in {len(bad)} leaves "
                f"({', '.join(bad[:8])}); not saved. The newest kept checkpoint "
                f"({self.latest_step()}) is the last good one.")
        meta = {"config": config_to_dict(config), **(extra_meta or {}),
                "fingerprint": {"version": FINGERPRINT_VERSION, "leaves": fingerprint}}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

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
                f"{self.folder(step)}: its 'meta' item cannot be read ({type(e).__name__}: "
                f"{str(e)[:200]}).") from e
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
                logging.warning("Skipping checkpoint %s: %s", self.folder(candidate), e)
                rejected[candidate] = e
        if state is None and rejected:
            raise CorruptCheckpointError(
                f"No intact checkpoint in {self.directory}: "
                + "; ".join(str(e) for e in rejected.values())
                + " Nothing was moved or deleted. Restore the folders from a backup, or move "
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
                f"{self.folder(step)}: its state cannot be read ({type(e).__name__}: "
                f"{str(e)[:200]}).") from e
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
                f"{self.folder(step)}: its array metadata cannot be read ({type(e).__name__}: "
                f"{str(e)[:200]}).") from e
        wanted = {leaf_name(p): _saved_shape(x)
                  for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        differ = sorted(n for n in set(saved) | set(wanted) if saved.get(n) != wanted.get(n))
        if not differ:
            return
        shapes = ", ".join(f"{n}: {saved.get(n)} -> {wanted.get(n)}" for n in differ[:4])
        fields = (config_differences(saved_config, config_to_dict(config))
                  if config is not None else [])
        raise ValueError(
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
                logging.warning("Moved the damaged checkpoint %s aside to %s (not deleted).",
                                self.folder(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("bow_jax checkpoint move aside")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
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
            raise ValueError(
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
        raise ValueError(f"{where} was written by {what} with other settings "
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
