"""The evaluation protocols as a registry (protocols/registry.py, protocols/api.py):
config.eval.protocols chooses them by name, a new protocol is one `api.Protocol` in the
registry (its result, its columns and its before-training check all follow), scoring takes an
encoder (never a Method), and random-init scoring has one home (`runner.score_random_init`)."""
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bow_jax.config import base_config
from bow_jax.data import datasets
from bow_jax.lib.errors import InputError
from bow_jax.protocols import cache, checks, api, knn_protocol, registry, runner, voc07


def _knn_reference(train_x, train_y, test_x, test_y, k, num_classes, tau=0.07):
    """Weighted k-NN top-1 in numpy (cosine, exp(s / tau) votes), independent of knn.py."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = b @ a.T
    idx = np.argsort(-sims, axis=1)[:, :k]
    votes = np.zeros((len(b), num_classes))
    for i, row in enumerate(idx):
        np.add.at(votes[i], train_y[row], np.exp(sims[i, row] / tau))
    return float(np.mean(votes.argmax(1) == test_y))


def _data(n, seed):
    """n 4x4 images whose mean colour depends on their class (3 classes), as an ArrayDataset."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3).astype(np.int32)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[labels]
    images = np.clip(base[:, None, None] + rng.integers(-60, 60, (n, 4, 4, 3)), 0, 255)
    return datasets.ArrayDataset(images.astype(np.uint8), labels, 3, f"toy{seed}")


def _mean_colour(variables, images):
    """A toy encoder: float32 [B, 3], the mean colour scaled by `variables` [3]."""
    return images.astype(jnp.float32).mean((1, 2)) * variables


def _config(**fields):
    c = base_config("rotnet")
    c.eval.update(dict(batch_size=8, knn_k=5, **fields))
    return c


def test_the_default_is_todays_protocols_and_bad_names_are_refused():
    assert tuple(base_config("obow").eval.protocols) == ("linear", "fewshot", "knn")
    assert [p.name for p in registry.chosen(_config(protocols=("knn", "linear")))] == \
        ["knn", "linear"]
    for value, message in ((("knn", "svm"), r"unknown \['svm'\]"),
                           (("knn", "knn"), "names a protocol twice"),
                           ("knn", "expected a tuple of protocol names")):
        c = types.SimpleNamespace(eval=types.SimpleNamespace(protocols=value))
        with pytest.raises(InputError, match=r"config\.eval\.protocols=.*" + message):
            registry.chosen(c)


def test_a_registered_protocol_gets_its_result_its_columns_and_its_check(tmp_path, monkeypatch):
    """A protocol added in one place: `runner.score` runs it on the encoder's features, the
    results hold it under its name, the table shows its columns, and the before-training
    check calls its `check`; the built-in k-NN beside it matches a numpy reference."""
    seen = {}

    def evaluate(config, data):
        seen["source"] = data.source
        return {"dim": int(data.train.feats.shape[1]), "n": len(data.test)}

    def check(config, train, test):
        raise InputError(f"config.eval.toy: {train.num_examples} / {test.num_examples}")

    toy = api.Protocol("toy", evaluate, lambda r: {"toy n": r["n"]}, check)
    monkeypatch.setitem(registry.PROTOCOLS, "toy", toy)
    train, test = _data(48, 0), _data(24, 1)
    scale = jnp.array([1.0, 2.0, 0.5])
    c = _config(protocols=("toy", "knn"))
    result = runner.score(api.Encoder(_mean_colour, scale), train, test, c, None)
    assert result["toy"] == {"dim": 3, "n": 24} and seen["source"].encoder.variables is scale
    feats = lambda d: d.images.astype(np.float64).mean((1, 2)) * np.array([1.0, 2.0, 0.5])
    assert result["knn"]["top1"] == pytest.approx(_knn_reference(
        feats(train), train.labels, feats(test), test.labels, 5, 3), abs=1e-6)
    assert runner.flat(result) == {"toy n": 24, "k-NN top-1": 100 * result["knn"]["top1"]}
    runner.write_results(str(tmp_path), {"net": result})
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["net"]["toy"]["n"] == 24
    assert "| network | toy n | k-NN top-1 |" in (tmp_path / "eval" / "results.md").read_text()
    with pytest.raises(InputError, match=r"config\.eval\.toy: 48 / 24"):
        checks.check_evaluation_data(_digits_config(("toy",)))


def _digits_config(protocols):
    c = _config(protocols=protocols, train_limit=48, test_limit=24)
    c.data.source, c.data.image_size = "digits", 8
    return c


def test_label_kinds_are_checked_before_training():
    """A multi-label protocol on class labels, and a class protocol on multi-label targets,
    stop with InputError naming config.eval.protocols."""
    multi = api.Protocol("multi", None, None, lambda *a: None,
                               labels=api.MULTILABEL)
    one_class = checks.EvalSplit(10, np.arange(10) % 2, 2, "the toy split")
    targets = checks.EvalSplit(10, np.ones((10, 4), np.int8), 4, "the VOC split", True)
    with pytest.raises(InputError, match=r"config\.eval\.protocols includes 'multi', which "
                                         r"needs multi-label targets.*toy split has one class"):
        checks._check_label_kind([multi], one_class, one_class)
    with pytest.raises(InputError, match=r"includes 'knn'.*VOC split has multi-label"):
        checks._check_label_kind([registry.PROTOCOLS["knn"]], targets, targets)
    assert checks._check_label_kind([multi], targets, targets) is None


class _Toy(nn.Module):
    """A one-layer backbone with the backbones' call signature and named outputs."""

    @nn.compact
    def __call__(self, x, train=False):
        return {"pooled": nn.Dense(5)(x.mean((1, 2)))}


def test_random_init_is_scored_once_in_one_place(monkeypatch):
    """`score_random_init` scores the variables `init(key(config.seed))`: the protocols see the
    features of the network initialised here directly with that seed, not another seed's."""
    seen = {}
    grab = api.Protocol("grab", lambda config, data: seen.update(train=data.train) or {},
                              lambda r: {}, lambda *a: None)
    monkeypatch.setitem(registry.PROTOCOLS, "grab", grab)
    toy, train, test = _Toy(), _data(48, 0), _data(24, 1)
    encode = lambda v, x: toy.apply(v, x.astype(jnp.float32), train=False)["pooled"]
    c = _config(protocols=("grab",))
    c.seed = 3
    got = runner.score_random_init(encode, runner.backbone_init(toy, train.image_shape), train,
                                   test, c, None)
    assert got == {"feature_dim": 5, "pretext": {}, "grab": {}}
    for seed, same in ((3, True), (4, False)):
        direct = toy.init(jax.random.key(seed), jnp.zeros((1, 4, 4, 3)), train=False)
        want = np.asarray(encode(direct, train.images))
        assert np.allclose(seen["train"].feats, want, atol=1e-5) == same


def test_knn_protocol_top1_is_the_monitors_score():
    """The monitor and the k-NN protocol share `knn_protocol.top1` (k capped at the memory)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)).astype(np.float32), (np.arange(30) % 3).astype(np.int32)
    memory, queries = cache.SplitFeatures(x[:20], y[:20], 3), cache.SplitFeatures(x[20:], y[20:], 3)
    assert knn_protocol.top1(memory, queries, 7) == pytest.approx(
        _knn_reference(x[:20], y[:20], x[20:], y[20:], 7, 3), abs=1e-6)
    data = api.EvalData(memory, queries)
    c = _config()
    c.eval.knn_k = 7
    assert knn_protocol.PROTOCOL.evaluate(c, data) == {
        "top1": knn_protocol.top1(memory, queries, 7)}
    assert knn_protocol.PROTOCOL.columns({"top1": 0.25}) == {"k-NN top-1": 25.0}


def test_voc07_protocol_reads_multilabel_targets(monkeypatch):
    """'voc07_svm' hands the features and int8 [N, C] targets to `voc07.voc07_svm`, shows one
    column, refuses one class per image, and checks the targets' positives before training."""
    calls = []
    monkeypatch.setattr(voc07, "voc07_svm", lambda *args: calls.append(args) or {
        "mAP": 0.625, "per_class_ap": [0.5, 0.75], "costs": [1.0, 0.1]})
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(12, 5)).astype(np.float32), rng.choice([-1, 0, 1], (12, 2))
    c = _config(protocols=("voc07_svm",))
    out = runner.score_features(cache.SplitFeatures(x[:8], t[:8].astype(np.int8), 2),
                                cache.SplitFeatures(x[8:], t[8:].astype(np.int8), 2), c)
    (train_x, train_t, test_x, test_t), = calls
    np.testing.assert_array_equal(train_x, x[:8])
    np.testing.assert_array_equal(test_t, t[8:])
    assert train_t.dtype == np.int8 and train_t.shape == (8, 2)
    assert runner.flat(out) == {"VOC07 mAP": 62.5}
    with pytest.raises(InputError, match=r"config\.eval\.protocols includes 'voc07_svm'.*"
                                         r"training split has labels of shape \(8,\)"):
        runner.score_features(cache.SplitFeatures(x[:8], np.zeros(8, np.int32), 2),
                              cache.SplitFeatures(x[8:], t[8:].astype(np.int8), 2), c)
    targets = np.array([[1, 1]] * 3 + [[-1, 1]] * 2 + [[0, 0]], np.int8)  # class 1: 5 of 6
    check = registry.PROTOCOLS["voc07_svm"].check
    assert check(c, checks.EvalSplit(6, targets, 2, "trainval", True),
                 checks.EvalSplit(6, targets, 2, "test", True)) is None
    with pytest.raises(InputError, match=r"trainval has fewer than 3 positive examples of "
                                         r"classes \[0\]"):
        check(c, checks.EvalSplit(5, targets[1:], 2, "trainval", True), None)
    with pytest.raises(InputError, match=r"trainval has no negative example of classes \[1\]"):
        check(c, checks.EvalSplit(5, targets[:5], 2, "trainval", True), None)
