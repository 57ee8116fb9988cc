"""Few-shot episodes on a class split (config.eval.fewshot_classes): the documented seeded draw
'random:<N>:<seed>', class files (JSON list, JSON object + key, text), episodes that never leave
the split, accuracies equal to numpy on the split, and bad inputs named before any work."""
import json
import types

import numpy as np
import pytest
from PIL import Image

from bow_jax.config import base_config
from bow_jax.lib import errors
from bow_jax.protocols import cache, checks, fewshot, fewshot_protocol, runner


def _np_episode_accuracy(feats, support, query, query_labels, n_way, n_shot):
    """Cosine prototypical classifier written from the formula (OBoW `few_shot_classifier_with_
    prototypes`): normalised supports averaged per way, prototypes and queries normalised."""
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    protos = unit(unit(feats[support]).reshape(n_way, n_shot, -1).mean(1))
    return np.mean((unit(feats[query]) @ protos.T).argmax(1) == query_labels)


def _features(num_classes=10, per_class=9, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    # Weakly separated classes: episode accuracies vary, so a wrong class set shows.
    feats = (rng.normal(size=(num_classes, dim))[labels] * 0.8
             + rng.normal(size=(labels.size, dim))).astype(np.float32)
    return feats, labels


# -------------------------------------------------------------------------- the split itself

def test_random_split_is_the_documented_seeded_draw():
    present = np.array([9, 2, 5, 2, 7, 0, 11, 5])  # the classes present: 0 2 5 7 9 11
    got = fewshot.class_split("random:4:3", "", present, 12)
    want = np.sort(np.random.RandomState(3).choice(np.array([0, 2, 5, 7, 9, 11]), 4,
                                                   replace=False))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64 and set(got) <= {0, 2, 5, 7, 9, 11}
    assert not np.array_equal(fewshot.class_split("random:4:4", "", present, 12), got)
    assert fewshot.class_split("", "", present, 12) is None


def test_class_files_parse_in_every_format(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([7, 1, 4]))
    (tmp_path / "splits.json").write_text(json.dumps(
        {"base_classes": [0, 2], "novel_classes_1": [3, 5], "novel_classes_2": [7, 1, 4],
         "label_names": ["n0", "n1"]}))
    (tmp_path / "classes.txt").write_text("# novel classes\n7\n\n1  # a comment\n4\n")
    want = np.array([1, 4, 7])
    for name, key in (("list.json", ""), ("splits.json", "novel_classes_2"),
                      ("classes.txt", "")):
        got = fewshot.class_split(str(tmp_path / name), key, np.arange(8), 8)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64
    np.testing.assert_array_equal(
        fewshot.read_class_file(str(tmp_path / "splits.json"), "novel_classes_1"), [3, 5])


@pytest.mark.parametrize("content,spec_key,error,message", [
    (None, "", FileNotFoundError, r"config\.eval\.fewshot_classes='.*missing\.json': no such"),
    ('{"novel_classes_2": [1]}', "novel_2", ValueError,
     r"config\.eval\.fewshot_classes_key='novel_2': .* one of \['novel_classes_2'\]"),
    ('{"novel_classes_2": [1]}', "", ValueError, r"config\.eval\.fewshot_classes_key=''"),
    ('[1, "b"]', "", ValueError, r"config\.eval\.fewshot_classes=.*expected integer"),
    ("1\n2.5\n", "", ValueError, r"config\.eval\.fewshot_classes=.*expected integer"),
    ("[1, 2, 1]", "", ValueError, r"config\.eval\.fewshot_classes=.*repeat"),
    ('"3"', "", ValueError, r"config\.eval\.fewshot_classes=.*expected integer"),
    ('{"novel_classes_2": 3}', "novel_classes_2", ValueError,
     r"config\.eval\.fewshot_classes=.*\['novel_classes_2'\]: expected a JSON list"),
    ("[0, 8]", "", ValueError, r"config\.eval\.fewshot_classes=.*\[0, 8\]; expected them in "
                               r"\[0, 8\)"),
    ("[-1, 3]", "", ValueError, r"config\.eval\.fewshot_classes=.*expected them in \[0, 8\)"),
    ("[0, 1, Infinity]", "", ValueError, r"config\.eval\.fewshot_classes=.*expected integer"),
])
def test_bad_class_files_are_named(tmp_path, content, spec_key, error, message):
    path = tmp_path / ("missing.json" if content is None else "classes.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        fewshot.class_split(str(path), spec_key, np.arange(8), 8)


@pytest.mark.parametrize("spec,message", [
    ("random:300", r"expected 'random:<N>:<seed>'"),
    ("random:a:0", r"expected 'random:<N>:<seed>'"),
    ("random:0:0", r"N >= 1"),
    ("random:3:0:1", r"expected 'random:<N>:<seed>'"),
    ("random:9:0", r"9 classes asked of the 8 there are"),
])
def test_bad_random_splits_are_named(spec, message):
    with pytest.raises(ValueError, match=r"config\.eval\.fewshot_classes='random.*" + message):
        fewshot.class_split(spec, "", np.arange(8), 8)


# ------------------------------------------------------------------------------- the episodes

def test_episodes_never_leave_the_split():
    _, labels = _features()
    split = np.array([1, 4, 7, 8])
    support, query, query_labels = fewshot.sample_episodes(labels, 3, 2, 3, 60, seed=1,
                                                           classes=split)
    assert set(labels[support].ravel()) == set(split)  # every class of the split, no other
    assert set(labels[query].ravel()) <= set(split)
    ways = labels[support].reshape(60, 3, 2)[:, :, 0]
    np.testing.assert_array_equal(np.take_along_axis(ways, query_labels, 1), labels[query])
    # Without a split, or with every class as the split, the episodes are today's.
    today = fewshot.sample_episodes(labels, 3, 2, 3, 60, seed=1)
    for a, b in zip(today, fewshot.sample_episodes(labels, 3, 2, 3, 60, seed=1,
                                                   classes=np.arange(10))):
        np.testing.assert_array_equal(a, b)


def test_split_accuracy_equals_numpy_on_the_split_only():
    feats, labels = _features()
    split = np.array([0, 3, 5, 6, 9])
    cfg = dict(n_way=3, n_shot=2, n_query=4, n_episodes=40, seed=2)
    got = fewshot.fewshot_accuracy(feats, labels, classes=split, **cfg)
    # numpy: keep only the split's rows, draw the episodes there, classify from the formula.
    keep = np.isin(labels, split)
    sub_feats, sub_labels = feats[keep], labels[keep]
    episodes = fewshot.sample_episodes(sub_labels, cfg["n_way"], cfg["n_shot"], cfg["n_query"],
                                       cfg["n_episodes"], cfg["seed"])
    accs = np.array([_np_episode_accuracy(sub_feats, s, q, ql, cfg["n_way"], cfg["n_shot"])
                     for s, q, ql in zip(*episodes)])
    assert 0.2 < accs.mean() < 0.99 and accs.std() > 0
    np.testing.assert_allclose(got["mean"], accs.mean(), rtol=1e-6)
    np.testing.assert_allclose(got["ci95"], 1.96 * accs.std() / np.sqrt(accs.size), rtol=1e-5)
    assert got != fewshot.fewshot_accuracy(feats, labels, **cfg)  # the split mattered


def test_score_features_draws_from_config_eval_fewshot_classes():
    feats, labels = _features()
    c = base_config("rotnet")
    c.eval.update(dict(protocols=("fewshot",), fewshot_ways=3, fewshot_shots=(1, 2),
                       fewshot_queries=3, fewshot_episodes=30, fewshot_classes="random:5:0"))
    test = cache.SplitFeatures(feats, labels, 10)
    out = runner.score_features(test, test, c)["fewshot"]
    classes = np.sort(np.random.RandomState(0).choice(np.arange(10), 5, replace=False))
    for shot in (1, 2):
        assert out[f"3way_{shot}shot"] == fewshot.fewshot_accuracy(
            feats, labels, n_way=3, n_shot=shot, n_query=3, n_episodes=30, seed=c.seed,
            classes=classes)


# ------------------------------------------------------------ checked before any work is done

def _image_folder(root, counts):
    """root/train/<class>/ (6 images each) and root/test/<class>/ (counts[c] images)."""
    rng = np.random.default_rng(0)
    for split, per in (("train", [6] * len(counts)), ("test", counts)):
        for c, n in enumerate(per):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).save(
                    root / split / f"class{c}" / f"{i}.png")


def _config(root, **eval_fields):
    c = base_config("rotnet")
    c.data.update(dict(source="image_folder", path=str(root), image_size=6))
    c.eval.update(dict(batch_size=8, knn_k=3, fewshot_ways=2, fewshot_shots=(1, 2),
                       fewshot_queries=2, **eval_fields))
    return c


def test_check_names_each_unsatisfiable_class_split(tmp_path):
    _image_folder(tmp_path, [4, 4, 4, 2])  # class 3 has 2 test images, too few for 1 + 2
    (tmp_path / "ok.json").write_text("[0, 2]")
    (tmp_path / "small.json").write_text("[0, 3]")
    (tmp_path / "one.txt").write_text("1\n")
    (tmp_path / "far.json").write_text("[0, 4]")
    ok = _config(tmp_path, fewshot_classes=str(tmp_path / "ok.json"))
    assert checks.check_evaluation_data(ok) is None
    cases = [
        ("small.json", r"1-shot episodes need 3 examples of each class of "
                       r"config\.eval\.fewshot_classes=.*small\.json.* has 2 of class 3"),
        ("one.txt", r"config\.eval\.fewshot_ways=2 exceeds the 1 classes of "
                    r"config\.eval\.fewshot_classes="),
        ("far.json", r"config\.eval\.fewshot_classes=.*\[0, 4\]; expected them in \[0, 4\)"),
        ("none.json", r"config\.eval\.fewshot_classes=.*none\.json': no such file"),
    ]
    for name, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            checks.check_evaluation_data(_config(tmp_path,
                                                 fewshot_classes=str(tmp_path / name)))
    with pytest.raises(ValueError, match=r"config\.eval\.fewshot_classes='random:5:0': 5 "
                                         r"classes asked of the 4"):
        checks.check_evaluation_data(_config(tmp_path, fewshot_classes="random:5:0"))
    # The same split with few-shot off is not read at all.
    off = _config(tmp_path, protocols=("linear", "knn"), fewshot_classes=str(tmp_path / "none.json"))
    assert checks.check_evaluation_data(off) is None


def test_check_on_tfds_like_splits_uses_the_class_count():
    """Without labels (TFDS) the split is still resolved: a file's indices against the class
    index, ways against the split's size."""
    test = checks.EvalSplit(100, None, 10, "TFDS toy split 'test'")
    ev = types.SimpleNamespace(fewshot_shots=(1,), fewshot_ways=5, fewshot_queries=1,
                               fewshot_episodes=3, fewshot_classes="random:4:0",
                               fewshot_classes_key="")
    with pytest.raises(ValueError, match=r"fewshot_ways=5 exceeds the 4 classes of "
                                         r"config\.eval\.fewshot_classes='random:4:0'"):
        fewshot_protocol.check_episodes(ev, test)
    ev.fewshot_ways = 4
    assert fewshot_protocol.check_episodes(ev, test) is None


def test_tfds_like_split_too_small_for_the_episodes_fails_before_training():
    """A fresh user's repro: TFDS labels are unknown before the split is read, so 500-shot
    episodes passed the check and failed after training. The split's size bounds them:
    ways x (max shot + queries) examples at least, every class of a class split that many."""
    ev = types.SimpleNamespace(fewshot_shots=(1, 5), fewshot_ways=5, fewshot_queries=15,
                               fewshot_episodes=3, fewshot_classes="", fewshot_classes_key="")
    test = checks.EvalSplit(200, None, 10, "the test split (TFDS toy split 'test', first 200 "
                                           "by config.eval.test_limit)")
    assert fewshot_protocol.check_episodes(ev, test) is None  # 5 x 20 = 100 <= 200
    ev.fewshot_shots = (1, 500)
    with pytest.raises(ValueError, match=r"^config\.eval\.fewshot_shots=\(1, 500\), config\.eval"
                                         r"\.fewshot_queries=15 and config\.eval\.fewshot_ways=5"
                                         r": 500-shot episodes need 515 examples of each of at "
                                         r"least 5 classes, 2575 in all; the test split \(TFDS "
                                         r"toy split 'test', first 200 .*\) has 200\."):
        fewshot_protocol.check_episodes(ev, test)
    ev.fewshot_shots, ev.fewshot_queries = (1,), 100
    with pytest.raises(ValueError, match=r"fewshot_queries=100 .*need 101 examples"):
        fewshot_protocol.check_episodes(ev, test)
    ev.fewshot_queries, ev.fewshot_classes = 15, "random:8:0"  # 8 x 16 = 128 <= 200
    assert fewshot_protocol.check_episodes(ev, test) is None
    ev.fewshot_shots = (1, 10)  # 8 classes x 25 = 200: still fits; 11 shots do not
    assert fewshot_protocol.check_episodes(ev, test) is None
    ev.fewshot_shots = (11,)
    with pytest.raises(ValueError, match=r"each of 8 classes of config\.eval\.fewshot_classes="
                                         r"'random:8:0', 208 in all;"):
        fewshot_protocol.check_episodes(ev, test)


def test_too_few_examples_found_once_the_labels_are_read_is_an_input_error():
    """What the size bound cannot see (a class with 17 test examples among larger ones) is found
    when the features' labels are read: an InputError naming the fields, the class and its
    count, not sample_episodes' bare ValueError."""
    feats, labels = _features(num_classes=10, per_class=40)
    keep = np.flatnonzero(labels != 8)
    keep = np.sort(np.concatenate([keep, np.flatnonzero(labels == 8)[:17]]))  # class 8: 17
    c = base_config("rotnet")
    c.eval.update(dict(protocols=("fewshot",), fewshot_ways=5, fewshot_shots=(1, 20),
                       fewshot_queries=1, fewshot_episodes=3))
    test = cache.SplitFeatures(feats[keep], labels[keep], 10, where="/run/cache/test")
    with pytest.raises(errors.InputError, match=r"^config\.eval\.fewshot_shots=\(1, 20\) with "
                                                r"config\.eval\.fewshot_queries=1: 20-shot "
                                                r"episodes need 21 examples of each class; the "
                                                r"test split as read \(377 examples, cached in "
                                                r"/run/cache/test\) has 17 of class 8"):
        runner.score_features(test, test, c)
    c.eval.fewshot_shots = (1, 16)
    assert set(runner.score_features(test, test, c)["fewshot"]) == {"5way_1shot", "5way_16shot"}
