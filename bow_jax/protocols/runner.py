"""Score a trained state with the frozen-feature protocols and write the results.

Linear probe (train split → test split), prototypical few-shot episodes and weighted k-NN, all on
`method.encode` features of streamed splits (`cache.split_features`: any source, never a whole
split of images in host memory), cached in the workdir. Results go to `<workdir>/eval/results.json` and `results.md`; with
`config.eval.random_init` the same network at random initialisation is scored beside it.
"""
import json
import os
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.data import eval_input
from bow_jax.protocols import augmented_linear, cache, fewshot, knn, linear
from bow_jax.lib import files, logs, writers
from bow_jax.lib.errors import InputError


def as_input(data, split: str) -> eval_input.EvalInput:
    """`data` as an evaluation input: an `EvalInput` as is, an `ArrayDataset` sliced in memory."""
    if isinstance(data, eval_input.EvalInput):
        return data
    return eval_input.ArraysInput(data.name, split, len(data), data.num_classes,
                                  eval_input.Transform(), data=data)


def pretext(method, variables, test, config, mesh) -> dict:
    """The method's own task scored on the test split (e.g. RotNet's rotation accuracy), streamed
    like the features (any source) and never cached: per-example scores averaged."""
    if method.pretext_scores is None:
        return {}
    test = as_input(test, "test")
    probe = np.zeros((1,) + tuple(test.image_shape), np.uint8)
    names = sorted(jax.eval_shape(method.pretext_scores, variables, probe))

    def columns(v, x):
        return jnp.stack([method.pretext_scores(v, x)[n] for n in names], axis=1)

    scores = cache.split_features(columns, test, config.eval.batch_size, mesh,
                                  variables=variables).feats
    return {name: float(scores[:, i].mean()) for i, name in enumerate(names)}


def linear_protocol(ev) -> dict:
    """config.eval.linear_protocol's settings, its epochs (and milestones, scaled) replaced by
    config.eval.linear_epochs and its batch by config.eval.linear_batch_size when set."""
    protocol = dict(linear.PROTOCOLS[ev.linear_protocol])
    if getattr(ev, "linear_batch_size", 0) and "batch_size" in protocol:
        protocol["batch_size"] = int(ev.linear_batch_size)
    if ev.linear_epochs and "epochs" in protocol:
        scale = ev.linear_epochs / protocol["epochs"]
        protocol["milestones"] = tuple(max(1, round(m * scale)) for m in protocol["milestones"])
        protocol["epochs"] = ev.linear_epochs
    return protocol


def score_features(train: cache.SplitFeatures, test: cache.SplitFeatures, config,
                   augmented_probe=None) -> dict:
    """All enabled protocols of config.eval on precomputed features: linear probe (train ->
    test; `train.flip_feats` for protocols with precache_flip; for protocols with 'augment',
    `augmented_probe(protocol)` trains on images and returns its result), few-shot episodes on
    the test features (from config.eval.fewshot_classes only, when set:
    `fewshot.class_split`), weighted k-NN (train as memory)."""
    ev = config.eval
    out = {"feature_dim": int(train.feats.shape[1])}
    if ev.linear:
        protocol = linear_protocol(ev)
        if protocol.get("precache_flip"):
            protocol["flip_feats"] = train.flip_feats
        if protocol.get("augment"):
            if augmented_probe is None:
                raise InputError(f"config.eval.linear_protocol={ev.linear_protocol!r} trains on "
                                 f"augmented images: score it with runner.score, not features.")
            out["linear"] = augmented_probe(protocol)
        else:
            out["linear"] = linear.linear_probe(train.feats, train.labels, test.feats,
                                                test.labels, train.num_classes, seed=config.seed,
                                                **protocol)
    if ev.fewshot:
        shots = {}
        classes = fewshot.class_split(getattr(ev, "fewshot_classes", ""),  # None: every class
                                      getattr(ev, "fewshot_classes_key", ""), test.labels,
                                      test.num_classes)
        for shot in writers.progress(tuple(ev.fewshot_shots), desc="few-shot", unit="shots"):
            shots[shot] = fewshot.fewshot_accuracy(
                test.feats, test.labels, n_way=ev.fewshot_ways, n_shot=shot,
                n_query=ev.fewshot_queries, n_episodes=ev.fewshot_episodes, seed=config.seed,
                classes=classes)
        out["fewshot"] = {f"{ev.fewshot_ways}way_{k}shot": v for k, v in shots.items()}
    if ev.knn:
        out["knn"] = {"top1": knn.knn_accuracy(train.feats, train.labels, test.feats, test.labels,
                                               train.num_classes, k=ev.knn_k)}
    return out


def score(method, variables, train, test, config, mesh, workdir: Optional[str] = None,
          tag: str = "") -> dict:
    """All enabled protocols on the features of one network (`method.encode(variables, ...)`).

    `train`, `test`: `EvalInput`s (streamed: TFDS, image folders, arrays) or `ArrayDataset`s.
    With `workdir` the features are cached there under `tag` (`cache.split_features`). The flip
    features of the training split are extracted only for a linear protocol with precache_flip.
    """
    ev = config.eval
    flip = bool(ev.linear and linear_protocol(ev).get("precache_flip"))
    common = dict(variables=variables, workdir=workdir, tag=tag, feature=ev.feature,
                  max_unreadable_fraction=float(getattr(eval_input.evaluation_data(config),
                                                        "max_unreadable_fraction", 0.05)))
    train_x = cache.split_features(method.encode, as_input(train, "train"), ev.batch_size, mesh,
                                   flip=flip, **common)
    test_x = cache.split_features(method.encode, as_input(test, "test"), ev.batch_size, mesh,
                                  **common)

    def augmented_probe(protocol):  # the augmented linear probe (evaluate.augmented_linear)
        return augmented_linear.probe_for_score(config, method.encode, variables,
                                                as_input(train, "train"), train_x, test_x,
                                                protocol, mesh, workdir, tag)

    scores = score_features(train_x, test_x, config, augmented_probe)
    return {"feature_dim": scores.pop("feature_dim"),
            "pretext": pretext(method, variables, test, config, mesh), **scores}


def flat(result: dict) -> dict:
    """{'linear top-1': ..., '5way_1shot': ..., 'knn top-1': ...} in percent."""
    row = {name: 100 * value for name, value in result.get("pretext", {}).items()}
    if "linear" in result:
        row["linear top-1"] = 100 * result["linear"]["top1"]
    for name, v in result.get("fewshot", {}).items():
        row[name] = 100 * v["mean"]
    if "knn" in result:
        row["k-NN top-1"] = 100 * result["knn"]["top1"]
    return row


def rows_table(rows: dict, first_column: str = "network", align: str = "---",
               missing: str = "") -> str:
    """A markdown table of {row name: {column: value}}; columns in first-seen order."""
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    lines = [f"| {first_column} | " + " | ".join(columns) + " |",
             "|---|" + f"{align}|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[c]:.2f}" if c in row else missing for c in columns) + " |")
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """One row per network, one column per protocol (accuracies in %)."""
    return rows_table({name: flat(r) for name, r in results.items()})


def write_results(workdir: str, results: dict) -> str:
    """JSON and markdown under <workdir>/eval, written atomically (temp file + rename) on
    process 0; returns the markdown file's path."""
    out_dir = os.path.join(workdir, "eval")
    if jax.process_index() == 0:
        for name, text in (("results.json", json.dumps(results, indent=2)),
                           ("results.md", markdown_table(results) + "\n")):
            files.atomic_write_text(os.path.join(out_dir, name), text)
    return os.path.join(out_dir, "results.md")


def report(results: dict, what: str, workdir: str) -> None:
    """Writes `results` under <workdir>/eval and prints their table and where they went."""
    path = write_results(workdir, results)
    cached = os.path.join(workdir, "eval", "features")
    logs.say(f"Evaluation of {what}:\n{markdown_table(results)}\nresults: {path} (and .json)"
             + (f"; features cached in {cached}" if os.path.isdir(cached) else ""))


def evaluate_states(config, workdir: str, method, states: Iterable, mesh,
                    random_init=None) -> dict:
    """Scores each state of `states` (one at a time: it may be a generator that restores them),
    one row per step, then `random_init` (the method's initial state) if given; writes and prints
    one table. Both splits are streamed (`eval_input.evaluation_input`) and their features cached
    under <workdir>/eval/features (config.eval.cache_features)."""
    train = eval_input.evaluation_input(config, "train")
    test = eval_input.evaluation_input(config, "test")
    where = workdir if getattr(config.eval, "cache_features", True) else None
    results = {}
    for state in states:
        step = int(state.step)
        results[f"{config.method} step {step}"] = score(method, state, train, test, config, mesh,
                                                        where, f"step_{step}")
    if random_init is not None:
        results["random init"] = score(method, random_init, train, test, config, mesh, where,
                                       "random_init")
    data = eval_input.evaluation_data(config)  # config.eval.data when set, else config.data
    report(results, f"{data.source} data, feature {config.eval.feature!r}", workdir)
    return results
