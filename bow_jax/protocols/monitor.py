"""The k-NN monitor: representation quality watched while training runs, for every method.

Every `config.eval.every_steps` steps (and at the last step) the training loop calls a
`KnnMonitor` on the current state: the features of the encoder (`api.Encoder`:
`method.encode` with the state as its variables, `config.eval.feature`) of a fixed memory (the
first `config.eval.monitor_memory` training images) and of fixed queries (the first
`config.eval.monitor_queries` test images), both with the evaluation transform (ImageNet: Resize
256 + CenterCrop 224), scored by the k-NN protocol (`knn_protocol.top1`, k = `config.eval.knn_k`,
cosine, exp(s / 0.07) votes; Wu et al. 2018). The result, top-1 as a
fraction, is logged as `knn_top1` with the step's metrics (stdout, metrics.jsonl, TensorBoard).

Both subsets are fixed for the whole run, so the curve compares like with like. TFDS ImageNet's
training files are shuffled when the dataset is prepared, so its first images are a sample of all
classes. The features are streamed through the one compiled extractor (`evaluate.features`),
which compiles once per run, never cached on disk and never hold more than the two subsets'
features on the host. Cost per call: one forward pass of memory + queries images (eval mode), plus
a [queries x memory] similarity; README "Monitors" gives measured figures.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from bow_jax.data import eval_input
from bow_jax.protocols import cache, api, knn_protocol
from bow_jax.lib import sharding
from bow_jax.lib.errors import InputError


@dataclasses.dataclass
class KnnMonitor:
    """`monitor(state) -> {'knn_top1': fraction}` on fixed memory / query subsets.

    `encode(variables, uint8 [B,H,W,3]) -> float32 [B, D]` (a method's `encode`); `every` > 0
    steps between calls; `batch_size` the global batch of the feature passes (a multiple of the
    device count)."""
    encode: Callable
    memory: eval_input.EvalInput
    queries: eval_input.EvalInput
    every: int
    k: int
    batch_size: int
    mesh: object = None

    def due(self, step: int, total_steps: int) -> bool:
        """Whether step `step` (1-based count of steps done) is a monitor step."""
        return step % self.every == 0 or step == total_steps

    def __call__(self, state) -> dict:
        """{'knn_top1': top-1 fraction} of the encoder with `state` as its variables (the
        k-NN protocol's `knn_protocol.top1`, k capped at the memory's size)."""
        encoder = api.Encoder(self.encode, state)
        memory = self._features(encoder, self.memory)
        queries = self._features(encoder, self.queries)
        return {"knn_top1": knn_protocol.top1(memory, queries, min(self.k, len(memory)))}

    def _features(self, encoder: api.Encoder, inp) -> cache.SplitFeatures:
        return cache.split_features(encoder.encode, inp, self.batch_size, self.mesh,
                                    variables=encoder.variables)


def _first(inp: eval_input.EvalInput, count: int) -> eval_input.EvalInput:
    return dataclasses.replace(inp, num_examples=min(inp.num_examples, count))


def check_monitor(config) -> None:
    """ValueError naming the config.eval field when the monitor's settings cannot work: a
    negative interval, empty subsets, more neighbours than memory images, a feature batch that
    does not divide over the devices. Cheap: run before any compile."""
    ev = config.eval
    if int(ev.every_steps) < 0:
        raise InputError(f"config.eval.every_steps={ev.every_steps}; expected >= 0 "
                         "(0: no monitor).")
    if not int(ev.every_steps):
        return
    for field in ("monitor_memory", "monitor_queries"):
        if int(ev[field]) <= 0:
            raise InputError(f"config.eval.{field}={ev[field]}; expected a number of images > 0.")
    if not 1 <= int(ev.knn_k) <= int(ev.monitor_memory):
        raise InputError(f"config.eval.knn_k={ev.knn_k}; the k-NN monitor needs 1 <= knn_k <= "
                         f"config.eval.monitor_memory={ev.monitor_memory}.")
    sharding.check_divisible(int(ev.batch_size), jax.device_count(), "config.eval.batch_size",
                             "the number of devices")


def knn_monitor(config, encode: Callable, mesh, train_data=None):
    """The run's `KnnMonitor`, or None when `config.eval.every_steps` is 0.

    `train_data`: the training split already in memory (an `ArrayDataset`), reused as the memory;
    otherwise the split is streamed like the evaluation's (`eval_input.evaluation_input`).
    ValueError naming the field for settings that cannot work (`check_monitor`)."""
    check_monitor(config)
    ev = config.eval
    every = int(ev.every_steps)
    if not every:
        return None
    memory = eval_input.evaluation_input(config, "train", in_memory_data=train_data)
    queries = eval_input.evaluation_input(config, "test")
    return KnnMonitor(encode, _first(memory, int(ev.monitor_memory)),
                      _first(queries, int(ev.monitor_queries)),
                      every, int(ev.knn_k), int(ev.batch_size), mesh)
