"""The `train` task: train (resuming from the workdir's newest checkpoint), then evaluate."""
from typing import Callable, Iterable, Optional


from bow_jax import pretrain
from bow_jax.data import datasets, eval_input
from bow_jax.protocols import checks, monitor
from bow_jax.lib import files, logs
from bow_jax.tasks import common, evaluate

READS_RUN = False
SECTION = None  # no config section of its own: the shared fields of bow_jax/config.py


def default_config():
    return None


def training_monitor(run_: common.Run):
    """The k-NN monitor of config.eval.every_steps (None when 0), on the evaluation's data
    (config.eval.data when set); an in-memory training split of that data is reused as its
    memory."""
    same_data = eval_input.evaluation_data(run_.config) is run_.config.data
    in_memory = run_.train_data if same_data and isinstance(
        run_.train_data, datasets.ArrayDataset) else None
    return monitor.knn_monitor(run_.config, run_.method.encode, run_.mesh, in_memory)


def run(config, workdir: str, hooks: Iterable[Callable[[int], None]] = (),
        stage: Optional[pretrain.Stage] = None) -> Optional[dict]:
    """Trains `config` in `workdir`, then scores the result if `config.eval.after_training`.

    Returns the evaluation results (None when evaluation is off). Raises stop.Stopped when a
    signal stopped training (a checkpoint was saved: the same command resumes). `hooks` are
    called with the step number after each step (tests use them to send signals). `stage`: the
    BoWNet chain stage this trains, if any (named in its messages)."""
    monitor.check_monitor(config)  # a bad setting fails now, not after the first steps
    if config.eval.after_training:
        checks.check_evaluation_data(config)  # ... or after training
    with common.restore(config, workdir) as run_:  # refuses a checkpoint of another config
        files.write_config_json(workdir, config)
        if run_.restored_step is not None:
            logs.say(f"resumed from {run_.checkpointer.directory} at step {run_.restored_step}")
        state = pretrain.train(run_, hooks, training_monitor(run_), stage)
    if not config.eval.after_training:
        return None
    return evaluate.score_states(run_, [state])
