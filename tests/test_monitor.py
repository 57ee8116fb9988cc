"""The k-NN monitor during training (protocols/monitor.py): logged every config.eval.every_steps
and at the end, equal to a numpy weighted k-NN on the same state's features, compiled once per
run, bad settings named before training. Real images: scikit-learn's digits, 8 CPU devices."""
import os

import numpy as np
import pytest

from bow_jax.data import datasets, eval_input
from bow_jax.data.splits import load_split
from bow_jax.protocols import features, monitor
from bow_jax.lib import sharding, writers
from bow_jax.tasks import common
from bow_jax.tasks import train as train_task
from test_train import tiny_config  # tests/ is on sys.path (pytest's rootdir import mode)


def numpy_weighted_knn(memory, memory_labels, queries, query_labels, num_classes, k, t=0.07):
    """Wu et al. 2018: cosine top-k neighbours, each votes exp(s / t) for its class."""
    memory = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ memory.T
    top = np.argsort(-sims, axis=1)[:, :k]
    votes = np.zeros((len(queries), num_classes))
    for i, row in enumerate(top):
        np.add.at(votes[i], memory_labels[row], np.exp(sims[i, row] / t))
    return float(np.mean(votes.argmax(1) == query_labels))


def monitor_config(**overrides):
    return tiny_config(**{"num_train_steps": 5, "log_every": 5, "checkpoint_every_steps": 5,
                          "eval.every_steps": 2, "eval.monitor_memory": 64,
                          "eval.monitor_queries": 40, "eval.knn_k": 5, "eval.batch_size": 16,
                          **overrides})


def test_monitor_is_logged_every_interval_and_matches_numpy(tmp_path):
    config, workdir = monitor_config(), str(tmp_path / "run")
    train_task.run(config, workdir)
    rows = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    logged = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    assert sorted(logged) == [2, 4, 5]  # every 2 steps, and the last step
    assert "loss" in next(r for r in rows if r["step"] == 5)  # one row with the step's metrics

    with common.restore(config, workdir) as run:  # the final state (step 5)
        train = load_split(config, "train")
        test = datasets.load_dataset(config.data, "test")
        mem = features.extract_features(run.method.encode, train.images[:64], 16, run.mesh,
                                        variables=run.state)
        qry = features.extract_features(run.method.encode, test.images[:40], 16, run.mesh,
                                        variables=run.state)
    expected = numpy_weighted_knn(mem, train.labels[:64], qry, test.labels[:40],
                                  train.num_classes, k=5)
    assert logged[5] == pytest.approx(expected, abs=1e-6)


def test_monitor_compiles_its_extractor_once(tmp_path):
    config = monitor_config()
    with common.restore(config, str(tmp_path / "run")) as run:
        knn = monitor.knn_monitor(config, run.method.encode, run.mesh, run.train_data)
        assert len(knn.memory) == 64 and len(knn.queries) == 40
        first = knn(run.state)["knn_top1"]
        second = knn(run.state)["knn_top1"]
        compiled = features._cached_jit_views(run.method.encode, run.mesh, False)
    assert first == second and 0.0 <= first <= 1.0
    assert compiled._cache_size() == 1  # memory and queries, two calls: one program


def test_monitor_due_steps():
    knn = monitor.KnnMonitor(encode=None, memory=None, queries=None, every=3, k=1, batch_size=8)
    assert [s for s in range(1, 11) if knn.due(s, 10)] == [3, 6, 9, 10]


@pytest.mark.parametrize("field,value,message", [
    ("eval.every_steps", -1, r"config\.eval\.every_steps=-1"),
    ("eval.monitor_memory", 0, r"config\.eval\.monitor_memory=0"),
    ("eval.monitor_queries", 0, r"config\.eval\.monitor_queries=0"),
    ("eval.knn_k", 65, r"config\.eval\.knn_k=65.*monitor_memory=64"),
    ("eval.batch_size", 12, r"config\.eval\.batch_size=12 must be divisible"),
])
def test_bad_monitor_settings_fail_before_training(tmp_path, field, value, message):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train_task.run(monitor_config(**{field: value}), str(workdir))
    assert not (workdir / "checkpoints").exists()


def test_monitor_off_by_default():
    config = tiny_config()
    assert config.eval.every_steps == 0
    assert monitor.knn_monitor(config, None, sharding.make_mesh()) is None
    assert isinstance(eval_input.evaluation_input(config, "test"), eval_input.EvalInput)
