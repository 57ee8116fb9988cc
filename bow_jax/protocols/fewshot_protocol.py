"""Protocol 'fewshot': prototypical episodes on the test features (`fewshot.fewshot_accuracy`).

config.eval.fewshot_ways-way episodes of each of config.eval.fewshot_shots shots,
config.eval.fewshot_queries queries per class, config.eval.fewshot_episodes episodes (seed
config.seed), drawn from config.eval.fewshot_classes only when set (`fewshot.class_split`).
Result: {'<W>way_<S>shot': {'mean', 'ci95'}} (fractions); one column per shot count.
Checked before training (`check`): the episodes fit the test split's labels, or, where those
are unknown until read (TFDS), its size; `evaluate` checks again on the labels it read.
"""
from __future__ import annotations

import numpy as np

from bow_jax.lib import writers
from bow_jax.lib.errors import InputError
from bow_jax.protocols import fewshot, api

NAME = "fewshot"


def _field(ev, name: str):
    return getattr(ev, name, "") or ""


def evaluate(config, data: api.EvalData) -> dict:
    ev, test = config.eval, data.test
    check_episodes(ev, read_split(test))  # TFDS: the labels are first known here
    classes = fewshot.class_split(_field(ev, "fewshot_classes"),  # None: every class
                                  _field(ev, "fewshot_classes_key"), test.labels,
                                  test.num_classes)
    shots = {}
    for shot in writers.progress(tuple(ev.fewshot_shots), desc="few-shot", unit="shots"):
        shots[shot] = fewshot.fewshot_accuracy(
            test.feats, test.labels, n_way=ev.fewshot_ways, n_shot=shot,
            n_query=ev.fewshot_queries, n_episodes=ev.fewshot_episodes, seed=config.seed,
            classes=classes)
    return {f"{ev.fewshot_ways}way_{k}shot": v for k, v in shots.items()}


def read_split(test) -> api.EvalSplit:
    """The test split's features (`cache.SplitFeatures`) as `check_episodes` reads a split: its
    labels, now known even where the data's metadata did not give them (TFDS)."""
    labels = np.asarray(test.labels)
    cached = f", cached in {test.where}" if test.where else ""
    return api.EvalSplit(len(labels), labels, test.num_classes,
                         f"the test split as read ({len(labels)} examples{cached})")


def columns(result: dict) -> dict:
    return {name: 100 * v["mean"] for name, v in result.items()}


def episode_classes(ev, test: api.EvalSplit):
    """config.eval.fewshot_classes resolved as `evaluate` will (`fewshot.class_split`: the file
    read, its indices within the class index, a random draw of the classes present); None =
    every class. Errors name config.eval.fewshot_classes or fewshot_classes_key."""
    pool = np.arange(test.num_classes) if test.labels is None else np.unique(test.labels)
    return fewshot.class_split(_field(ev, "fewshot_classes"), _field(ev, "fewshot_classes_key"),
                               pool, test.num_classes)


def _check_counts(ev) -> tuple:
    shots = tuple(int(s) for s in ev.fewshot_shots)
    for name in ("fewshot_ways", "fewshot_queries", "fewshot_episodes"):
        if int(getattr(ev, name)) < 1:
            raise InputError(f"config.eval.{name}={int(getattr(ev, name))}; expected >= 1.")
    if not shots or min(shots) < 1:
        raise InputError(f"config.eval.fewshot_shots={shots}; expected shots >= 1.")
    return shots


def _check_split_size(shots: tuple, ways: int, queries: int, classes, of: str,
                      test: api.EvalSplit) -> None:
    """Where the labels are unknown until the split is read (TFDS), a bound from its size alone:
    every class the episodes draw from needs max(shots) + queries examples, and they draw from
    at least `ways` classes (exactly the classes of a class split, when one is set)."""
    available = test.num_classes if classes is None else classes.size
    if available and ways > available:
        raise InputError(f"config.eval.fewshot_ways={ways} exceeds the {available} "
                         f"classes{of} of {test.where}.")
    drawn, per_class = (ways if classes is None else classes.size), max(shots) + queries
    if drawn * per_class > test.num_examples:
        least = "at least " if classes is None else ""
        raise InputError(
            f"config.eval.fewshot_shots={shots}, config.eval.fewshot_queries={queries} and "
            f"config.eval.fewshot_ways={ways}: {max(shots)}-shot episodes need {per_class} "
            f"examples of each of {least}{drawn} classes{of}, {drawn * per_class} in all; "
            f"{test.where} has {test.num_examples}. Lower these settings (or use a larger "
            f"split).")


def check_episodes(ev, test: api.EvalSplit) -> None:
    """The episodes can be drawn from `test` (labels only, no features): ways, shots, queries
    and episodes >= 1; fewshot_classes parses; fewshot_ways <= its classes; every class has
    fewshot_shots + fewshot_queries examples (`fewshot.sample_episodes`'s conditions). Without
    labels (TFDS, before the split is read) only what its size bounds (`_check_split_size`);
    `evaluate` checks again once the labels are read. InputError naming the config.eval field."""
    shots, ways, queries = _check_counts(ev), int(ev.fewshot_ways), int(ev.fewshot_queries)
    classes = episode_classes(ev, test)
    of = "" if classes is None else f" of config.eval.fewshot_classes={ev.fewshot_classes!r}"
    if test.labels is None:  # TFDS: only the split's size and class count are known unread
        _check_split_size(shots, ways, queries, classes, of, test)
        return
    if classes is None:
        classes = np.unique(test.labels)
    counts = np.array([np.count_nonzero(test.labels == c) for c in classes], np.int64)
    if ways > classes.size:
        raise InputError(f"config.eval.fewshot_ways={ways} exceeds the {classes.size} classes"
                         f"{of or ' present'} in {test.where}.")
    for shot in shots:
        try:
            fewshot.sample_episodes(test.labels, ways, shot, queries, 1, classes=classes)
        except ValueError as e:
            raise InputError(
                f"config.eval.fewshot_shots={shots} with config.eval.fewshot_queries={queries}: "
                f"{shot}-shot episodes need {shot + queries} examples of each class{of}; "
                f"{test.where} has {counts.min()} of class {classes[counts.argmin()]} "
                f"({e})") from None


def check(config, train: api.EvalSplit, test: api.EvalSplit) -> None:
    del train  # the episodes read the test split only
    check_episodes(config.eval, test)


PROTOCOL = api.Protocol(NAME, evaluate, columns, check)
