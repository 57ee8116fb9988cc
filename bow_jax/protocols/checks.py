"""Checks, made before training starts, that the evaluation at its end can run on its data.

`check_evaluation_data(config)` reads what the frozen-feature protocols (`runner.score`: linear
probe, few-shot episodes, weighted k-NN) will read, the training and test splits after
config.data.limit, config.eval.train_limit and config.eval.test_limit, without decoding a single
image: image folders are listed, npz files open only their label arrays, TFDS builders report
their split sizes (or config.data.num_examples under mock data). Each setting the data cannot
satisfy is a ValueError naming the config field, what was expected and the data checked, so a
missing `test/` split or a 5-way few-shot on 3 classes stops the run in seconds rather than after
days of training.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

from bow_jax.lib.errors import InputError
from bow_jax.data import datasets, eval_input
from bow_jax.protocols import augmented_linear, fewshot, linear


class MissingSplitError(FileNotFoundError, ValueError):
    """A split (file or folder) the evaluation reads does not exist. Both a FileNotFoundError,
    as the loaders raise it, and a ValueError, as every other failed check."""


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """A split as the evaluation will see it: `num_examples` and `labels` (int [num_examples], or
    None when only reading the examples would tell, as for TFDS) after the limits; `num_classes`
    of the source's class index; `where` names the data and the limits applied, for messages."""
    num_examples: int
    labels: np.ndarray | None
    num_classes: int
    where: str


def _field(section, name: str, default=None):
    value = getattr(section, name, default)
    return default if value is None else value


def _limited(summary: datasets.SplitSummary, limits, split: str) -> EvalSplit:
    """`summary` cut to the first `limit` examples for each (field name, limit) of `limits`,
    in order; a limit larger than what it cuts is a ValueError (a wrong path or a typo)."""
    count, where = summary.num_examples, f"the {split} split ({summary.where}"
    for name, limit in limits:
        if limit < 0:
            raise InputError(f"{name}={limit}; expected 0 (all) or a positive count.")
        if limit > count:
            raise InputError(f"{name}={limit} is larger than {where}), which has {count} "
                             f"examples.")
        if limit:
            count, where = limit, f"{where}, first {limit} by {name}"
    labels = None if summary.labels is None else summary.labels[:count]
    return EvalSplit(count, labels, summary.num_classes, where + ")")


def evaluation_splits(config) -> tuple[EvalSplit, EvalSplit]:
    """(train, test) of the evaluation data (`eval_input.evaluation_data`: config.eval.data when
    set, else config.data) as `runner.evaluate_states` will read them: its `limit` then
    config.eval.train_limit on the training split, config.eval.test_limit on the test split.

    Raises FileNotFoundError / ValueError naming config.data.* when a split is missing, and
    ValueError naming config.eval.*_limit when a limit exceeds its split.
    """
    ev, data = config.eval, eval_input.evaluation_data(config)
    train = datasets.describe_split(data, "train")
    data_limit = int(_field(data, "limit", 0))
    # load_split cuts the training split to config.data.limit without complaint (a quick run on
    # part of the data), so only the evaluation's own limits are checked against their splits.
    if data_limit and data_limit < train.num_examples:
        train = dataclasses.replace(
            train, num_examples=data_limit,
            labels=None if train.labels is None else train.labels[:data_limit],
            where=f"{train.where}, first {data_limit} by config.data.limit")
    test = datasets.describe_split(data, "test")
    return (_limited(train, [("config.eval.train_limit", int(ev.train_limit))], "training"),
            _limited(test, [("config.eval.test_limit", int(ev.test_limit))], "test"))


def _check_batch_size(ev) -> None:
    devices = jax.device_count()
    if ev.batch_size < 1 or ev.batch_size % devices:
        raise InputError(f"config.eval.batch_size={ev.batch_size}: feature extraction splits "
                         f"each batch over the {devices} devices; expected a positive multiple "
                         f"of {devices}.")


def _check_labels(train: EvalSplit, test: EvalSplit) -> None:
    """Test labels index the training split's classes (the probes' and k-NN's outputs)."""
    if test.labels is None or not test.labels.size or not train.num_classes:
        return
    if int(test.labels.max()) >= train.num_classes or int(test.labels.min()) < 0:
        raise InputError(f"config.data: {test.where} has labels in [{test.labels.min()}, "
                         f"{test.labels.max()}], but {train.where} defines "
                         f"{train.num_classes} classes; every split must use the training "
                         f"split's class index.")


def _check_linear(ev, train: EvalSplit) -> None:
    if ev.linear_protocol not in linear.PROTOCOLS:
        raise InputError(f"config.eval.linear_protocol={ev.linear_protocol!r}; expected one of "
                         f"{sorted(linear.PROTOCOLS)}.")
    for name in ("linear_epochs", "linear_batch_size"):
        if int(_field(ev, name, 0)) < 0:
            raise InputError(f"config.eval.{name}={ev[name]}; expected 0 (the protocol's) or a "
                             f"positive number.")
    classes = train.num_classes
    if train.labels is not None:
        classes = len(np.unique(train.labels))
    if classes and classes < 2:
        raise InputError(f"config.eval.linear=True: a linear probe needs at least 2 classes; "
                         f"{train.where} has {classes}.")


def _check_knn(ev, train: EvalSplit) -> None:
    k = int(ev.knn_k)
    if not 1 <= k <= train.num_examples:
        raise InputError(f"config.eval.knn_k={k}: k-NN with k={k} needs k in [1, number of training (memory) "
                         f"examples]; {train.where} has {train.num_examples}.")


def _check_fewshot(ev, test: EvalSplit) -> None:
    shots = tuple(int(s) for s in ev.fewshot_shots)
    ways, queries, episodes = int(ev.fewshot_ways), int(ev.fewshot_queries), \
        int(ev.fewshot_episodes)
    for name, value in (("fewshot_ways", ways), ("fewshot_queries", queries),
                        ("fewshot_episodes", episodes)):
        if value < 1:
            raise InputError(f"config.eval.{name}={value}; expected >= 1.")
    if not shots or min(shots) < 1:
        raise InputError(f"config.eval.fewshot_shots={shots}; expected shots >= 1.")
    classes = _fewshot_classes(ev, test)
    of = "" if classes is None else f" of config.eval.fewshot_classes={ev.fewshot_classes!r}"
    if test.labels is None:  # TFDS: only the class count is known without reading the split
        available = test.num_classes if classes is None else classes.size
        if available and ways > available:
            raise InputError(f"config.eval.fewshot_ways={ways} exceeds the {available} "
                             f"classes{of} of {test.where}.")
        return
    if classes is None:
        classes = np.unique(test.labels)
    counts = np.array([np.count_nonzero(test.labels == c) for c in classes], np.int64)
    if ways > classes.size:
        raise InputError(f"config.eval.fewshot_ways={ways} exceeds the {classes.size} classes"
                         f"{of or ' present'} in {test.where}.")
    for shot in shots:
        try:  # the episode sampler's own conditions, on labels only (no features needed)
            fewshot.sample_episodes(test.labels, ways, shot, queries, 1, classes=classes)
        except ValueError as e:
            raise InputError(
                f"config.eval.fewshot_shots={shots} with config.eval.fewshot_queries={queries}: "
                f"{shot}-shot episodes need {shot + queries} examples of each class{of}; "
                f"{test.where} has {counts.min()} of class {classes[counts.argmin()]} "
                f"({e})") from None


def _fewshot_classes(ev, test: EvalSplit):
    """config.eval.fewshot_classes resolved as `runner.score_features` will (`fewshot.class_split`:
    the file read, its indices within the class index, a random draw of the classes present);
    None = every class. Errors name config.eval.fewshot_classes or fewshot_classes_key."""
    pool = np.arange(test.num_classes) if test.labels is None else np.unique(test.labels)
    return fewshot.class_split(_field(ev, "fewshot_classes", ""),
                               _field(ev, "fewshot_classes_key", ""), pool, test.num_classes)


def _named(message: str, field: str) -> str:
    """`message` of the data loaders (which name config.data.*) naming `field` instead, the
    section the evaluation read (config.eval.data for another dataset than training's)."""
    return re.sub(r"\bconfig\.data\b", field, message)


def check_evaluation_data(config) -> None:
    """Raises before any training when the evaluation (`runner.evaluate_states`) could not run
    on the data it will read; returns None when it can.

    Checked: the training and test splits of the evaluation data exist (MissingSplitError, a
    FileNotFoundError and a ValueError, naming config.data.*, or config.eval.data.* when that is
    set); config.eval.train_limit / test_limit fit
    their splits; config.eval.batch_size divides over the devices; test labels index the training
    split's classes; linear probe (when config.eval.linear): a known protocol, linear_epochs >= 0,
    >= 2 classes; k-NN (config.eval.knn): k <= training examples; few-shot (config.eval.fewshot):
    config.eval.fewshot_classes parses (file, key, indices in the class index), fewshot_ways <=
    its test classes and, for every shot count, each of them has fewshot_shots +
    fewshot_queries test examples (the condition of `fewshot.sample_episodes`); TFDS: splits are
    streamed (`data.eval_input`); images of several sizes get the evaluation transform. Cost: listing files and reading label arrays, no image decoding,
    no feature extraction.
    """
    ev = config.eval
    _check_batch_size(ev)
    field = eval_input.evaluation_data_field(config)  # 'config.eval.data' when that is set
    try:
        eval_input.evaluation_input(config, "train")  # the transform fields, the TFDS splits
        eval_input.evaluation_input(config, "test")
        train, test = evaluation_splits(config)
        _check_labels(train, test)
    except FileNotFoundError as e:
        raise MissingSplitError(_named(f"{e} The evaluation reads the 'train' and 'test' "
                                       f"splits of {field}.", field)) from None
    except ValueError as e:
        if field == "config.data":
            raise
        raise InputError(_named(str(e), field)) from None
    if ev.linear:
        _check_linear(ev, train)
        if linear.PROTOCOLS[ev.linear_protocol].get("augment"):  # trained on images: batch, source
            augmented_linear.check_probe_config(config, train.num_examples)
    if ev.knn:
        _check_knn(ev, train)
    if ev.fewshot:
        _check_fewshot(ev, test)
