"""Score a network with the evaluation protocols of config.eval.protocols and write the results.

A network is an encoder (`api.Encoder`: `encode(variables, uint8 images) -> [B, D]` and its
variables); its features of the streamed training and test splits (`cache.split_features`: any
source, never a whole split of images in host memory, cached in the workdir) go to every chosen
protocol of `registry.PROTOCOLS` (linear probe, few-shot episodes, weighted k-NN, VOC07 SVMs,
...), each result under the protocol's name. Results go to `<workdir>/eval/results.json` and
`results.md` (each protocol gives its columns); with `config.eval.random_init` the same network
at random initialisation (`score_random_init`, the one place that makes it) is scored beside it.
This module knows no protocol by name.
"""
import json
import os
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.data import eval_input
from bow_jax.protocols import cache, api, registry
from bow_jax.lib import files, logs, sharding


def as_input(data, split: str) -> eval_input.EvalInput:
    """`data` as an evaluation input: an `EvalInput` as is, an `ArrayDataset` sliced in memory."""
    if isinstance(data, eval_input.EvalInput):
        return data
    return eval_input.ArraysInput(data.name, split, len(data), data.num_classes,
                                  eval_input.Transform(), data=data)


def pretext(pretext_scores: Optional[Callable], variables, test, config, mesh) -> dict:
    """A method's own task, `pretext_scores(variables, uint8 images) -> {name: float [B]}`,
    scored on the test split (e.g. RotNet's rotation accuracy), streamed like the features (any
    source) and never cached: per-example scores averaged. {} when `pretext_scores` is None."""
    if pretext_scores is None:
        return {}
    test = as_input(test, "test")
    probe = np.zeros((1,) + tuple(test.image_shape), np.uint8)
    names = sorted(jax.eval_shape(pretext_scores, variables, probe))

    def columns(v, x):
        return jnp.stack([pretext_scores(v, x)[n] for n in names], axis=1)

    scores = cache.split_features(columns, test, config.eval.batch_size, mesh,
                                  variables=variables).feats
    return {name: float(scores[:, i].mean()) for i, name in enumerate(names)}


def score_features(train: cache.SplitFeatures, test: cache.SplitFeatures, config,
                   source: Optional[api.Source] = None) -> dict:
    """Every protocol of config.eval.protocols (`registry.chosen`) on the features `train` and
    `test`, each result under the protocol's name, plus 'feature_dim' (D of `train.feats`).
    `source`: the encoder and streamed images the features came from, for a protocol that reads
    images itself (None: features only; such a protocol raises InputError)."""
    data = api.EvalData(train, test, source)
    out = {"feature_dim": int(train.feats.shape[1])}
    for protocol in registry.chosen(config):
        out[protocol.name] = protocol.evaluate(config, data)
    return out


def score(encoder: api.Encoder, train, test, config, mesh, workdir: Optional[str] = None,
          tag: str = "", pretext_scores: Optional[Callable] = None) -> dict:
    """Every chosen protocol on the features of one network, `encoder.encode(encoder.variables,
    uint8 images) -> float32 [B, D]`, and its own task (`pretext_scores(variables, images) ->
    {name: [B]}`, e.g. RotNet's rotation accuracy) when given.

    `train`, `test`: `EvalInput`s (streamed: TFDS, image folders, arrays) or `ArrayDataset`s.
    With `workdir` the features are cached there under `tag` (`cache.split_features`). The flip
    features of the training split are extracted only for a protocol whose `flip` asks for them.
    Returns {'feature_dim', 'pretext', <protocol name>: its result, ...}.
    """
    ev = config.eval
    flip = any(p.flip(config) for p in registry.chosen(config))
    train_in, test_in = as_input(train, "train"), as_input(test, "test")
    common = dict(variables=encoder.variables, workdir=workdir, tag=tag, feature=ev.feature,
                  max_unreadable_fraction=float(getattr(eval_input.evaluation_data(config),
                                                        "max_unreadable_fraction", 0.05)))
    train_x = cache.split_features(encoder.encode, train_in, ev.batch_size, mesh, flip=flip,
                                   **common)
    test_x = cache.split_features(encoder.encode, test_in, ev.batch_size, mesh, **common)
    source = api.Source(encoder, train_in, mesh, workdir, tag)
    scores = score_features(train_x, test_x, config, source)
    return {"feature_dim": scores.pop("feature_dim"),
            "pretext": pretext(pretext_scores, encoder.variables, test_in, config, mesh),
            **scores}


def backbone_init(backbone, image_shape) -> Callable:
    """`init(key)` -> the variables of `backbone` (a flax module) at random initialisation, for
    images of `image_shape` (H, W, 3)."""
    def init(key):
        return backbone.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                             train=False)
    return init


def score_random_init(encode: Callable, init: Callable, train, test, config, mesh,
                      workdir: Optional[str] = None,
                      pretext_scores: Optional[Callable] = None) -> dict:
    """The one home of random-init scoring: the network of `encode` with the variables
    `init(jax.random.key(config.seed))` (a method's `init_state`, or `backbone_init(...)`),
    replicated over `mesh` (None: all devices), scored as `score` scores a trained one (cached
    under the tag 'random_init' with `workdir`)."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    variables = jax.jit(init, out_shardings=sharding.replicated(mesh))(
        jax.random.key(config.seed))
    return score(api.Encoder(encode, variables), train, test, config, mesh, workdir,
                 "random_init", pretext_scores)


def flat(result: dict) -> dict:
    """One network's table row in percent: its pretext scores, then the columns of each
    registered protocol it holds a result of (`Protocol.columns`, e.g. 'linear top-1',
    '5way_1shot', 'k-NN top-1'), in the result's order (config.eval.protocols')."""
    row = {name: 100 * value for name, value in result.get("pretext", {}).items()}
    for name, value in result.items():
        if name in registry.PROTOCOLS:
            row.update(registry.PROTOCOLS[name].columns(value))
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
                    random_init: bool = False) -> dict:
    """Scores each training state of `states` (one at a time: it may be a generator that
    restores them) with the run's `method` (its `encode`, `pretext_scores` and, for
    `random_init`, `init_state`), one row per step, then the method at random initialisation
    (`score_random_init`) when `random_init`; writes and prints one table. Both splits are
    streamed (`eval_input.evaluation_input`) and their features cached under
    <workdir>/eval/features (config.eval.cache_features)."""
    train = eval_input.evaluation_input(config, "train")
    test = eval_input.evaluation_input(config, "test")
    where = workdir if getattr(config.eval, "cache_features", True) else None
    results = {}
    for state in states:
        step = int(state.step)
        results[f"{config.method} step {step}"] = score(
            api.Encoder(method.encode, state), train, test, config, mesh, where,
            f"step_{step}", method.pretext_scores)
    if random_init:
        results["random init"] = score_random_init(method.encode, method.init_state, train, test,
                                                   config, mesh, where, method.pretext_scores)
    data = eval_input.evaluation_data(config)  # config.eval.data when set, else config.data
    report(results, f"{data.source} data, feature {config.eval.feature!r}", workdir)
    return results
