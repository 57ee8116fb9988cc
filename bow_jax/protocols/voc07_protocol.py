"""Protocol 'voc07_svm': Pascal VOC07 classification by one linear SVM per class on the frozen
features (`voc07.voc07_svm`: the cost chosen by cross-validation on the training split, mean
average precision on the test split; Goyal et al. 2019's benchmark, the BoWNet / OBoW papers'
VOC07 column). Its data is multi-label: targets int8 [N, 20] in {-1, 0, 1} for both splits
(`data.eval_input`: 1 a non-difficult instance, -1 difficult instances only, 0 absent; TFDS
`voc/2007` in config.eval.data, configs/obow_resnet50_voc07.py). Result: {'mAP', 'per_class_ap',
'costs'}; column 'VOC07 mAP' (in %).
"""
from __future__ import annotations

import numpy as np

from bow_jax.lib.errors import InputError
from bow_jax.protocols import cache, api, voc07

NAME = "voc07_svm"


def targets(split: cache.SplitFeatures, name: str) -> np.ndarray:
    """The multi-label targets int8 [N, C] of `split` (its labels, `cache.split_features` of a
    multi-label input); InputError naming config.eval.protocols when they are one class per
    image."""
    values = np.asarray(split.labels)
    if values.ndim != 2:
        raise InputError(f"config.eval.protocols includes {NAME!r}, which needs multi-label "
                         f"targets [N, C] (Pascal VOC07); the {name} split has labels of shape "
                         f"{values.shape}.")
    return values.astype(np.int8)


def evaluate(config, data: api.EvalData) -> dict:
    del config
    return voc07.voc07_svm(data.train.feats, targets(data.train, "training"), data.test.feats,
                           targets(data.test, "test"))


def columns(result: dict) -> dict:
    return {"VOC07 mAP": 100 * result["mAP"]}


def _check_targets(split: api.EvalSplit, positives: int) -> None:
    """Each class of `split` has `positives` positive targets (1) and, with positives > 1 (the
    training split), an image that is not one; checked where the targets are known before
    decoding (not for TFDS)."""
    if split.labels is None or np.ndim(split.labels) != 2:
        return
    counts = (np.asarray(split.labels) == 1).sum(0)
    few = np.flatnonzero(counts < positives)
    if few.size:
        raise InputError(f"config.eval.protocols includes {NAME!r}: {split.where} has fewer "
                         f"than {positives} positive examples of classes {few.tolist()[:10]}.")
    full = np.flatnonzero(counts == len(split.labels))
    if positives > 1 and full.size:
        raise InputError(f"config.eval.protocols includes {NAME!r}: {split.where} has no "
                         f"negative example of classes {full.tolist()[:10]}.")


def check(config, train: api.EvalSplit, test: api.EvalSplit) -> None:
    """Both splits multi-label (`checks` refuses others by `labels`); where their targets are
    known before decoding, every class has `voc07.CV_FOLDS` positive training images (its
    cross-validation) and a negative one, and a positive test image."""
    del config
    _check_targets(train, voc07.CV_FOLDS)
    _check_targets(test, 1)


PROTOCOL = api.Protocol(NAME, evaluate, columns, check, labels=api.MULTILABEL)
