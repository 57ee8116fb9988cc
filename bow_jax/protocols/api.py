"""The one interface of the evaluation protocols (config.eval.protocols; `registry.PROTOCOLS`).

A protocol scores an *encoder*, `encode(variables, uint8 [B, H, W, 3]) -> float32 [B, D]` with its
`variables` (a training state, a backbone's variables, a torchvision file's), never a `Method`:
`runner.score` extracts the encoder's features of the training and test splits once, streamed and
cached (`cache.split_features`), and hands every chosen protocol the same `EvalData`. Each
protocol is one module holding one `Protocol` (`PROTOCOL = api.Protocol(...)`):

    name      its key in config.eval.protocols, in results.json, and in `registry.PROTOCOLS`
    evaluate  (config, EvalData) -> a JSON-able dict, written under `name`
    columns   (that dict) -> {table column: value in %}: its columns of results.md
    check     (config, train EvalSplit, test EvalSplit) -> None before any training; InputError
              naming the config.eval field the data cannot satisfy
    labels    CLASS (int [N], one class per image) or MULTILABEL (int8 [N, C] in {-1, 0, 1}:
              Pascal VOC07's targets); `checks` refuses data of the other kind
    flip      (config) -> whether it reads `EvalData.train.flip_feats` (extracted only then)

big_vision's `evaluators/` is the model: one module per evaluator, one constructor api.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from bow_jax.data import eval_input
from bow_jax.protocols import cache

CLASS = "class"            # labels int [N] in [0, num_classes)
MULTILABEL = "multilabel"  # targets int8 [N, C]: 1 present, -1 difficult only, 0 absent


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A network as the protocols see it: `encode(variables, uint8 [B, H, W, 3]) -> float32
    [B, D]`, eval mode, each image independent of the others in its batch; `variables` its
    argument (a pytree; None: `encode(images)` alone)."""
    encode: Callable
    variables: Any = None


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """A split as the evaluation will see it, known before any image is decoded: `num_examples`
    and `labels` (int [num_examples], multi-label targets [num_examples, C], or None when only
    reading the examples would tell, as for TFDS) after the limits; `num_classes` of the
    source's class index; `where` names the data and the limits applied, for messages;
    `multilabel` whether its labels are multi-label targets."""
    num_examples: int
    labels: Optional[np.ndarray]
    num_classes: int
    where: str
    multilabel: bool = False


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the features came from, for a protocol that reads images itself (the augmented
    linear probe): the `encoder`, the streamed training split `train`, the device `mesh`, and the
    cache's `workdir` (None: nothing written) and `tag` (e.g. 'step_1000')."""
    encoder: Encoder
    train: eval_input.EvalInput
    mesh: Any = None
    workdir: Optional[str] = None
    tag: str = ""


@dataclasses.dataclass(frozen=True)
class EvalData:
    """What every protocol of one network reads: the encoder's features of the training split
    (`train.feats` float32 [N, D], `train.labels`; `train.flip_feats` when a chosen protocol has
    `flip`) and of the test split; `source` (None when only features were given,
    `runner.score_features`)."""
    train: cache.SplitFeatures
    test: cache.SplitFeatures
    source: Optional[Source] = None


def never(config) -> bool:
    """A protocol's `flip` when it never reads the flipped training features."""
    del config
    return False


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One evaluation protocol (see the module docstring for each field's contract)."""
    name: str
    evaluate: Callable[[Any, EvalData], dict]
    columns: Callable[[dict], dict]
    check: Callable[[Any, EvalSplit, EvalSplit], None]
    labels: str = CLASS
    flip: Callable[[Any], bool] = never
