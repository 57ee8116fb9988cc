"""Pascal VOC 2007 classification with per-class linear SVMs on frozen features: the transfer
benchmark of Goyal et al., "Scaling and Benchmarking Self-Supervised Visual Representation
Learning" (ICCV 2019; github.com/facebookresearch/fair_self_supervision_benchmark `tools/svm/`),
as BoWNet (Gidaris et al., CVPR 2020, Table 3) and OBoW (CVPR 2021, Table 6: R50 89.3 mAP) ran it.

Recipe (one place): features as float64, each row divided by (its L2 norm + 1e-5); per class c
one `sklearn.svm.LinearSVC(C, class_weight={1: 2, -1: 1}, l2 penalty, squared hinge, dual, tol
1e-4, max_iter 2000)` on trainval with targets +1 (a non-difficult instance of c) / -1 (absent,
and difficult-only images too); C chosen per class among `COSTS` by the mean `average_precision`
of a 3-fold cross-validation (`cross_val_score(cv=3)`: stratified, unshuffled folds), ties to
the smaller C, then refit on all of trainval. Score: per class the VOC 2010+ all-points AP
(`voc_average_precision`) of the test decision values, difficult-only images (target -1) left
out; mAP the mean over classes.

Targets: int8 [N, C] in {-1, 0, 1} (`data.eval_input`: 1 = a non-difficult instance, -1 = only
difficult instances, 0 = absent), as the streamed feature cache keeps them.
"""
from __future__ import annotations

import numpy as np

from bow_jax.lib import writers
from bow_jax.lib.errors import InputError

# OBoW's costs (github.com/valeoai/obow, its VOC07 SVM command) plus 0.5^k, k = 4..19 (the fair
# benchmark's low-cost sweep); ascending, so a tie in cross-validated AP picks the smaller C.
COSTS = tuple(sorted((0.05, 0.1, 0.3, 0.5, 1.0, 3.0, 5.0) + tuple(0.5 ** k for k in range(4, 20))))
CV_FOLDS = 3
NORM_EPS = 1e-5


def normalize_rows(feats) -> np.ndarray:
    """float64 [N, D]: each row x / (||x||_2 + 1e-5) (the benchmark's `normalize_features`)."""
    x = np.asarray(feats, np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + NORM_EPS)


def make_svm(cost: float):
    """The benchmark's per-class classifier at cost `cost`. random_state=0 (the benchmark leaves
    it unset) only fixes the order of liblinear's dual coordinate descent, so a run repeats."""
    from sklearn.svm import LinearSVC
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge",
                     dual=True, tol=1e-4, max_iter=2000, random_state=0)


def voc_average_precision(scores, targets) -> float:
    """VOC 2010+ all-points AP of one class, a fraction in [0, 1].

    scores: float [N] (higher = more confident); targets: int [N] in {-1, 0, 1}, images whose
    target is -1 (difficult only) left out. Images are ranked by decreasing score (ties in input
    order), precision and recall taken at every rank, precision made monotone non-increasing from
    the right, and AP = sum over recall steps of (step width) x (envelope precision): the
    benchmark's `get_precision_recall` + `calculate_ap`. InputError when no positive is left.
    """
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 1:
        raise InputError(f"scores {scores.shape} and targets {targets.shape} must be [N] alike.")
    keep = targets != -1
    positive = targets[keep] > 0
    if not positive.any():
        raise InputError("VOC AP: no positive (target 1) example to rank; AP is undefined.")
    order = np.argsort(-scores[keep], kind="stable")
    hits = positive[order].astype(np.float64)
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / hits.sum()
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    widths = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(widths * envelope))


def _binary(targets_c: np.ndarray) -> np.ndarray:
    """+1 where the class is present (non-difficult), -1 elsewhere (absent or difficult only)."""
    return np.where(targets_c == 1, 1, -1).astype(np.int32)


def train_class(x: np.ndarray, targets_c: np.ndarray, costs) -> tuple:
    """(chosen cost, fitted SVM, mean CV AP per cost [len(costs)]) for one class on trainval."""
    from sklearn.model_selection import cross_val_score
    y = _binary(targets_c)
    cv = np.array([cross_val_score(make_svm(c), x, y, cv=CV_FOLDS,
                                   scoring="average_precision").mean() for c in costs])
    best = float(costs[int(np.argmax(cv))])
    return best, make_svm(best).fit(x, y), cv


def _check(train_feats, train_targets, test_feats, test_targets, costs):
    """The arrays as the SVMs read them; InputError on shapes, values, too few positives."""
    x, t = normalize_rows(train_feats), np.asarray(train_targets)
    xt, tt = normalize_rows(test_feats), np.asarray(test_targets)
    if t.ndim != 2 or tt.ndim != 2 or t.shape[1] != tt.shape[1] or len(x) != len(t) \
            or len(xt) != len(tt) or x.shape[1] != xt.shape[1]:
        raise InputError(f"voc07_svm: features {x.shape} / {xt.shape} and targets {t.shape} / "
                         f"{tt.shape} must be [N, D] and [N, C] alike (multi-label data: "
                         f"config.eval.data must have VOC's 'labels' features).")
    for name, a in (("train", t), ("test", tt)):
        if not np.isin(a, (-1, 0, 1)).all():
            raise InputError(f"voc07_svm: {name} targets must be in {{-1, 0, 1}}.")
    few = [c for c in range(t.shape[1]) if (t[:, c] == 1).sum() < CV_FOLDS]
    if few:
        raise InputError(f"voc07_svm: classes {few} have fewer than {CV_FOLDS} positive training "
                         f"examples ({CV_FOLDS}-fold cross-validation); config.eval.train_split "
                         f"or config.eval.train_limit leaves too few.")
    if not len(costs) or min(costs) <= 0:
        raise InputError(f"voc07_svm: costs {tuple(costs)} must be positive and not empty.")
    return x, t, xt, tt


def voc07_svm(train_feats, train_targets, test_feats, test_targets, costs=COSTS,
              n_jobs: int = -1) -> dict:
    """The VOC07 SVM benchmark (module docstring) on precomputed features.

    train_feats float [N, D], train_targets int [N, C] in {-1, 0, 1} (trainval); test_feats float
    [M, D], test_targets int [M, C]. `costs`: the C values tried per class. `n_jobs`: classes
    trained at once in joblib worker processes (-1 = every core; 1 = here): the 20 classes x 23
    costs x 3 folds are independent fits (~1,400 for VOC07), and processes, unlike threads, keep
    each fit's liblinear random state its own (liblinear releases the GIL, but its generator is one
    per process), so the result does not depend on n_jobs. Returns {'mAP': float, 'per_class_ap':
    [C floats], 'costs': [C chosen costs]}, APs as fractions in [0, 1]. InputError on mismatched
    shapes, targets outside {-1, 0, 1}, a class with fewer than 3 training positives or none in the
    test split.
    """
    from joblib import Parallel, delayed
    x, t, xt, tt = _check(train_feats, train_targets, test_feats, test_targets, costs)
    classes = range(t.shape[1])
    fits = Parallel(n_jobs=n_jobs)(
        delayed(train_class)(x, t[:, c], tuple(costs))
        for c in writers.progress(classes, len(classes), "VOC07 SVMs", "class"))
    aps = [voc_average_precision(svm.decision_function(xt), tt[:, c])
           for c, (_, svm, _) in enumerate(fits)]
    return {"mAP": float(np.mean(aps)), "per_class_ap": [float(a) for a in aps],
            "costs": [cost for cost, _, _ in fits]}
