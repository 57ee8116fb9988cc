"""Protocol 'knn': weighted k-NN (`knn.knn_accuracy`: cosine, exp(s / 0.07) votes, k =
config.eval.knn_k), the training features as memory, the test features as queries.
Result: {'top1'} (a fraction); column 'k-NN top-1'. The training monitor
(`monitor.KnnMonitor`) scores its fixed subsets with the same `top1`.
"""
from __future__ import annotations

from bow_jax.lib.errors import InputError
from bow_jax.protocols import cache, api, knn

NAME = "knn"


def top1(memory: cache.SplitFeatures, queries: cache.SplitFeatures, k: int) -> float:
    """Top-1 accuracy (fraction) of the weighted k-NN of `queries` among `memory` (features
    float32 [N, D], labels int32 [N] in [0, memory.num_classes)); ValueError unless
    1 <= k <= len(memory)."""
    return knn.knn_accuracy(memory.feats, memory.labels, queries.feats, queries.labels,
                            memory.num_classes, k=k)


def evaluate(config, data: api.EvalData) -> dict:
    return {"top1": top1(data.train, data.test, int(config.eval.knn_k))}


def columns(result: dict) -> dict:
    return {"k-NN top-1": 100 * result["top1"]}


def check(config, train: api.EvalSplit, test: api.EvalSplit) -> None:
    """config.eval.knn_k in [1, training (memory) examples]."""
    del test
    k = int(config.eval.knn_k)
    if not 1 <= k <= train.num_examples:
        raise InputError(f"config.eval.knn_k={k}: k-NN with k={k} needs k in [1, number of "
                         f"training (memory) examples]; {train.where} has "
                         f"{train.num_examples}.")


PROTOCOL = api.Protocol(NAME, evaluate, columns, check)
