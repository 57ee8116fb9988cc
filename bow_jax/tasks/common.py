"""What every task shares: `restore(config, workdir) -> Run`, the one way a task gets its method,
mesh and (initial or restored) training state."""
import dataclasses
import os
from typing import Any, Optional

import jax

from bow_jax.data.splits import load_split
from bow_jax.lib import checkpoint, sharding
from bow_jax.methods import DataInfo, Method, create_method, data_info_for


@dataclasses.dataclass
class Run:
    """A method's run in a workdir: its training data, method, mesh, state and checkpointer.

    `state` is the newest checkpoint's state, or the initial state (`restored_step` None) when
    the workdir holds none. Use as a context manager, or call `close()`: it waits for pending
    checkpoint writes.
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


def restore(config, workdir: str, train_data=None) -> Run:
    """Everything a task needs, validated before anything is compiled: the training split (or
    `train_data`), the method, the mesh, and the newest checkpoint's state (else the initial one).

    Raises ValueError naming the config field for sizes that do not divide, an unknown method or
    a checkpoint written under another config."""
    train_data = load_split(config, "train") if train_data is None else train_data
    data_info = data_info_for(config, train_data)
    method = create_method(config, data_info)
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
    if state is None:
        state = jax.jit(method.init_state, out_shardings=replicated)(key)
    return Run(config, workdir, train_data, data_info, method, mesh, ckpt, state, restored_step)


def initial_state(run: Run):
    """The method's state at random initialisation (seed `config.seed`), replicated."""
    return jax.jit(run.method.init_state, out_shardings=sharding.replicated(run.mesh))(
        jax.random.key(run.config.seed))


def restore_trained(config, workdir: str, purpose: str) -> Run:
    """`restore` of a workdir that must hold a checkpoint (to evaluate, export, fine-tune ...).

    FileNotFoundError naming the workdir when it holds none, raised before anything is loaded
    or created (a mistyped --workdir is not created)."""
    directory = os.path.join(workdir, "checkpoints")
    run = restore(config, workdir) if os.path.isdir(directory) else None
    if run is None or run.restored_step is None:
        if run is not None:
            run.close()
        raise FileNotFoundError(f"--workdir={workdir}: no checkpoint in {directory} to {purpose}.")
    return run
