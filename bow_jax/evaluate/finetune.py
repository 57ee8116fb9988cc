"""Semi-supervised fine-tuning on 1% / 10% of the labels (OBoW `main_semisupervised.py`).

The whole network is trained (BatchNorm in train mode, batch statistics of the global batch, i.e.
SyncBN) with a linear head without BatchNorm on the pooled feature (weights N(0, 0.01), bias 0).
SGD with momentum 0.9, no weight decay and two learning rates: 2e-4 for the pre-trained trunk and
0.5 for the new head (`optax.multi_transform`), both x0.2 at the recipe's epochs (1%: 40 epochs,
milestones 24 and 32; 10%: 20 epochs, 12 and 16), batch 256. Training views are RandomResizedCrop
+ horizontal flip, made on the device; the test split is scored top-1 with the eval-mode network.

The labelled subset is given by a file (SimCLR's `1percent.txt` holds one image file name per
line; here a line is an integer index into the training split, or a file name of an image-folder
dataset) or drawn with a seed: a class-balanced random `percent` of every class.

Data are in memory (`ArrayDataset`): the subset lives on every device and only the batch indices
cross from the host each step, as in `train.py`; the step is one jitted, donated function over the
'data' mesh. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bow_jax.lib import logs
from bow_jax.data import augment, datasets, pipeline
from bow_jax.evaluate import features
from bow_jax.lib import schedules, sharding
from bow_jax.lib.state import TrainState
from bow_jax.models import check_feature_names, feature_dims, heads

# The README's two recipes; the other hyper-parameters are shared (`default_config`).
PRESETS = {
    "1percent": dict(percent=1.0, epochs=40, milestones=(24, 32)),
    "10percent": dict(percent=10.0, epochs=20, milestones=(12, 16)),
}
TRUNK, HEAD = "trunk", "head"


def recipe(cfg) -> dict:
    """`cfg` (config.finetune) with the preset filled in: percent, epochs, milestones, ..."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"config.finetune.preset={cfg.preset!r}; expected one of "
                         f"{sorted(PRESETS)}.")
    preset = PRESETS[cfg.preset]
    epochs = cfg.epochs or preset["epochs"]
    milestones = tuple(cfg.milestones) or tuple(
        max(1, round(m * epochs / preset["epochs"])) for m in preset["milestones"])
    out = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    out.update(percent=cfg.percent or preset["percent"], epochs=epochs, milestones=milestones)
    if not 0 < out["percent"] <= 100:
        raise ValueError(f"config.finetune.percent={out['percent']}; expected (0, 100].")
    return out


# ------------------------------------------------------------------------------------------------
# The labelled subset.


def balanced_subset(labels: np.ndarray, percent: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced random subset: round(percent% of each class), >= 1.

    Deterministic for (labels, percent, seed); every class keeps at least one example.
    """
    labels = np.asarray(labels)
    if not 0 < percent <= 100:
        raise ValueError(f"percent={percent}; expected a percentage in (0, 100].")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = max(1, int(round(len(members) * percent / 100.0)))
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def read_subset_file(path, num_examples: int,
                     filenames: Optional[Sequence[str]] = None) -> np.ndarray:
    """Indices listed in `path`: one integer index per line, or (with `filenames`, the dataset's
    'class/file' names) one file name per line, bare as in SimCLR's 1percent.txt or 'class/file'.

    Blank lines are skipped; an unknown name, an index outside [0, num_examples) or a repeated
    entry is a ValueError naming the line.
    """
    lines = [(i + 1, line.strip()) for i, line in
             enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines())]
    lines = [(n, s) for n, s in lines if s]
    if not lines:
        raise ValueError(f"config.finetune.subset_file={path}: the file lists no examples.")
    by_name = {}
    if filenames is not None:
        for i, name in enumerate(filenames):
            by_name[name] = i
            by_name.setdefault(name.rsplit("/", 1)[-1], i)
    indices = []
    for number, entry in lines:
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if not 0 <= index < num_examples:
                raise ValueError(f"{path}:{number}: index {index} is outside the training split "
                                 f"[0, {num_examples}).")
        elif entry in by_name:
            index = by_name[entry]
        else:
            what = ("not a file of the image folder" if filenames is not None else
                    "not an integer index (file names need an image-folder dataset)")
            raise ValueError(f"{path}:{number}: {entry!r} is {what}.")
        indices.append(index)
    indices = np.asarray(indices, np.int64)
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"{path}: some examples are listed twice.")
    return indices


def labelled_subset(labels: np.ndarray, *, percent: float = 1.0, seed: int = 0,
                    subset_file: str = "",
                    filenames: Optional[Sequence[str]] = None) -> np.ndarray:
    """The labelled training examples: those of `subset_file` if given, else a class-balanced
    `percent` drawn with `seed` (`balanced_subset`)."""
    if subset_file:
        return read_subset_file(subset_file, len(labels), filenames)
    return balanced_subset(labels, percent, seed)


# ------------------------------------------------------------------------------------------------
# Network, optimizer, step.


class FinetuneNet(nn.Module):
    """Backbone + linear head (no BatchNorm) on one named backbone output. Params:
    {'backbone': ..., 'head': ...}."""
    backbone: nn.Module
    num_classes: int
    feature: str = "pooled"

    @nn.compact
    def __call__(self, x, train: bool):
        outputs = self.backbone(x, train=train)
        if self.feature not in outputs:
            raise ValueError(f"config.finetune.feature={self.feature!r} is not a backbone output; "
                             f"available: {sorted(outputs)}.")
        return heads.LinearClassifier(self.num_classes, batch_norm=False,
                                      name="head")(outputs[self.feature])


def param_groups(params) -> Any:
    """'head' for the head's parameters, 'trunk' for everything else (a tree like `params`)."""
    return {name: jax.tree.map(lambda _, g=(HEAD if name == "head" else TRUNK): g, sub)
            for name, sub in params.items()}


def finetune_optimizer(lr_trunk, lr_head, momentum: float = 0.9,
                       weight_decay: float = 0.0) -> optax.GradientTransformation:
    """PyTorch SGD with two parameter groups: weight decay added to the gradient, momentum, then
    the group's learning rate (a float or a schedule of the step)."""
    def sgd(lr):
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(lr, momentum=momentum))

    return optax.multi_transform({TRUNK: sgd(lr_trunk), HEAD: sgd(lr_head)}, param_groups)


def finetune_update(model: nn.Module, tx, state: TrainState, inputs, labels):
    """One SGD step on normalised inputs [B, H, W, 3] -> (state, metrics). BN in train mode."""
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                      inputs, train=True, mutable=["batch_stats"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
        return loss, (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return state.apply_gradients(grads, tx, batch_stats=batch_stats), metrics


def train_views(key, images, crop_size: int, scale: Sequence[float], flip: bool):
    """RandomResizedCrop(crop_size, scale) + horizontal flip of uint8 [B, H, W, 3] -> uint8."""
    def one(k, image):
        crop_key, flip_key = jax.random.split(k)
        view = augment.random_resized_crop(crop_key, image, crop_size, scale=tuple(scale))
        view = augment.to_uint8(view)  # as PIL hands torch a uint8
        return augment.random_flip(flip_key, view) if flip else view

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def eval_views(images, crop_size: int):
    """Test images at the training resolution: unchanged when they already are, otherwise
    Resize(shorter side) + CenterCrop(crop_size)."""
    if images.shape[1:3] == (crop_size, crop_size):
        return images

    def one(image):
        return augment.center_crop(augment.to_uint8(augment.resize(image, crop_size)), crop_size)

    return jax.vmap(one)(images)


def _network_input(images_uint8, mean, std):
    return augment.normalize(augment.to_float(images_uint8), mean, std)


# ------------------------------------------------------------------------------------------------
# The whole fine-tuning run.


def accuracy(model, variables, images, labels, *, crop_size, mean, std, batch_size, mesh):
    """Top-1 accuracy of the eval-mode network on uint8 images."""
    def logits(v, x):
        return model.apply(v, _network_input(eval_views(x, crop_size), mean, std), train=False)

    out = features.extract_features(logits, images, batch_size, mesh, variables=variables)
    return float(np.mean(np.argmax(out, -1) == np.asarray(labels)))


def labelled_split(train: datasets.ArrayDataset, r: dict, subset) -> datasets.ArrayDataset:
    """The labelled subset of `train` (indices `subset`, else drawn as `r` says), checked against
    the recipe's batch size. ValueError names the config.finetune field."""
    if subset is None:
        subset = labelled_subset(train.labels, percent=r["percent"], seed=r["subset_seed"],
                                 subset_file=r["subset_file"])
    labelled = train.subset(subset)
    sharding.check_divisible(r["batch_size"], jax.device_count(), "config.finetune.batch_size",
                             "the number of devices")
    if len(labelled) < r["batch_size"]:
        raise ValueError(f"config.finetune.batch_size={r['batch_size']} is larger than the "
                         f"{len(labelled)} labelled examples; lower it.")
    return labelled


def initial_finetune_state(backbone, variables, num_classes: int, r: dict, crop: int, tx, key):
    """The pre-trained backbone's variables plus a new linear head (no BatchNorm; only the head
    is initialised, its input width from shapes alone)."""
    dims = feature_dims(backbone, (1, crop, crop, 3))
    check_feature_names([r["feature"]], dims, "config.finetune.feature")
    head = heads.LinearClassifier(num_classes, batch_norm=False)
    head_params = head.init(jax.random.fold_in(key, 0),
                            jnp.zeros((1, dims[r["feature"]][-1])))["params"]
    params = {"backbone": variables["params"], "head": head_params}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats={"backbone": variables["batch_stats"]},
                      opt_state=tx.init(params), rng=jax.random.fold_in(key, 1))


def finetune(backbone: nn.Module, variables, train: datasets.ArrayDataset,
             test: datasets.ArrayDataset, cfg, mean, std, *, seed: int = 0,
             subset: Optional[np.ndarray] = None, mesh=None,
             log: Callable[[str], None] = logs.say) -> dict:
    """Fine-tunes `backbone` (its `variables`) on the labelled subset of `train`; scores `test`.

    cfg: config.finetune (defaults in bow_jax/tasks/finetune.py); subset: indices into `train`
    (default: from cfg.subset_file / cfg.percent + cfg.subset_seed). Returns {'top1',
    'num_labelled', 'percent', 'epochs', 'milestones', 'history': [[epoch, top1], ...]}.
    """
    r = recipe(cfg)
    mesh = sharding.make_mesh() if mesh is None else mesh
    labelled = labelled_split(train, r, subset)
    steps_per_epoch = pipeline.steps_per_epoch(len(labelled), r["batch_size"])
    crop = r["crop_size"] or train.image_shape[0]
    model = FinetuneNet(backbone, train.num_classes, r["feature"])
    lr = {name: schedules.step_lr(r[f"lr_{name}"], r["milestones"], r["decay"], steps_per_epoch)
          for name in (TRUNK, HEAD)}
    tx = finetune_optimizer(lr[TRUNK], lr[HEAD], r["momentum"], r["weight_decay"])
    replicated = sharding.replicated(mesh)
    state = jax.device_put(initial_finetune_state(backbone, variables, train.num_classes, r, crop,
                                                  tx, jax.random.key(seed)), replicated)

    def step_fn(state, images, labels, index):
        views = train_views(state.step_key(), images[index], crop, r["crop_scale"], r["flip"])
        return finetune_update(model, tx, state, _network_input(views, mean, std), labels[index])

    train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(replicated, replicated))
    images = sharding.replicate(labelled.images, mesh)
    labels = sharding.replicate(labelled.labels, mesh)
    loader = pipeline.IndexLoader(len(labelled), r["batch_size"], seed)
    score = lambda s: accuracy(model, {"params": s.params, "batch_stats": s.batch_stats},
                               test.images, test.labels, crop_size=crop, mean=mean, std=std,
                               batch_size=r["batch_size"], mesh=mesh)
    history = []
    for epoch in range(1, r["epochs"] + 1):
        for _ in range(steps_per_epoch):
            state, metrics = train_step(state, images, labels,
                                        sharding.shard_batch(next(loader)["index"], mesh))
        if epoch == r["epochs"] or (r["eval_every"] and epoch % r["eval_every"] == 0):
            history.append([epoch, score(state)])
            log(f"finetune epoch {epoch}/{r['epochs']}: loss {float(metrics['loss']):.4f}, "
                f"test top-1 {100 * history[-1][1]:.2f}%")
    return {"top1": history[-1][1], "num_labelled": int(len(labelled)),
            "percent": float(100.0 * len(labelled) / len(train)), "epochs": r["epochs"],
            "milestones": list(r["milestones"]), "history": history}
