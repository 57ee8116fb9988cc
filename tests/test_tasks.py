"""The task registry (bow_jax/tasks): every task has a run and its config section where the base
config expects it; `tasks.run` records the resolved config, holds the workdir's lock, and refuses a
reading task on a missing workdir without creating it."""
import json
import os

import pytest

from bow_jax import config as base, tasks
from bow_jax.lib import lock
from test_train import tiny_config  # tests/ is on sys.path (pytest's rootdir import mode)


def test_every_task_has_run_a_section_and_a_reads_run_flag():
    c = base.base_config("obow")
    for name, module in tasks.REGISTRY.items():
        assert callable(module.run), name
        assert isinstance(module.READS_RUN, bool), name
        if module.SECTION:
            assert c[module.SECTION].to_dict() == module.default_config().to_dict(), name
        else:
            assert module.default_config() is None, name
    assert "obow" in c and "rotnet" not in c  # the method's own section only


def test_unknown_task_names_the_field_and_the_known_tasks(tmp_path):
    with pytest.raises(ValueError, match=r"config.task='fly'; expected one of \['train'"):
        tasks.run(tiny_config(task="fly"), str(tmp_path))


def test_run_writes_the_resolved_config_and_releases_the_lock(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(num_train_steps=1, checkpoint_every_steps=1)
    tasks.run(config, workdir)
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["method"] == "rotnet" and saved["num_train_steps"] == 1
    assert saved["model"]["kwargs"]["width"] == 4
    with lock.WorkdirLock(workdir):  # released: it can be taken again
        pass
    # An evaluation records its own config beside the training one, never over it.
    evaluation = tiny_config(task="evaluate", num_train_steps=1)
    evaluation.eval.protocols = ("knn",)
    tasks.run(evaluation, workdir)
    assert os.path.exists(os.path.join(workdir, "evaluate_config.json"))
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["task"] == "train"


@pytest.mark.parametrize("task", ["evaluate", "export"])
def test_reading_task_on_a_missing_workdir_fails_without_creating_it(tmp_path, task):
    workdir = str(tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="typo does not exist"):
        tasks.run(tiny_config(task=task), workdir)
    assert not os.path.exists(workdir)


def test_evaluation_refuses_a_non_finite_state(tmp_path):
    import jax
    import jax.numpy as jnp
    from bow_jax.lib import checkpoint
    from bow_jax.tasks import common, evaluate
    with common.restore(tiny_config(), str(tmp_path)) as run:
        bad = run.state.replace(params=jax.tree.map(lambda p: p * jnp.nan, run.state.params))
        with pytest.raises(checkpoint.NonFiniteError, match="state at step 0"):
            evaluate.score_states(run, [bad])


def test_a_refused_run_leaves_the_training_record(tmp_path):
    """A run refused by the workdir's checkpoint (another model) does not overwrite config.json."""
    workdir = str(tmp_path / "run")
    tasks.run(tiny_config(num_train_steps=1, checkpoint_every_steps=1), workdir)
    other = tiny_config(num_train_steps=2, **{"model.kwargs.width": 8})
    with pytest.raises(ValueError, match="config.model"):
        tasks.run(other, workdir)
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model"]["kwargs"]["width"] == 4


def test_faults_and_input_errors_are_one_line_errors():
    from bow_jax.lib import checkpoint, cli, errors, lock
    assert cli.is_input_error(checkpoint.NonFiniteError("Step 4: NaN"))
    assert cli.is_input_error(lock.WorkdirLockedError("--workdir=x is in use"))
    assert cli.is_input_error(errors.InputError("The checkpoint x was written with config.method"))
    # By type, not by wording: a plain ValueError naming a field is a bug's traceback.
    assert not cli.is_input_error(ValueError("config.method='a' is wrong"))
    assert not cli.is_input_error(ValueError("shapes (3,) and (4,) do not broadcast"))
    assert not cli.is_input_error(RuntimeError("XLA crashed"))
