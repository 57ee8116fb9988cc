"""The one place that talks to Orbax.

A checkpoint is the whole training state plus the config as JSON. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a crash, SIGTERM or full disk never leaves a
half-written checkpoint that a restore would pick up; stale temporaries are removed on start.
"""
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

# Config sections that decide the shape of the state: a checkpoint written under different values
# cannot be restored into this run's state.
STATE_DEFINING_FIELDS = ("method", "model")


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort()) if isinstance(
        config, ml_collections.ConfigDict) else dict(config)


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints plus every `keep_period`-th step."""

    def __init__(self, directory: str, max_to_keep: int = 3, keep_period: Optional[int] = None):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config, extra_meta: Optional[dict] = None) -> None:
        """Starts an asynchronous save (device arrays are copied before this returns, so the
        state may be donated right after)."""
        meta = {"config": config_to_dict(config), **(extra_meta or {})}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, config=None, step: Optional[int] = None):
        """The state saved at `step` (default latest), laid out like `abstract_state` (a tree of
        jax.ShapeDtypeStruct with shardings). Returns None when there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        saved = self.read_meta(step)["config"] if config is not None else None
        if config is not None:
            check_same_config(saved, config_to_dict(config), f"{self.directory}/{step}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except ValueError as e:
            message = str(e).lower()
            if config is None or not ("mismatch" in message or "do not match" in message):
                raise
            # Another state-shaping field differs (e.g. config.obow.monitor or num_words): name
            # the fields, not Orbax's tree paths.
            changed = config_differences(saved, config_to_dict(config))
            raise ValueError(
                f"The checkpoint {self.directory}/{step} holds a state of another shape than "
                "this config defines. Fields that differ from the run's config: "
                + (", ".join(changed[:12]) or "none found") + ". Use the config the checkpoint "
                "was trained with (or another --workdir).") from e
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_same_config(saved: dict, current: dict, where: str) -> None:
    """Refuse, with the differing field named, a checkpoint from a run whose state differs."""
    for field in STATE_DEFINING_FIELDS:
        if saved.get(field) != current.get(field):
            raise ValueError(
                f"The checkpoint {where} was written with config.{field}={saved.get(field)!r}, "
                f"but this run has config.{field}={current.get(field)!r}. Use another --workdir "
                "or the config the checkpoint was trained with.")


def config_differences(saved: dict, current: dict, prefix: str = "config") -> list:
    """['config.a.b: saved -> current', ...] for every leaf that differs (sorted)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}.{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, name))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`, for `Checkpointer.restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
