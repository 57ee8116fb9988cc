"""Checks, made before training starts, that the evaluation at its end can run on its data.

`check_evaluation_data(config)` reads what the protocols of config.eval.protocols will read
(`runner.score`; each checked by its own `Protocol.check`, `registry.PROTOCOLS`), the training and
test splits after config.data.limit, config.eval.train_limit and config.eval.test_limit, without
decoding a single image: image folders are listed, npz files open only their label arrays, TFDS
builders report their split sizes (or config.data.num_examples under mock data). Each setting the
data cannot satisfy is a ValueError naming the config field, what was expected and the data
checked, so a missing `test/` split or a 5-way few-shot on 3 classes stops the run in seconds
rather than after days of training.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

from bow_jax.lib.errors import InputError, MissingInputError
from bow_jax.data import datasets, eval_input
from bow_jax.protocols import api, registry


class MissingSplitError(MissingInputError, ValueError):
    """A split (file or folder) the evaluation reads does not exist. Both a FileNotFoundError,
    as the loaders raise it, and a ValueError, as every other failed check; an ExplainedError
    (`MissingInputError`): printed whole, without a traceback."""


EvalSplit = api.EvalSplit  # a split as the evaluation will see it (moved there)


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
    return EvalSplit(count, labels, summary.num_classes, where + ")",
                     summary.labels is not None and np.ndim(summary.labels) == 2)


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
    if test.labels is None or not test.labels.size or not train.num_classes or test.multilabel:
        return
    if int(test.labels.max()) >= train.num_classes or int(test.labels.min()) < 0:
        raise InputError(f"config.data: {test.where} has labels in [{test.labels.min()}, "
                         f"{test.labels.max()}], but {train.where} defines "
                         f"{train.num_classes} classes; every split must use the training "
                         f"split's class index.")


def _check_label_kind(protocols, train: EvalSplit, test: EvalSplit) -> None:
    """Each chosen protocol reads labels of its kind (`Protocol.labels`): one class per image,
    or multi-label targets (VOC07); InputError naming config.eval.protocols otherwise."""
    for protocol in protocols:
        for split in (train, test):
            multilabel = protocol.labels == api.MULTILABEL
            if multilabel != split.multilabel:
                have = "multi-label targets" if split.multilabel else "one class per image"
                want = "multi-label targets [N, C]" if multilabel else "one class per image"
                raise InputError(f"config.eval.protocols includes {protocol.name!r}, which "
                                 f"needs {want}; {split.where} has {have}.")


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
    split's classes; config.eval.protocols names registered protocols (`registry.chosen`), each
    reading labels of the data's kind (one class per image or multi-label), and each protocol's
    own `check` passes (linear: a known recipe, >= 2 classes; k-NN: k <= training examples;
    few-shot: the class split parses and every class has shots + queries test examples, on TFDS
    (labels unknown unread) ways x (max shot + queries) <= the test split's size;
    voc07_svm: 3 positive training examples and a negative one per class); TFDS: splits are
    streamed (`data.eval_input`); images of several sizes get the evaluation transform. Cost:
    listing files and reading label arrays, no image decoding, no feature extraction.
    """
    protocols = registry.chosen(config)  # InputError naming config.eval.protocols
    _check_batch_size(config.eval)
    field = eval_input.evaluation_data_field(config)  # 'config.eval.data' when that is set
    try:
        inputs = [eval_input.evaluation_input(config, s) for s in ("train", "test")]  # the
        # transform fields, the TFDS splits; their label_shape tells multi-label data (TFDS)
        train, test = (dataclasses.replace(split, multilabel=split.multilabel or bool(
            inp.label_shape)) for split, inp in zip(evaluation_splits(config), inputs))
        _check_labels(train, test)
    except FileNotFoundError as e:
        raise MissingSplitError(_named(f"{e} The evaluation reads the 'train' and 'test' "
                                       f"splits of {field}.", field)) from None
    except ValueError as e:
        if field == "config.data":
            raise
        raise InputError(_named(str(e), field)) from None
    _check_label_kind(protocols, train, test)
    for protocol in protocols:
        protocol.check(config, train, test)
