"""Few-shot episodes on frozen features with a cosine prototypical classifier.

Classifier (OBoW `obow/fewshot.py:few_shot_classifier_with_prototypes`): L2-normalise the support
features, average them per class, L2-normalise the prototypes, L2-normalise the queries, and score
with 10 · cosine. Protocols:
* BoWNet CIFAR-100 (§4.1.2): 20 classes of the test set, 2000 episodes of 5-way n-shot
  (n ∈ {1, 5, 10, 50}) with 15 queries per class. The paper does not list the 20 classes: pass
  the features and labels of the chosen classes only.
* OBoW ImageNet: 200 episodes of 50-way {1, 5}-shot, 1 query per class, on the novel classes of
  the low-shot benchmark.
Episodes are drawn once with numpy from a fixed seed, so they are identical across runs and
models. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.lib.ops import l2_normalize


def sample_episodes(labels, n_way: int, n_shot: int, n_query: int, n_episodes: int,
                    seed: int = 0):
    """Fixed-seed episodes over the classes present in `labels` [N].

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
    classes, counts = np.unique(labels, return_counts=True)
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
                     seed: int = 0, scale: float = 10.0, chunk: int = 256) -> dict[str, float]:
    """Mean episode accuracy and its 95% confidence interval, 1.96·std/√E with the population
    std (ddof=0, numpy's default, as common few-shot code computes it)."""
    feats = jnp.asarray(feats, jnp.float32)
    if feats.ndim != 2 or feats.shape[0] != np.shape(labels)[0]:
        raise ValueError(f"feats must be [N, D] with N = len(labels) = {np.shape(labels)[0]}; "
                         f"got {feats.shape}.")
    support_idx, query_idx, query_labels = sample_episodes(labels, n_way, n_shot, n_query,
                                                           n_episodes, seed)
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
