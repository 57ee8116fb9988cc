"""Linear probe on precached frozen features (OBoW `main_linear_classification.py`, BoWNet §4.1.2).

Head: optional BatchNorm without affine (PyTorch `BatchNorm1d(affine=False)` numerics,
`models.norm.BatchNorm`) and a Dense layer with weights N(0, 0.01) and zero bias. Training is SGD with momentum and PyTorch-style weight
decay on every parameter, with a per-epoch learning-rate schedule ('step' or 'cosine'). The
features live on one device and an epoch is one compiled `lax.scan`, so a probe on precached
features takes seconds to minutes even for ImageNet: the head is far too small to be worth
sharding. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bow_jax.lib import schedules, writers
from bow_jax.models.norm import BatchNorm

# The papers' probe recipes. 'precache_flip' marks protocols whose training set is precached as
# centre + horizontal-flip views (pass `flip_feats`).
PROTOCOLS: dict[str, dict[str, Any]] = {
    # BoWNet §4.1.2 (CIFAR-100 / MiniImageNet): SGD, 60 epochs, lr 0.1 ×0.3 every 10 epochs,
    # wd 1e-3. The paper states neither the probe's batch size nor its momentum: 128 is the batch
    # of its CIFAR pre-training (§4.1.1), momentum 0.9 that of all its other SGD runs.
    "cifar_bownet": dict(epochs=60, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-3,
                         schedule="step", milestones=(10, 20, 30, 40, 50), decay_factor=0.3,
                         batch_norm=False, precache_flip=False),
    # OBoW README, ImageNet ResNet-50: -b 1024 --lr 10 --wd 0 --epochs 100 --cos-schedule, on
    # online-augmented images (RandomResizedCrop(224) + flip each epoch; 'augment': trained by
    # `evaluate.augmented_linear`, not on precached features).
    "imagenet_r50_obow": dict(epochs=100, batch_size=1024, lr=10.0, momentum=0.9,
                              weight_decay=0.0, schedule="cosine", milestones=(),
                              decay_factor=0.1, batch_norm=False, precache_flip=False,
                              augment=True, crop=224),
    # OBoW README, ImageNet ResNet-18 (ImageNet20 configs): -b 256 --lr 10 --wd 2e-6 --epochs 50
    # --schedule 15 30 45 --precache (centre + flip views, one picked at random per sample).
    "imagenet_r18_obow": dict(epochs=50, batch_size=256, lr=10.0, momentum=0.9,
                              weight_decay=2e-6, schedule="step", milestones=(15, 30, 45),
                              decay_factor=0.1, batch_norm=False, precache_flip=True),
    # OBoW README, Places205 ResNet-50: --batch-norm -b 256 --lr 0.01 --wd 1e-5 --epochs 28
    # --schedule 10 20 (the run name says "wd1e4"; the flag passed is 1e-5).
    "places205": dict(epochs=28, batch_size=256, lr=0.01, momentum=0.9, weight_decay=1e-5,
                      schedule="step", milestones=(10, 20), decay_factor=0.1, batch_norm=True,
                      precache_flip=False),
    # Standardised multinomial logistic regression (features scaled to zero mean, unit variance
    # with the training split's statistics; L2 penalty 1/(2C)·|W|² + Σ cross-entropy, as
    # scikit-learn's LogisticRegression(C)), solved to convergence by L-BFGS: a probe with no
    # schedule to tune, for small CPU-sized runs.
    "logistic_standardized": dict(solver="lbfgs", C=1.0, max_iter=500, tol=1e-6),
}


class LinearHead(nn.Module):
    """[BatchNorm (no affine)] -> Dense(num_classes), weights N(0, 0.01), bias 0."""
    num_classes: int
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        if self.batch_norm:
            # BatchNorm1d(affine=False) with PyTorch numerics (unbiased running variance).
            x = BatchNorm(use_scale=False, use_bias=False, name="bn")(
                x, use_running_average=not train, mask=mask)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                        bias_init=nn.initializers.zeros, name="fc")(x)


def epoch_learning_rate(epoch: int, *, lr: float, epochs: int, schedule: str,
                        milestones: Sequence[int] = (), decay_factor: float = 0.1) -> float:
    """The probe's learning rate during epoch `epoch` (0-based), set once per epoch as OBoW's
    solver does: 'step' = lr·decay^#(milestones <= epoch),
    'cosine' = lr·½(1 + cos(π·epoch/epochs)) (towards 0, never reached).
    The formulas live in `bow_jax.lib.schedules`."""
    if schedule == "step":
        return float(schedules.step_lr(lr, milestones, decay_factor, 1)(epoch))
    if schedule == "cosine":
        return float(schedules.warmup_cosine_per_epoch(lr, 0.0, epochs, 0, 1)(epoch))
    raise ValueError(f"schedule={schedule!r}; expected 'step' or 'cosine'.")


def _check_features(feats, labels, name: str):
    feats = jnp.asarray(feats, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be [N, D]; got shape {feats.shape}.")
    if labels.shape != feats.shape[:1]:
        raise ValueError(f"labels for {name} must be [{feats.shape[0]}]; got {labels.shape}.")
    return feats, labels


def _epoch_batches(key, n: int, batch_size: int):
    """A fresh permutation cut into [steps, batch] indices; the last batch is padded and masked
    (PyTorch's DataLoader keeps the last, smaller batch)."""
    steps = -(-n // batch_size)
    order = jax.random.permutation(key, n)
    order = jnp.pad(order, (0, steps * batch_size - n)).reshape(steps, batch_size)
    valid = (jnp.arange(steps * batch_size) < n).reshape(steps, batch_size)
    return order, valid


@functools.partial(jax.jit, static_argnames=("num_classes", "batch_norm", "batch_size",
                                             "momentum", "nesterov", "weight_decay"))
def _train_epoch(state, key, lr, feats, flip_feats, labels, *, num_classes: int, batch_norm: bool,
                 batch_size: int, momentum: float, nesterov: bool, weight_decay: float):
    """One epoch at learning rate `lr`: shuffle, then scan the SGD steps.

    Returns (state, (mean loss, running train top-1)). Compiled once per shape and setting; the
    learning rate is an argument, so all epochs of a run (and runs alike) share the compile.
    """
    model = LinearHead(num_classes, batch_norm)
    tx = schedules.torch_sgd(lr, momentum=momentum, nesterov=nesterov,
                             weight_decay=weight_decay)
    n = feats.shape[0]
    order_key, view_key = jax.random.split(key)
    order, valid = _epoch_batches(order_key, n, batch_size)
    # OBoW's precache protocol: each sample shows its centre or its flipped view, at random.
    use_flip = (jax.random.bernoulli(view_key, 0.5, (n,)) if flip_feats is not None
                else None)

    def step(state, batch):
        params, batch_stats, opt_state = state
        idx, mask = batch
        x = feats[idx]
        if use_flip is not None:
            x = jnp.where(use_flip[idx][:, None], flip_feats[idx], x)
        y = labels[idx]

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                          train=True, mask=mask, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(ce * mask) / jnp.sum(mask), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
        return (params, batch_stats, opt_state), (loss * jnp.sum(mask), correct)

    state, (loss_sums, correct) = jax.lax.scan(step, state, (order, valid))
    return state, (loss_sums.sum() / n, correct.sum() / n)


def train_linear_probe(train_feats, train_labels, num_classes: int, *, epochs: int,
                       batch_size: int, lr: float, momentum: float = 0.9,
                       weight_decay: float = 0.0, schedule: str = "step",
                       milestones: Sequence[int] = (), decay_factor: float = 0.1,
                       batch_norm: bool = False, nesterov: bool = False, seed: int = 0,
                       flip_feats=None, precache_flip: bool = False, augment: bool = False,
                       crop: int = 0):
    """Train the linear head on precached features [N, D] with integer labels [N].

    Returns `(variables, history)`: `variables` = {'params', ['batch_stats']} of `LinearHead`
    (enough for `evaluate_linear_probe`), `history` = per-epoch lists 'loss', 'top1' (train mode,
    running over the epoch, as the reference logs it) and 'lr'. Deterministic per `seed`: the
    head's init and each epoch's shuffle come from `jax.random.key(seed)`, folded with the epoch.
    With `flip_feats` ([N, D], features of the flipped images) every sample uses its centre or
    flipped feature at random each epoch; `precache_flip=True` (set by the protocol presets)
    demands them. `augment=True` (with its view side `crop`) marks protocols trained on augmented
    images, not features: a ValueError here (`evaluate.augmented_linear` trains them).
    """
    if augment:
        raise ValueError(f"This protocol trains on augmented {crop}x{crop} images, not on "
                         f"precached features: use evaluate.augmented_linear.")
    feats, labels = _check_features(train_feats, train_labels, "train_feats")
    if flip_feats is not None:
        flip_feats = jnp.asarray(flip_feats, jnp.float32)
        if flip_feats.shape != feats.shape:
            raise ValueError(f"flip_feats must match train_feats {feats.shape}; "
                             f"got {flip_feats.shape}.")
    elif precache_flip:
        raise ValueError("This protocol trains on centre + flip views (precache_flip=True): pass "
                         "flip_feats, e.g. from extract_features(..., flip=True).")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}.")
    if num_classes < 2 or int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ValueError(f"train_labels must lie in [0, num_classes={num_classes}).")

    model = LinearHead(num_classes, batch_norm)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    variables = model.init(init_key, feats[:1], train=False)
    # The optimizer state's structure does not depend on the learning rate.
    opt_state = schedules.torch_sgd(0.0, momentum=momentum, nesterov=nesterov,
                                    weight_decay=weight_decay).init(variables["params"])
    state = (variables["params"], variables.get("batch_stats", {}), opt_state)

    settings = dict(num_classes=num_classes, batch_norm=batch_norm, batch_size=batch_size,
                    momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    history = {"loss": [], "top1": [], "lr": []}
    for epoch in writers.progress(range(epochs), desc="linear probe", unit="epoch"):
        epoch_lr = epoch_learning_rate(epoch, lr=lr, epochs=epochs, schedule=schedule,
                                       milestones=milestones, decay_factor=decay_factor)
        state, (loss, top1) = _train_epoch(state, jax.random.fold_in(data_key, epoch),
                                           jnp.float32(epoch_lr), feats, flip_feats, labels,
                                           **settings)
        history["loss"].append(float(loss))
        history["top1"].append(float(top1))
        history["lr"].append(epoch_lr)
    params, batch_stats, _ = state
    variables = {"params": params}
    if batch_norm:
        variables["batch_stats"] = batch_stats
    return variables, history


@functools.partial(jax.jit, static_argnames=("batch_norm", "chunk"))
def _predict(variables, feats, *, batch_norm: bool, chunk: int):
    num_classes = variables["params"]["fc"]["bias"].shape[0]
    model = LinearHead(num_classes, batch_norm)
    # Chunks bound the [N, classes] logits memory; only the argmax leaves the chunk.
    # lax.map vmaps over the rows of a chunk: each row goes through the head as a batch of one.
    return jax.lax.map(lambda x: jnp.argmax(model.apply(variables, x[None], train=False)[0], -1),
                       feats, batch_size=chunk)


def evaluate_linear_probe(variables, feats, labels, chunk: int = 4096) -> float:
    """Top-1 accuracy of a trained head (eval mode: BatchNorm uses running statistics)."""
    feats, labels = _check_features(feats, labels, "feats")
    preds = _predict(variables, feats, batch_norm="batch_stats" in variables,
                     chunk=min(chunk, feats.shape[0]))
    return float(jnp.mean(preds == labels))


def standardize(train_feats, *others, eps: float = 1e-12):
    """Features scaled by the training split's per-dimension mean and (biased) std, as
    scikit-learn's StandardScaler; a constant dimension is only centred. Returns the list
    [train, *others] of float32 arrays."""
    train_feats = jnp.asarray(train_feats, jnp.float32)
    mean, std = train_feats.mean(0), train_feats.std(0)
    std = jnp.where(std > eps, std, 1.0)
    return [(jnp.asarray(x, jnp.float32) - mean) / std for x in (train_feats, *others)]


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def fit_logistic_regression(feats, labels, *, num_classes: int, C: float, max_iter: int, tol: float):
    """argmin over (W, b) of 1/(2C N)·|W|² + mean cross-entropy (scikit-learn's objective / N),
    by L-BFGS with a zoom line search, until the gradient norm is below `tol` or `max_iter`."""
    n, dim = feats.shape
    params = {"w": jnp.zeros((dim, num_classes)), "b": jnp.zeros((num_classes,))}

    def objective(p):
        logits = feats @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + 0.5 / (C * n) * jnp.sum(jnp.square(p["w"]))

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        p, state, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = solver.update(grad, state, p, value=value, grad=grad,
                                       value_fn=objective)
        return optax.apply_updates(p, updates), state, optax.tree.norm(grad)

    def more(carry):
        return (optax.tree.get(carry[1], "count") < max_iter) & (carry[2] > tol)

    params, _, _ = jax.lax.while_loop(more, step, (params, solver.init(params), jnp.inf))
    return params


def logistic_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int, *,
                   C: float = 1.0, max_iter: int = 500, tol: float = 1e-6,
                   solver: str = "lbfgs") -> dict[str, float]:
    """The 'logistic_standardized' protocol: standardise with the training statistics, fit the
    L2-regularised multinomial logistic regression, report dict(top1, train_top1) (fractions)."""
    if solver != "lbfgs":
        raise ValueError(f"solver={solver!r}; the logistic probe is solved by 'lbfgs'.")
    train_x, train_y = _check_features(train_feats, train_labels, "train_feats")
    test_x, test_y = _check_features(test_feats, test_labels, "test_feats")
    train_x, test_x = standardize(train_x, test_x)
    p = fit_logistic_regression(train_x, train_y, num_classes=num_classes, C=float(C),
                      max_iter=int(max_iter), tol=float(tol))

    def top1(x, y):
        return float(jnp.mean(jnp.argmax(x @ p["w"] + p["b"], -1) == y))
    return dict(top1=top1(test_x, test_y), train_top1=top1(train_x, train_y))


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                 **cfg) -> dict[str, float]:
    """Train on (train_feats, train_labels), report dict(top1=test top-1, train_top1=top-1 of the
    final head on the (centre) training features, eval mode). `cfg`: `train_linear_probe`'s
    keyword arguments, e.g. `**PROTOCOLS['places205']` (plus `flip_feats=` where needed), or
    a protocol with `solver='lbfgs'` (`logistic_probe`; a `seed` is ignored there)."""
    if cfg.get("solver") == "lbfgs":
        cfg.pop("seed", None)  # deterministic: solved to convergence from zero weights
        return logistic_probe(train_feats, train_labels, test_feats, test_labels, num_classes,
                              **cfg)
    variables, _ = train_linear_probe(train_feats, train_labels, num_classes, **cfg)
    return dict(top1=evaluate_linear_probe(variables, test_feats, test_labels),
                train_top1=evaluate_linear_probe(variables, train_feats, train_labels))
