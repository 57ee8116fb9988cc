"""Score a trained state with the frozen-feature protocols and write the results.

Linear probe (train split → test split), prototypical few-shot episodes and weighted k-NN, all on
`method.encode` features. Results go to `<workdir>/eval/results.json` and `results.md`; with
`config.eval.random_init` the same network at random initialisation is scored beside it.
"""
import json
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.data.splits import load_split
from bow_jax.evaluate import features, fewshot, knn, linear
from bow_jax.lib import files, logs


def pretext(method, variables, test, config, mesh) -> dict:
    """The method's own task scored on the test split (e.g. RotNet's rotation accuracy)."""
    if method.pretext_scores is None:
        return {}
    names = sorted(jax.eval_shape(method.pretext_scores, variables, test.images[:1]))
    columns = features.extract_features(
        lambda v, x: jnp.stack([method.pretext_scores(v, x)[n] for n in names], axis=1),
        test.images, config.eval.batch_size, mesh, variables=variables)
    return {name: float(columns[:, i].mean()) for i, name in enumerate(names)}


def score(method, variables, train, test, config, mesh) -> dict:
    """All enabled protocols on the features of one network (`method.encode(variables, ...)`)."""
    ev = config.eval
    encode = method.encode
    train_x = features.extract_features(encode, train.images, ev.batch_size, mesh,
                                        variables=variables)
    test_x = features.extract_features(encode, test.images, ev.batch_size, mesh,
                                       variables=variables)
    out = {"feature_dim": int(train_x.shape[1]), "pretext": pretext(method, variables, test,
                                                                      config, mesh)}
    if ev.linear:
        protocol = dict(linear.PROTOCOLS[ev.linear_protocol])
        protocol.pop("precache_flip", None)
        if ev.linear_epochs and "epochs" in protocol:
            scale = ev.linear_epochs / protocol["epochs"]
            protocol["milestones"] = tuple(max(1, round(m * scale)) for m in protocol["milestones"])
            protocol["epochs"] = ev.linear_epochs
        out["linear"] = linear.linear_probe(train_x, train.labels, test_x, test.labels,
                                            train.num_classes, seed=config.seed, **protocol)
    if ev.fewshot:
        shots = fewshot.evaluate_fewshot(test_x, test.labels, tuple(ev.fewshot_shots),
                                         n_way=ev.fewshot_ways, n_query=ev.fewshot_queries,
                                         n_episodes=ev.fewshot_episodes, seed=config.seed)
        out["fewshot"] = {f"{ev.fewshot_ways}way_{k}shot": v for k, v in shots.items()}
    if ev.knn:
        out["knn"] = {"top1": knn.knn_accuracy(train_x, train.labels, test_x, test.labels,
                                               train.num_classes, k=ev.knn_k)}
    return out


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
    logs.say(f"Evaluation of {what}:\n{markdown_table(results)}\nresults: {path} (and .json)")


def evaluate_states(config, workdir: str, method, states: Iterable, mesh,
                    random_init=None) -> dict:
    """Scores each state of `states` (one at a time: it may be a generator that restores them),
    one row per step, then `random_init` (the method's initial state) if given; writes and prints
    one table."""
    train, test = load_split(config, "train"), load_split(config, "test")
    if config.eval.train_limit:
        train = train.subset(np.arange(min(config.eval.train_limit, len(train))))
    results = {f"{config.method} step {int(state.step)}":
               score(method, state, train, test, config, mesh) for state in states}
    if random_init is not None:
        results["random init"] = score(method, random_init, train, test, config, mesh)
    report(results, f"{config.data.source} data, feature {config.eval.feature!r}", workdir)
    return results
