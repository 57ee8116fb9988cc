"""Evaluation on other data than training's (config.eval.data, the Places205 protocol): the one
helper that decides (`eval_input.evaluation_data`), the evaluate path reading an image folder's
splits while training data is in-memory digits, the Places205 config file and its overrides, and a
missing evaluation folder named before any work."""
import collections
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bow_jax.config import base_config, get_recipe
from bow_jax.data import datasets, eval_input
from bow_jax.protocols import checks, linear, runner
from bow_jax.lib import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACES = os.path.join(REPO, "configs", "obow_resnet50_places205.py")


def _image_folder(root, train=(5, 4, 6), test=(3, 4, 3), side=9):
    """root/{train,test}/<class>/<i>.png with the given counts per class."""
    rng = np.random.default_rng(1)
    for split, counts in (("train", train), ("test", test)):
        for c, n in enumerate(counts):
            (root / split / f"place{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side + c, 3), np.uint8)).save(
                    root / split / f"place{c}" / f"{i}.png")


def _digits_config_with_eval_folder(root):
    """Training data: scikit-learn's digits in memory; evaluation data: the image folder."""
    c = base_config("rotnet")
    c.data.update(dict(source="digits", image_size=8))
    c.eval.data.update(dict(source="image_folder", path=str(root), image_size=8))
    c.eval.update(dict(batch_size=8, knn_k=3, fewshot_ways=2, fewshot_shots=(1,),
                       fewshot_queries=2, fewshot_episodes=4, cache_features=False,
                       linear_epochs=1))
    return c


def test_evaluation_data_is_config_data_unless_eval_data_source_is_set(tmp_path):
    c = base_config("rotnet")
    assert c.eval.data.source == "" and sorted(c.eval.data) == sorted(c.data)
    assert eval_input.evaluation_data(c) is c.data
    assert eval_input.evaluation_data_field(c) == "config.data"
    c.eval.data.source = "image_folder"
    assert eval_input.evaluation_data(c) is c.eval.data
    assert eval_input.evaluation_data_field(c) == "config.eval.data"
    # A config without the section (an older config.json) evaluates on config.data.
    old = types.SimpleNamespace(data=c.data, eval=types.SimpleNamespace())
    assert eval_input.evaluation_data(old) is c.data


def test_evaluate_path_reads_the_eval_data_image_folder(tmp_path, monkeypatch):
    _image_folder(tmp_path)
    c = _digits_config_with_eval_folder(tmp_path)
    assert checks.check_evaluation_data(c) is None
    train, test = checks.evaluation_splits(c)
    np.testing.assert_array_equal(np.bincount(train.labels), [5, 4, 6])
    np.testing.assert_array_equal(np.bincount(test.labels), [3, 4, 3])
    for split, count in (("train", 15), ("test", 10)):
        inp = eval_input.evaluation_input(c, split)
        assert isinstance(inp, eval_input.ImageFolderInput) and len(inp) == count
        assert inp.name == str(tmp_path / split)
    # The whole evaluation (runner.evaluate_states) scores features of the folder's images.
    seen = {}
    score_features = runner.score_features
    monkeypatch.setattr(runner, "score_features", lambda tr, te, *rest: seen.update(
        train=tr, test=te) or score_features(tr, te, *rest))
    state = collections.namedtuple("State", "step")(np.int32(0))  # a pytree with .step
    method = types.SimpleNamespace(pretext_scores=None, encode=lambda variables, images: (
        images.astype(jnp.float32).mean((1, 2))))  # [B, 3] mean colour
    results = runner.evaluate_states(c, str(tmp_path / "work"), method, [state],
                                     sharding.make_mesh())
    want = {s: datasets.list_image_folder(tmp_path / s, datasets.image_folder_classes(
        tmp_path / "train")).labels for s in ("train", "test")}
    np.testing.assert_array_equal(seen["train"].labels, want["train"])
    np.testing.assert_array_equal(seen["test"].labels, want["test"])
    assert seen["train"].num_classes == 3 and seen["train"].feats.shape == (15, 3)
    assert set(results["rotnet step 0"]) >= {"linear", "fewshot", "knn"}


def test_places205_config_loads_with_the_official_probe():
    c = get_recipe(PLACES)
    assert c.task == "evaluate" and c.method == "obow" and c.model.name == "resnet50"
    assert c.data.name == "imagenet2012"  # the network and its training data stay ImageNet's
    assert (c.eval.data.source, c.eval.linear_protocol, c.eval.image_size) == \
        ("image_folder", "places205", 224)
    protocol = linear.PROTOCOLS[c.eval.linear_protocol]
    assert {k: protocol[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "milestones",
                                     "decay_factor", "batch_norm")} == dict(
        epochs=28, batch_size=256, lr=0.01, weight_decay=1e-5, milestones=(10, 20),
        decay_factor=0.1, batch_norm=True)


def _main(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "bow_jax.main", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    return result.returncode, result.stdout, result.stderr


def test_places205_overrides_and_a_missing_folder_named_before_work(tmp_path):
    status, out, err = _main(f"--config={PLACES}", "--list_config",
                             f"--config.eval.data.path={tmp_path}/places")
    assert status == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["config.eval.data.path"] == [repr(f"{tmp_path}/places"), "str"]
    assert rows["config.eval.data.source"] == ["'image_folder'", "str"]
    # The evaluate task checks the evaluation data first: no ImageNet, no checkpoint needed.
    status, out, err = _main(f"--config={PLACES}", f"--config.eval.data.path={tmp_path}/none",
                             f"--workdir={tmp_path}")
    assert status == 1 and "Traceback" not in err
    assert "config.eval.data.path" in err and f"{tmp_path}/none" in err, err
    assert "config.data.path" not in err and not os.path.exists(tmp_path / "checkpoints")


def test_missing_or_incomplete_eval_folder_is_named_in_process(tmp_path):
    c = _digits_config_with_eval_folder(tmp_path / "none")
    with pytest.raises(checks.MissingSplitError, match=r"^config\.eval\.data\.path: .*none"):
        checks.check_evaluation_data(c)
    _image_folder(tmp_path / "only_train", test=())  # no test/ folder
    c = _digits_config_with_eval_folder(tmp_path / "only_train")
    with pytest.raises(checks.MissingSplitError, match=r"config\.eval\.data\.path: .*test.* "
                                                       r"splits of config\.eval\.data"):
        checks.check_evaluation_data(c)
    c = _digits_config_with_eval_folder(tmp_path)
    c.eval.data.image_size = 0
    with pytest.raises(ValueError, match=r"config\.eval\.data\.image_size must be set"):
        checks.check_evaluation_data(c)
