"""The task registry: what `main.py` runs, by `config.task`.

Each task is a module with `run(config, workdir)`, `default_config()` (its config section, or None)
and `SECTION` (the name of that section in the base config, or None).
"""
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
        raise ValueError(f"config.task={name!r}; expected one of {list(REGISTRY)}.")
    return REGISTRY[name]


def run(config, workdir: str):
    """Runs `config.task` in `workdir` and returns what the task returns."""
    return task_module(config.task).run(config, workdir)
