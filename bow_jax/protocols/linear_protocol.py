"""Protocol 'linear': a linear probe, training split -> test split (`linear.PROTOCOLS`).

config.eval.linear_protocol picks the recipe: probes on the cached features (`linear.linear_probe`;
with precache_flip also on the flipped training features), or, for recipes with 'augment', on
augmented images streamed through the encoder (`augmented_linear.probe_for_score`). Result:
{'top1', 'train_top1'} (fractions); column 'linear top-1'.
"""
from __future__ import annotations

import numpy as np

from bow_jax.lib.errors import InputError
from bow_jax.protocols import augmented_linear, api, linear

NAME = "linear"


def settings(ev) -> dict:
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


def flip(config) -> bool:
    """Whether the recipe trains on centre + flip views of the training features."""
    return bool(settings(config.eval).get("precache_flip"))


def evaluate(config, data: api.EvalData) -> dict:
    """The probe's {'top1', 'train_top1'}; InputError naming config.eval.linear_protocol for an
    augmented recipe given features only (no `data.source` to stream images from)."""
    ev, train, test = config.eval, data.train, data.test
    protocol = settings(ev)
    if protocol.get("precache_flip"):
        protocol["flip_feats"] = train.flip_feats
    if not protocol.get("augment"):
        return linear.linear_probe(train.feats, train.labels, test.feats, test.labels,
                                   train.num_classes, seed=config.seed, **protocol)
    if data.source is None:
        raise InputError(f"config.eval.linear_protocol={ev.linear_protocol!r} trains on "
                         f"augmented images: score it with runner.score, not features.")
    src = data.source
    return augmented_linear.probe_for_score(config, src.encoder.encode, src.encoder.variables,
                                            src.train, train, test, protocol, src.mesh,
                                            src.workdir, src.tag)


def columns(result: dict) -> dict:
    return {"linear top-1": 100 * result["top1"]}


def check(config, train: api.EvalSplit, test: api.EvalSplit) -> None:
    """A known recipe, linear_epochs and linear_batch_size >= 0, >= 2 training classes, and an
    augmented recipe's batch, checkpoint interval and source (`augmented_linear`)."""
    del test
    ev = config.eval
    if ev.linear_protocol not in linear.PROTOCOLS:
        raise InputError(f"config.eval.linear_protocol={ev.linear_protocol!r}; expected one of "
                         f"{sorted(linear.PROTOCOLS)}.")
    for name in ("linear_epochs", "linear_batch_size"):
        if int(getattr(ev, name, 0) or 0) < 0:
            raise InputError(f"config.eval.{name}={ev[name]}; expected 0 (the protocol's) or a "
                             f"positive number.")
    classes = train.num_classes
    if train.labels is not None:
        classes = len(np.unique(train.labels))
    if classes and classes < 2:
        raise InputError(f"config.eval.protocols includes 'linear': a linear probe needs at "
                         f"least 2 classes; {train.where} has {classes}.")
    if linear.PROTOCOLS[ev.linear_protocol].get("augment"):  # trained on images: batch, source
        augmented_linear.check_probe_config(config, train.num_examples)


PROTOCOL = api.Protocol(NAME, evaluate, columns, check, flip=flip)
