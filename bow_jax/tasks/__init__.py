"""The task registry: what `main.py` runs, by `config.task`.

Each task is a module with `run(config, workdir)`, `default_config()` (its config section, or None)
and `SECTION` (the name of that section in the base config, or None); `READS_RUN = True` marks the
tasks that read a trained run's checkpoints (a missing workdir is then an error, not created).
"""
import os

from bow_jax.lib import files, lock
from bow_jax.lib.errors import InputError, MissingInputError
from bow_jax.tasks import (bownet_chain, evaluate, evaluate_torchvision, export, finetune,
                           train)

REGISTRY = {
    "train": train,
    "evaluate": evaluate,
    "export": export,
    "evaluate_torchvision": evaluate_torchvision,
    "finetune": finetune,
    "bownet_chain": bownet_chain,
}


def task_module(name: str):
    """The module of task `name`; ValueError naming config.task and the known tasks."""
    if name not in REGISTRY:
        raise InputError(f"config.task={name!r}; expected one of {list(REGISTRY)}.")
    return REGISTRY[name]


TRAINING_RECORD = "config.json"


def config_file(task: str) -> str:
    """Where a task records its resolved config: config.json for the training tasks (written by
    them once the workdir's checkpoint accepts the config, so a refused run leaves the record of
    the real one), <task>_config.json for the others."""
    return TRAINING_RECORD if task in ("train", "bownet_chain") else f"{task}_config.json"


def run(config, workdir: str):
    """Runs `config.task` in `workdir`, holding the workdir's lock (one writer per workdir:
    lib/lock.py), after writing the resolved config there; returns what the task returns.

    FileNotFoundError for a task that reads a trained run when `workdir` does not exist;
    lock.WorkdirLockedError naming the holder when another run holds the workdir."""
    task = task_module(config.task)
    if task.READS_RUN and not os.path.isdir(workdir):
        raise MissingInputError(f"--workdir={workdir} does not exist: the {config.task!r} task "
                                "reads a trained run's checkpoints there.")
    with lock.WorkdirLock(workdir):
        if config_file(config.task) != TRAINING_RECORD:  # the training tasks write theirs once
            files.write_config_json(workdir, config, config_file(config.task))  # validated
        return task.run(config, workdir)
