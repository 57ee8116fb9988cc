"""What every task shares: `restore(config, workdir) -> Run`, the one way a task gets its method,
mesh and (initial or restored) training state."""
import dataclasses
import os
from typing import Any, Optional

import jax

from bow_jax import pretrain
from bow_jax.data.splits import load_split
from bow_jax.lib import checkpoint, logs, sharding
from bow_jax.lib.errors import MissingInputError
from bow_jax.methods import DataInfo, Method, create_method, data_info_for


@dataclasses.dataclass
class Run:
    """A method's run in a workdir: its training data, method, mesh, state and checkpointer.

    `state` is the newest checkpoint's state, or the initial state (`restored_step` None) when
    the workdir holds none; `restored_meta` that checkpoint's meta for the tasks that train ({}
    otherwise). Use as a context manager, or call `close()`: it waits for pending checkpoint
    writes.
    """
    config: Any
    workdir: str
    train_data: Any  # datasets.ArrayDataset (in memory) | datasets.TfdsSource (streamed)
    data_info: DataInfo
    method: Method
    mesh: jax.sharding.Mesh
    checkpointer: checkpoint.Checkpointer
    state: Any
    restored_step: Optional[int]
    restored_meta: dict = dataclasses.field(default_factory=dict)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.checkpointer.close()


def open_checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
    """The checkpointer of `workdir`/checkpoints with the config's retention policy."""
    return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.keep_checkpoints,
                                   keep_period=config.keep_every_steps)


def restore(config, workdir: str, train_data=None, training: bool = True) -> Run:
    """Everything a task needs, validated before anything is compiled: the training split (or
    `train_data`), the method, the mesh, and the newest checkpoint's state (else the initial one).

    training: True for the tasks that train (train, bownet_chain): every check of the method
    and the training batch applies, and resuming a checkpoint saved under another batch size,
    seed, length or training data warns (`warn_resume_changes`); False for the tasks that only
    use the state (evaluate, export, finetune): only the checks of its shapes and use apply.

    Raises InputError (a ValueError) naming the config field for a bad setting or sizes that
    do not divide, and ValueError naming the fields for a checkpoint of another config."""
    train_data = load_split(config, "train") if train_data is None else train_data
    data_info = data_info_for(config, train_data, training)
    method = create_method(config, data_info, training)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(method.init_state, key)  # also validates shapes before compiling
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            abstract)
    ckpt = open_checkpointer(config, workdir)
    state = ckpt.restore(abstract, config)
    # The folder restored (the newest intact one: damaged newer ones were moved aside).
    restored_step = None if state is None else ckpt.latest_step()
    meta = {}
    if state is None:
        state = jax.jit(method.init_state, out_shardings=replicated)(key)
    elif training:
        meta = ckpt.read_meta(restored_step)
        warn_resume_changes(meta["config"], config, restored_step)
        warn_device_change(meta, restored_step, jax.device_count())
    return Run(config, workdir, train_data, data_info, method, mesh, ckpt, state, restored_step,
               meta)


# Fields whose change between a checkpoint and the run resuming it makes the resumed run differ
# from the uninterrupted one (the state is the same; what the steps read or mean is not), and
# what changes ({step}: the resumed step).
_DATA_ORDER = ("the data order from step {step} on differs from the uninterrupted run's "
               "(step s reads window s of the seeded epoch permutations: images of this epoch "
               "are skipped or repeated)")
_LENGTH = ("the run's length changes, and with it the schedules (learning rate, OBoW's teacher "
           "momentum): step {step} lies at another point of them")
_DATA = ("the training data differ: from step {step} on the steps read other images, or the "
         "same in another order, than the uninterrupted run")
RESUME_FIELDS = {
    "batch_size": "each step reads another number of images and an epoch has another number "
                  "of steps: " + _DATA_ORDER,
    "seed": _DATA_ORDER + "; the state's own RNG stream is the checkpoint's",
    "num_epochs": _LENGTH,
    "num_train_steps": _LENGTH,
    "steps_per_epoch": "an epoch, as the schedules count it, has another number of steps: "
                       "step {step} lies at another point of the learning-rate schedule",
    **{f"data.{name}": _DATA for name in ("source", "name", "path", "data_dir", "limit",
                                          "num_examples", "in_memory")},
    "data.canvas_size": "streamed images are padded into (or shrunk to) another canvas, so "
                        "every view of a large image changes",
}


def _field(tree: dict, name: str):
    for part in name.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def resume_changes(saved: dict, current: dict) -> list:
    """[(field, saved value, current value)] of `RESUME_FIELDS` that differ between the config
    a checkpoint was saved with and the resuming run's (both as dicts). num_epochs is left out
    when both runs fix their length with num_train_steps > 0 (it is then unused)."""
    changes = [(name, _field(saved, name), _field(current, name)) for name in RESUME_FIELDS]
    steps_fixed = all((_field(c, "num_train_steps") or 0) > 0 for c in (saved, current))
    return [(name, a, b) for name, a, b in changes
            if a != b and not (name == "num_epochs" and steps_fixed)]


def warn_resume_changes(saved: dict, config, step: int) -> None:
    """One warning per field of `RESUME_FIELDS` that differs between the checkpoint's config
    (`saved`) and `config`, naming it (saved -> now) and what changes for the run."""
    for name, a, b in resume_changes(saved, checkpoint.config_to_dict(config)):
        logs.warn(f"resuming step {step} with config.{name} {a!r} -> {b!r} (the checkpoint's "
                  f"-> this run's): " + RESUME_FIELDS[name].format(step=step)
                  + f". To continue the same run, set config.{name}={a!r}.")


def restore_trained(config, workdir: str, purpose: str) -> Run:
    """`restore` of a workdir that must hold a checkpoint (to evaluate, export, fine-tune ...).

    Only the checks of the state's shapes and use apply (`restore` with training=False): a run
    trained on 8 devices is evaluated on 3. MissingInputError naming the workdir when it holds
    none, raised before anything is loaded or created (a mistyped --workdir is not created)."""
    directory = os.path.join(workdir, "checkpoints")
    run = restore(config, workdir, training=False) if os.path.isdir(directory) else None
    if run is None or run.restored_step is None:
        if run is not None:
            run.close()
        raise MissingInputError(f"--workdir={workdir}: no checkpoint in {directory} to "
                                f"{purpose}.")
    return run


def warn_device_change(meta: dict, step: int, devices: int) -> None:
    """One warning when the checkpoint of `meta` (step `step`) was saved by a run on another
    number of devices than `devices` (`pretrain.DEVICES_META`): the batches and views are the
    same, but every sum over devices (gradients, BatchNorm statistics) is taken in another
    order, and training amplifies such rounding within a few steps, so the run goes on as a
    valid run that is not bit for bit the one it would have been."""
    saved = meta.get(pretrain.DEVICES_META)
    if saved is not None and saved != devices:
        logs.warn(f"resuming step {step}, saved by a run on {saved} devices, on {devices}: the "
                  "same batches and views, but sums over devices are taken in another order, "
                  f"so from here on the run is not bit for bit the one it would be on {saved}.")
