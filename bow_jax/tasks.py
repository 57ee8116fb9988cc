"""What `main.py` runs, by `config.task`."""
import os

from absl import logging

from bow_jax import train
from bow_jax.lib import checkpoint

TASKS = ("train", "evaluate", "bownet_chain", "export", "evaluate_torchvision", "finetune")


def evaluate_checkpoint(config, workdir: str) -> dict:
    """Scores the latest checkpoint in `workdir`, or those of `config.eval.checkpoint_steps`
    (the `evaluate` task)."""
    from bow_jax.evaluate import runner  # pylint: disable=import-outside-toplevel
    _, _, method, mesh, ckpt, state = train.setup(config, workdir)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"--workdir={workdir}: no checkpoint in "
                                f"{os.path.join(workdir, 'checkpoints')} to evaluate.")
    steps = [int(s) for s in config.eval.checkpoint_steps]
    kept = sorted(ckpt.all_steps())
    missing = sorted(set(steps) - set(kept))
    if missing:
        ckpt.close()
        raise ValueError(f"config.eval.checkpoint_steps: no checkpoint at steps {missing} in "
                         f"{ckpt.directory}; kept: {kept}.")
    if not steps:
        ckpt.close()
        return runner.evaluate_state(config, workdir, method, state, mesh)
    abstract = checkpoint.abstract_like(state)
    del state
    try:
        return runner.evaluate_states(
            config, workdir, method, (ckpt.restore(abstract, config, step=s) for s in steps), mesh)
    finally:
        ckpt.close()


def run(config, workdir: str):
    if config.task == "train":
        return train.train_and_evaluate(config, workdir)
    if config.task == "evaluate":
        return evaluate_checkpoint(config, workdir)
    if config.task == "bownet_chain":
        from bow_jax import bownet_chain  # pylint: disable=import-outside-toplevel
        return bownet_chain.run_chain(config, workdir)
    if config.task in ("export", "evaluate_torchvision"):
        # torch is imported first inside these (before anything that may import TensorFlow).
        from bow_jax.export import torchvision  # pylint: disable=import-outside-toplevel
        if config.task == "export":
            return torchvision.export_checkpoint(config, workdir)
        return torchvision.evaluate_torchvision_checkpoint(config, workdir)
    if config.task == "finetune":
        from bow_jax.evaluate import finetune  # pylint: disable=import-outside-toplevel
        return finetune.finetune_checkpoint(config, workdir)
    logging.error("Unknown task %r", config.task)
    raise ValueError(f"config.task={config.task!r}; expected one of {list(TASKS)}.")
