"""Few-shot episodes on frozen features with a cosine prototypical classifier.

Classifier (OBoW `obow/fewshot.py:few_shot_classifier_with_prototypes`): L2-normalise the support
features, average them per class, L2-normalise the prototypes, L2-normalise the queries, and score
with 10 · cosine. Protocols:
* BoWNet CIFAR-100 (§4.1.2): 20 classes of the test set, 2000 episodes of 5-way n-shot
  (n ∈ {1, 5, 10, 50}) with 15 queries per class. The paper does not list the 20 classes: pass
  the features and labels of the chosen classes only.
* OBoW ImageNet: 200 episodes of 50-way {1, 5}-shot, 1 query per class, on the novel classes of
  the Hariharan & Girshick low-shot benchmark (the official
  `IMAGENET_LOWSHOT_BENCHMARK_CATEGORY_SPLITS.json`: 'novel_classes_1', 300 classes, validation;
  'novel_classes_2', 311 classes, test), episodes drawn from the ImageNet validation images.
Episodes draw only from a class split when one is given (`class_split`: a file of class indices,
or the documented `random:<N>:<seed>`, N classes drawn with a fixed seed). Episodes are drawn
once with numpy from a fixed seed, so they are identical across runs and models. Accuracies are
fractions in [0, 1].
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.lib.errors import InputError, MissingInputError
from bow_jax.lib.ops import l2_normalize


def sample_episodes(labels, n_way: int, n_shot: int, n_query: int, n_episodes: int,
                    seed: int = 0, classes=None):
    """Fixed-seed episodes over the classes present in `labels` [N], or over `classes` (class
    indices; None = every class present), in increasing class order either way.

    Each episode draws `n_way` distinct classes, then `n_shot + n_query` distinct samples of each
    (so support and query never share a sample). Returns
    `(support_idx [E, n_way·n_shot], query_idx [E, n_way·n_query],
    query_labels [E, n_way·n_query])`: indices into `labels` in class-major order, and
    episode-local query labels 0..n_way-1; the support labels are
    `np.repeat(np.arange(n_way), n_shot)`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N]; got shape {labels.shape}.")
    if classes is None:
        classes, counts = np.unique(labels, return_counts=True)
    else:
        classes = np.unique(np.asarray(classes, np.int64))
        counts = np.array([np.count_nonzero(labels == c) for c in classes], np.int64)
    if min(n_way, n_shot, n_query, n_episodes) < 1:
        raise ValueError("n_way, n_shot, n_query and n_episodes must all be >= 1; got "
                         f"{n_way}, {n_shot}, {n_query}, {n_episodes}.")
    if n_way > classes.size:
        raise ValueError(f"n_way={n_way} exceeds the {classes.size} classes in labels.")
    per_class = n_shot + n_query
    if counts.min() < per_class:
        raise ValueError(f"every class needs n_shot + n_query = {per_class} samples; class "
                         f"{classes[counts.argmin()]} has {counts.min()}.")
    members = [np.flatnonzero(labels == c) for c in classes]
    rng = np.random.RandomState(seed)
    support = np.empty((n_episodes, n_way, n_shot), np.int64)
    query = np.empty((n_episodes, n_way, n_query), np.int64)
    for e in range(n_episodes):
        for way, c in enumerate(rng.choice(classes.size, n_way, replace=False)):
            picked = rng.choice(members[c], per_class, replace=False)
            support[e, way], query[e, way] = picked[:n_shot], picked[n_shot:]
    query_labels = np.broadcast_to(np.repeat(np.arange(n_way), n_query),
                                   (n_episodes, n_way * n_query)).copy()
    return (support.reshape(n_episodes, -1), query.reshape(n_episodes, -1), query_labels)


def prototypical_scores(support_feats, support_labels, query_feats, n_way: int,
                        scale: float = 10.0):
    """Cosine prototypical-network logits [Q, n_way] for one episode.

    support_feats [S, D], support_labels [S] in 0..n_way-1, query_feats [Q, D].
    """
    one_hot = jax.nn.one_hot(support_labels, n_way, dtype=support_feats.dtype)     # [S, W]
    sums = one_hot.T @ l2_normalize(support_feats)                                  # [W, D]
    prototypes = sums / one_hot.sum(0)[:, None]
    return scale * l2_normalize(query_feats) @ l2_normalize(prototypes).T


@functools.partial(jax.jit, static_argnames=("n_way", "n_shot", "scale", "chunk"))
def episode_accuracies(feats, support_idx, query_idx, query_labels, *, n_way: int, n_shot: int,
                       scale: float = 10.0, chunk: int = 256):
    """Top-1 query accuracy of each episode [E]; episodes are vmapped `chunk` at a time so the
    gathered [chunk, shots, D] features bound the memory."""
    support_labels = jnp.repeat(jnp.arange(n_way), n_shot)

    def one_episode(episode):
        s_idx, q_idx, q_labels = episode
        scores = prototypical_scores(feats[s_idx], support_labels, feats[q_idx], n_way, scale)
        return jnp.mean(jnp.argmax(scores, -1) == q_labels)

    return jax.lax.map(one_episode, (support_idx, query_idx, query_labels), batch_size=chunk)


def fewshot_accuracy(feats, labels, *, n_way: int, n_shot: int, n_query: int, n_episodes: int,
                     seed: int = 0, scale: float = 10.0, chunk: int = 256,
                     classes=None) -> dict[str, float]:
    """Mean episode accuracy and its 95% confidence interval, 1.96·std/√E with the population
    std (ddof=0, numpy's default, as common few-shot code computes it); episodes drawn from
    `classes` only when given (`sample_episodes`)."""
    feats = jnp.asarray(feats, jnp.float32)
    if feats.ndim != 2 or feats.shape[0] != np.shape(labels)[0]:
        raise ValueError(f"feats must be [N, D] with N = len(labels) = {np.shape(labels)[0]}; "
                         f"got {feats.shape}.")
    support_idx, query_idx, query_labels = sample_episodes(labels, n_way, n_shot, n_query,
                                                           n_episodes, seed, classes)
    acc = np.asarray(episode_accuracies(feats, support_idx, query_idx, query_labels, n_way=n_way,
                                        n_shot=n_shot, scale=scale,
                                        chunk=min(chunk, n_episodes)), np.float64)
    return dict(mean=float(acc.mean()), ci95=float(1.96 * acc.std(ddof=0) / np.sqrt(acc.size)))


def evaluate_fewshot(feats, labels, shots: Sequence[int] = (1, 5, 10, 50), *, n_way: int = 5,
                     n_query: int = 15, n_episodes: int = 2000, seed: int = 0,
                     scale: float = 10.0) -> dict[int, dict[str, float]]:
    """`fewshot_accuracy` for each number of shots (defaults: BoWNet's CIFAR-100 protocol)."""
    return {shot: fewshot_accuracy(feats, labels, n_way=n_way, n_shot=shot, n_query=n_query,
                                   n_episodes=n_episodes, seed=seed, scale=scale)
            for shot in shots}


# ------------------------------------------------------------------------------------------------
# Class splits: which classes the episodes draw from (config.eval.fewshot_classes).

RANDOM_SPLIT = "random"  # "random:<N>:<seed>": N classes drawn with numpy RandomState(seed)


def _as_class_indices(values, where: str) -> np.ndarray:
    """Distinct integer class indices int64 [C] from a JSON list or lines of text."""
    try:
        ints = [int(v) for v in values]
        if any(float(v) != i for v, i in zip(values, ints)):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        raise InputError(f"{where}: expected integer class indices; got "
                         f"{list(values)[:5]!r}...") from None
    if len(set(ints)) != len(ints):
        raise InputError(f"{where}: class indices repeat; expected distinct indices.")
    return np.asarray(ints, np.int64)


def read_class_file(path: str, key: str = "", field: str = "config.eval.fewshot_classes",
                    key_field: str = "config.eval.fewshot_classes_key") -> np.ndarray:
    """Class indices int64 [C] from `path`: a JSON list, a JSON object whose list is `key` (the
    official low-shot file: key 'novel_classes_1' or 'novel_classes_2', indices into the sorted
    ImageNet wnids, as TFDS imagenet2012 and an ImageNet image folder number them), or text
    with one index per line (blank lines and '#' comments skipped).

    FileNotFoundError naming `field` when the file does not exist; ValueError naming `field` or
    `key_field` when it does not parse, lacks `key`, or holds repeated or non-integer indices."""
    if not os.path.isfile(path):
        raise MissingInputError(f"{field}={path!r}: no such file (expected a JSON list of class "
                                f"indices, a JSON object, or a text file, one index a line).")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, (list, dict)):  # text, one index a line ("7" alone is JSON too)
        lines = [line.split("#")[0].strip() for line in text.splitlines()]
        return _as_class_indices([x for x in lines if x], f"{field}={path!r}")
    if isinstance(parsed, dict):
        if key not in parsed:
            raise InputError(f"{key_field}={key!r}: {path} is a JSON object; expected the key "
                             f"of its class list, one of {sorted(parsed)[:10]}.")
        parsed = parsed[key]
        if not isinstance(parsed, list):
            raise InputError(f"{field}={path!r}[{key!r}]: expected a JSON list of class "
                             f"indices; got {type(parsed).__name__}.")
    return _as_class_indices(parsed, f"{field}={path!r}" + (f"[{key!r}]" if key else ""))


def random_classes(spec: str, classes, field: str = "config.eval.fewshot_classes") -> np.ndarray:
    """`spec` = "random:<N>:<seed>": N of `classes` (sorted first) drawn without replacement by
    `np.random.RandomState(seed).choice`, returned sorted (int64 [N]). ValueError naming `field`
    for a malformed spec or N larger than the classes there are."""
    parts = spec.split(":")
    try:
        count, seed = int(parts[1]), int(parts[2])
        if len(parts) != 3 or count < 1 or seed < 0:
            raise ValueError
    except (IndexError, ValueError):
        raise InputError(f"{field}={spec!r}: expected '{RANDOM_SPLIT}:<N>:<seed>' with N >= 1 "
                         f"and seed >= 0, e.g. '{RANDOM_SPLIT}:300:0'.") from None
    classes = np.unique(np.asarray(classes, np.int64))
    if count > classes.size:
        raise InputError(f"{field}={spec!r}: {count} classes asked of the {classes.size} there "
                         f"are.")
    return np.sort(np.random.RandomState(seed).choice(classes, count, replace=False))


def class_split(spec: str, key: str, classes, num_classes: int,
                field: str = "config.eval.fewshot_classes") -> np.ndarray | None:
    """The classes few-shot episodes draw from (int64 [C], sorted), or None for all of them.

    `spec`: "" (every class), "random:<N>:<seed>" (`random_classes` of `classes`, the classes
    present in the split), or a file path (`read_class_file`, with `key`). `num_classes`: the
    size of the split's class index; a file's indices must lie in [0, num_classes) (ValueError
    naming `field` otherwise; num_classes 0 = unknown, not checked)."""
    spec = str(spec or "")
    if not spec:
        return None
    if spec.split(":")[0] == RANDOM_SPLIT:
        return random_classes(spec, classes, field)
    chosen = np.sort(read_class_file(spec, key, field))
    if chosen.size and (chosen[0] < 0 or (num_classes and chosen[-1] >= num_classes)):
        raise InputError(f"{field}={spec!r}: class indices in [{chosen[0]}, {chosen[-1]}]; "
                         f"expected them in [0, {num_classes}), the split's class index.")
    return chosen
