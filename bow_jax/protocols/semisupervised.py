"""Semi-supervised fine-tuning on 1% / 10% of the labels (OBoW `main_semisupervised.py`).

The whole network is trained (BatchNorm in train mode, batch statistics of the global batch, i.e.
SyncBN) with a linear head without BatchNorm on the pooled feature (weights N(0, 0.01), bias 0).
SGD with momentum 0.9, no weight decay and two learning rates: 2e-4 for the pre-trained trunk and
0.5 for the new head (`optax.multi_transform`), both x0.2 at the recipe's epochs (1%: 40 epochs,
milestones 24 and 32; 10%: 20 epochs, 12 and 16), batch 256. Training views are RandomResizedCrop
+ horizontal flip, made on the device; the test split is scored top-1 with the eval-mode network.

The labelled subset is given by a file (SimCLR's `1percent.txt` holds one image file name per
line; here a line is an integer index into the training split, a file name of an image-folder
dataset, or a TFDS `file_name` such as imagenet2012's `n01440764_10026.JPEG`) or drawn with a
seed: a class-balanced random `percent` of every class.

Both kinds of data come from the one batch source (`data.batches.training_batches`): small
data in memory (`finetune`, `ArrayDataset`: the subset lives on every device, only the batch
indices cross from the host each step, the device cuts RandomResizedCrop + flip); a streamed TFDS
training split (`finetune_streamed`, ImageNet: 10% decoded at 224 would be 19 GB) is never
loaded: the subset's positions are found once (file names or labels read without decoding
images), each epoch streams the split's records, keeps the subset, and tf.data decodes and crops
only those; the test split is scored from `eval_input` batches. Either way the step is one jitted,
donated function over the 'data' mesh. Accuracies are fractions in [0, 1].

The steps run on the step driver (`lib.loop`). Given a checkpoint folder (the task's is
<workdir>/eval/finetune/<network>/<subset name>/checkpoints), the whole fine-tuning `TrainState`
(step, params, batch statistics, optimizer state, key) is saved at the end of every epoch (the
last 2 kept), with the test scores recorded so far in its meta ('history'), and a metrics row per
epoch goes to metrics.jsonl beside it. A start restores the newest intact checkpoint and continues
from its step: the batches of step s are a function of (seed, s) on both paths, so a resumed run
ends with the parameters and results of an uninterrupted one, bit for bit; a finished run's folder
gives its result back without training. A SIGTERM / SIGINT (agreed by every process) saves the
current step and raises `stop.Stopped`; the same command resumes. A checkpoint of other settings
(config.finetune, config.seed, the pre-trained network, the labelled subset, ...; `run_settings`)
is refused with a ValueError naming what differs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bow_jax.data import augment, datasets, eval_input, pipeline
from bow_jax.data import batches as batch_source
from bow_jax.lib import checkpoint, errors, logs, loop, schedules, sharding
from bow_jax.lib.state import TrainState
from bow_jax.methods import interface
from bow_jax.models import check_feature_names, feature_dims, heads
from bow_jax.protocols import cache, features

# The README's two recipes; the other hyper-parameters are shared (`default_config`).
PRESETS = {
    "1percent": dict(percent=1.0, epochs=40, milestones=(24, 32)),
    "10percent": dict(percent=10.0, epochs=20, milestones=(12, 16)),
}
TRUNK, HEAD = "trunk", "head"


def recipe(cfg) -> dict:
    """`cfg` (config.finetune) with the preset filled in: percent, epochs, milestones, ..."""
    if cfg.preset not in PRESETS:
        raise errors.InputError(f"config.finetune.preset={cfg.preset!r}; expected one of "
                         f"{sorted(PRESETS)}.")
    preset = PRESETS[cfg.preset]
    epochs = cfg.epochs or preset["epochs"]
    milestones = tuple(cfg.milestones) or tuple(
        max(1, round(m * epochs / preset["epochs"])) for m in preset["milestones"])
    out = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    out.update(percent=cfg.percent or preset["percent"], epochs=epochs, milestones=milestones)
    if not 0 < out["percent"] <= 100:
        raise errors.InputError(f"config.finetune.percent={out['percent']}; expected (0, 100].")
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


def _subset_lines(path) -> list[tuple[int, str]]:
    """(line number, entry) of the non-blank lines of a subset file; ValueError when none."""
    if not pathlib.Path(path).is_file():
        raise errors.MissingInputError(
            f"config.finetune.subset_file={path}: no such file (expected one "
            f"index or image file name per line, e.g. SimCLR's 1percent.txt).")
    lines = [(i + 1, line.strip()) for i, line in
             enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines())]
    lines = [(n, s) for n, s in lines if s]
    if not lines:
        raise errors.InputError(f"config.finetune.subset_file={path}: the file lists no examples.")
    return lines


def is_index_entry(entry: str) -> bool:
    """An integer index line (as opposed to a file name)."""
    return entry.lstrip("-").isdigit()


def read_subset_file(path, num_examples: int, filenames: Optional[Sequence[str]] = None,
                     names_of: str = "the image folder") -> np.ndarray:
    """Indices listed in `path`: one integer index per line, or (with `filenames`, the dataset's
    names in split order: an image folder's 'class/file', TFDS imagenet2012's `file_name`) one
    file name per line, bare as in SimCLR's 1percent.txt or 'class/file'.

    Blank lines are skipped. ValueError for an index outside [0, num_examples) (naming the line),
    a repeated entry, or names not among `filenames` (`names_of` says whose they are): that one
    names config.finetune.subset_file, how many are missing and the first five with their lines.
    """
    lines = _subset_lines(path)
    by_name = {}
    if filenames is not None:
        for i, name in enumerate(filenames):
            by_name[name] = i
            by_name.setdefault(name.rsplit("/", 1)[-1], i)
    indices, missing = [], []
    for number, entry in lines:
        if is_index_entry(entry):
            index = int(entry)
            if not 0 <= index < num_examples:
                raise errors.InputError(f"config.finetune.subset_file={path}: line {number}: index "
                                 f"{index} is outside the training split [0, {num_examples}).")
            indices.append(index)
        elif entry in by_name:
            indices.append(by_name[entry])
        else:
            missing.append((number, entry))
    if missing:
        what = (f"not a file of {names_of}" if filenames is not None else
                "not an integer index (file names need an image-folder dataset or a TFDS split "
                "with a 'file_name' feature)")
        shown = "; ".join(f"{path}:{n}: {e!r} is {what}" for n, e in missing[:5])
        raise errors.InputError(
            f"config.finetune.subset_file={path}: {len(missing)} of {len(lines)} "
            f"entries are not in the training split (first {min(5, len(missing))}): "
            f"{shown}.")
    indices = np.asarray(indices, np.int64)
    if len(np.unique(indices)) != len(indices):
        raise errors.InputError(f"{path}: some examples are listed twice.")
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
            raise errors.InputError(
                f"config.finetune.feature={self.feature!r} is not a backbone output; "
                f"available: {sorted(outputs)}.")
        return heads.LinearClassifier(self.num_classes, batch_norm=False,
                                      name="head")(outputs[self.feature])


def param_groups(params) -> Any:
    """'head' for the head's parameters, 'trunk' for everything else (a tree like `params`)."""
    return {name: jax.tree.map(lambda _, g=(HEAD if name == "head" else TRUNK): g, sub)
            for name, sub in params.items()}


def finetune_optimizer(lr_trunk, lr_head, momentum: float = 0.9,
                       weight_decay: float = 0.0) -> optax.GradientTransformation:
    """PyTorch SGD (`schedules.torch_sgd`) with two parameter groups, each with its learning
    rate (a float or a schedule of the step)."""
    def sgd(lr):
        return schedules.torch_sgd(lr, momentum=momentum, weight_decay=weight_decay)

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


def eval_views(images, crop_size: int):
    """Test images at the training resolution: unchanged when they already are, otherwise
    Resize(shorter side) + CenterCrop(crop_size)."""
    if images.shape[1:3] == (crop_size, crop_size):
        return images

    size = images.shape[1:3]
    return jax.vmap(lambda image: augment.resize_center_crop(image, size, crop_size,
                                                             crop_size))(images)


# ------------------------------------------------------------------------------------------------
# The whole fine-tuning run.


def top1_top5(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(top-1, top-5) accuracy (fractions) of logits [N, C] against int labels [N]; top-5 counts
    a hit among the 5 largest logits (all C when C < 5). The OBoW paper reports the
    semi-supervised results as top-5 (Table 6), the other protocols as top-1."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    k = min(5, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    return (float(np.mean(np.argmax(logits, -1) == labels)),
            float(np.mean(np.any(top == labels[:, None], axis=-1))))


def accuracy(model, variables, images, labels, *, crop_size, mean, std, batch_size, mesh):
    """(top-1, top-5) accuracy of the eval-mode network on uint8 images."""
    def logits(v, x):
        inputs = interface.to_network_input(eval_views(x, crop_size), mean, std)
        return model.apply(v, inputs, train=False)

    out = features.extract_features(logits, images, batch_size, mesh, variables=variables)
    return top1_top5(out, labels)


def check_batch(r: dict, num_labelled: int) -> None:
    """The recipe's batch against the devices and the labelled subset; ValueError names
    config.finetune.batch_size."""
    sharding.check_divisible(r["batch_size"], jax.device_count(), "config.finetune.batch_size",
                             "the number of devices")
    if num_labelled < r["batch_size"]:
        raise errors.InputError(f"config.finetune.batch_size={r['batch_size']} is larger than the "
                         f"{num_labelled} labelled examples; lower it.")


def labelled_indices(train: datasets.ArrayDataset, r: dict, subset) -> np.ndarray:
    """The labelled examples of `train`, int64 [n]: `subset`, else drawn as `r` says; checked
    against the recipe's batch size (ValueError names the config.finetune field). Only indices:
    the batch source gathers the images once (`data.batches.training_batches`)."""
    if subset is None:
        subset = labelled_subset(train.labels, percent=r["percent"], seed=r["subset_seed"],
                                 subset_file=r["subset_file"])
    indices = np.asarray(subset, np.int64)
    check_batch(r, len(indices))
    return indices


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


def _model_and_state(backbone, variables, num_classes, r, crop, steps_per_epoch, seed, mesh):
    """(FinetuneNet, the two-rate optimizer with the recipe's step decays, replicated state)."""
    model = FinetuneNet(backbone, num_classes, r["feature"])
    lr = {name: schedules.step_lr(r[f"lr_{name}"], r["milestones"], r["decay"], steps_per_epoch)
          for name in (TRUNK, HEAD)}
    tx = finetune_optimizer(lr[TRUNK], lr[HEAD], r["momentum"], r["weight_decay"])
    state = jax.device_put(initial_finetune_state(backbone, variables, num_classes, r, crop,
                                                  tx, jax.random.key(seed)),
                           sharding.replicated(mesh))
    return model, tx, state


# ------------------------------------------------------------------------------------------------
# Checkpoints and resume.


def run_settings(r: dict, *, seed: int, num_classes: int, crop: int, subset, num_examples: int,
                 variables, streamed: bool) -> dict:
    """What identifies a fine-tuning run in its checkpoints (JSON; keys name the config field
    where there is one): config.finetune's recipe (cache_subset, a storage choice, aside),
    config.seed, the pre-trained network (`cache.state_fingerprint` of its variables), the
    labelled subset (its size, the split's and a hash of its indices int [n]), the classes, the
    crop and which pipeline makes the views."""
    indices = np.ascontiguousarray(np.asarray(subset, np.int64))
    return json.loads(json.dumps({
        "config.finetune": {k: v for k, v in r.items() if k != "cache_subset"},
        "config.seed": int(seed),
        "network": cache.state_fingerprint(variables),
        "labelled subset": {"examples": int(indices.size), "of": int(num_examples),
                            "indices sha256": hashlib.sha256(indices.tobytes()).hexdigest()[:16]},
        "classes": int(num_classes), "crop": int(crop),
        "views": "tf.data, streamed TFDS" if streamed else "on the device, in memory"}))


def _scored(r: dict, epoch: int) -> bool:
    return epoch == r["epochs"] or bool(r["eval_every"] and epoch % r["eval_every"] == 0)


def _check_settings(settings: dict, directory: str):
    """`check(saved settings, where)` for `checkpoint.restore_matching`: a ValueError naming
    the settings that differ."""
    def check(saved: dict, where: str) -> None:
        checkpoint.refuse_other_settings(
            saved, settings, where, "a fine-tuning",
            f"Remove {directory} to fine-tune with these settings, or use the saved ones "
            f"(config.finetune, config.seed, the same pre-trained network).")
    return check


def _restore(checkpointer, init: TrainState, settings: dict, total: int, log) -> tuple:
    """(the newest intact state, its test-score history), or (init, []) when there is none."""
    if checkpointer is None:
        return init, []
    state, meta = checkpoint.restore_matching(checkpointer, init,
                                              _check_settings(settings, checkpointer.directory))
    if meta is None:
        return init, []
    log(f"finetune: resuming at step {int(state.step)}/{total} from "
        f"{checkpointer.folder(int(state.step))}")
    return state, [list(entry) for entry in meta.get("history", [])]


@dataclasses.dataclass
class FinetuneRun:
    """One fine-tuning run, whatever its data: `step(state, batch) -> (state, metrics)` (jitted,
    donated), `batches(start step)` (from `data.batches.training_batches`), `score(state) ->
    (test top-1, top-5)`, the recipe `r`, its `steps_per_epoch` and the `settings` its
    checkpoints record."""
    r: dict
    steps_per_epoch: int
    step: Callable
    batches: Callable[[int], Any]
    score: Callable
    settings: dict


def _epoch_scores(run: FinetuneRun, history: list):
    """`Loop.scalars`: the test scores at the end of each scored epoch, kept in `history`."""
    def scalars(state, done: int) -> dict:
        epoch, rest = divmod(done, run.steps_per_epoch)
        if rest or not _scored(run.r, epoch):
            return {}
        history.append([epoch, *run.score(state)])
        return {"test_top1": history[-1][1], "test_top5": history[-1][2]}
    return scalars


def _train(run: FinetuneRun, init: TrainState, checkpoint_dir: Optional[str],
           hooks: Sequence[Callable], log) -> list:
    """Restores the newest checkpoint of `checkpoint_dir` (else starts from `init`), runs the
    remaining steps on the step driver (`lib.loop`: a checkpoint and a metrics row per epoch,
    with the test scores of the scored epochs) and returns the whole history [[epoch, top1,
    top5], ...]; a finished run trains nothing."""
    total = run.r["epochs"] * run.steps_per_epoch
    checkpointer = (None if checkpoint_dir is None else
                    checkpoint.Checkpointer(checkpoint_dir, max_to_keep=2))
    try:
        state, history = _restore(checkpointer, init, run.settings, total, log)
        start = int(state.step)
        if start < total:
            loop.run(loop.Loop(
                step=lambda s, batch, index: run.step(s, batch), batches=run.batches(start),
                total_steps=total, images_per_step=run.r["batch_size"], title="finetune",
                workdir=None if checkpoint_dir is None else os.path.dirname(checkpoint_dir),
                log_every=run.steps_per_epoch, checkpointer=checkpointer,
                checkpoint_every=run.steps_per_epoch, settings=run.settings,
                checkpoint_meta=lambda: {"history": [list(entry) for entry in history]},
                scalars=_epoch_scores(run, history), hooks=tuple(hooks),
                advice="Lower config.finetune.lr_trunk / lr_head."), state)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return history


def _result(r: dict, history, num_labelled: int, num_examples: int) -> dict:
    return {"top1": history[-1][1], "top5": history[-1][2], "num_labelled": int(num_labelled),
            "percent": float(100.0 * num_labelled / num_examples), "epochs": r["epochs"],
            "milestones": list(r["milestones"]), "history": history}


def _variables(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _compile_step(model, tx, mean, std, mesh):
    """`step(state, batch) -> (state, metrics)`, jitted once, the state donated: one SGD step on
    batch['image'] (uint8 views, normalised here) and batch['label']."""
    def step(state, batch):
        inputs = interface.to_network_input(batch["image"], mean, std)
        return finetune_update(model, tx, state, inputs, batch["label"])

    replicated = sharding.replicated(mesh)
    return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def _finetune_run(backbone, variables, data, positions, num_classes: int, crop: int, r: dict,
                  mean, std, seed: int, mesh, score_fn, cache_dir=None):
    """(FinetuneRun, initial state) of fine-tuning on the examples at `positions` of `data` (an
    `ArrayDataset` or a streamed `TfdsSource`): RandomResizedCrop + flip views from the one batch
    source, the step, and `score_fn(model, variables) -> (top1, top5)` for the test split."""
    steps_per_epoch = pipeline.steps_per_epoch(len(positions), r["batch_size"])
    model, tx, state = _model_and_state(backbone, variables, num_classes, r, crop,
                                        steps_per_epoch, seed, mesh)
    streamed = isinstance(data, datasets.TfdsSource)
    settings = run_settings(r, seed=seed, num_classes=num_classes, crop=crop,
                            subset=np.unique(positions) if streamed else positions,
                            num_examples=len(data), variables=variables, streamed=streamed)
    views = dict(crop=crop, scale=r["crop_scale"], flip=r["flip"])

    def batches(start: int):
        return batch_source.training_batches(
            data, batch_size=r["batch_size"], seed=seed, mesh=mesh, start_step=start,
            device_views=functools.partial(batch_source.crop_flip_views, **views),
            positions=positions,
            cache_dir=cache_dir)

    run = FinetuneRun(r, steps_per_epoch, _compile_step(model, tx, mean, std, mesh), batches,
                      lambda s: score_fn(model, _variables(s)), settings)
    return run, state


def finetune(backbone: nn.Module, variables, train: datasets.ArrayDataset,
             test: datasets.ArrayDataset, cfg, mean, std, *, seed: int = 0,
             subset: Optional[np.ndarray] = None, mesh=None,
             log: Callable[[str], None] = logs.say, checkpoint_dir: Optional[str] = None,
             hooks: Sequence[Callable[[int], None]] = ()) -> dict:
    """Fine-tunes `backbone` (its `variables`) on the labelled subset of `train`; scores `test`.

    cfg: config.finetune (defaults in bow_jax/tasks/finetune.py); subset: indices into `train`
    (default: from cfg.subset_file / cfg.percent + cfg.subset_seed). With `checkpoint_dir`:
    resumes from its newest checkpoint, saves at every epoch's end and writes a metrics row per
    epoch to the folder above it; a stop signal saves the step and raises stop.Stopped. `hooks`:
    called with the steps done after each step. Returns {'top1', 'top5', 'num_labelled',
    'percent', 'epochs', 'milestones', 'history': [[epoch, top1, top5], ...]}. ValueError: batch
    larger than the subset or not divisible by the devices, a checkpoint of other settings.
    """
    r = recipe(cfg)
    mesh = sharding.make_mesh() if mesh is None else mesh
    indices = labelled_indices(train, r, subset)
    crop = r["crop_size"] or train.image_shape[0]

    def score(model, variables):
        return accuracy(model, variables, test.images, test.labels, crop_size=crop, mean=mean,
                        std=std, batch_size=r["batch_size"], mesh=mesh)

    run, state = _finetune_run(backbone, variables, train, indices, train.num_classes, crop, r,
                               mean, std, seed, mesh, score)
    history = _train(run, state, checkpoint_dir, hooks, log)
    return _result(r, history, len(indices), len(train))


# ------------------------------------------------------------------------------------------------
# Streamed: a TFDS training split (ImageNet), the subset selected by position and streamed by
# tf.data as canvases (`pipeline.tfds_subset_canvases`), the test split read by `eval_input`
# batches.


def tfds_subset_positions(source: datasets.TfdsSource, r: dict,
                          log: Callable[[str], None] = logs.say) -> np.ndarray:
    """Positions (in `source.split`'s stored order) of the labelled subset: config.finetune.
    subset_file's integer indices, or its file names matched against the split's 'file_name'
    feature (TFDS imagenet2012; one pass over the records, images not decoded), else a
    class-balanced `percent` drawn from the split's labels. ValueError (before any training)
    for names the split lacks (`read_subset_file`) or names with no 'file_name' feature."""
    path = r["subset_file"]
    if path and all(is_index_entry(e) for _, e in _subset_lines(path)):
        return read_subset_file(path, len(source))
    split = f"{source.name} split {source.split!r}"
    if path:
        if "file_name" not in source.builder.info.features:
            raise errors.InputError(
                f"config.finetune.subset_file={path} lists file names, but {split} "
                f"has no 'file_name' feature; list integer indices instead.")
        log(f"finetune: reading the file names of {split} (one pass, no image decoded)")
        names = pipeline.tfds_feature_values(source.builder, source.split, "file_name")
        return read_subset_file(path, len(source), list(names), names_of=split)
    log(f"finetune: reading the labels of {split} (one pass, no image decoded)")
    labels = pipeline.tfds_feature_values(source.builder, source.split, "label")
    return balanced_subset(labels, r["percent"], r["subset_seed"])


def streamed_accuracy(logits_fn, variables, test: eval_input.EvalInput, batch_size: int,
                      mesh) -> tuple[float, float]:
    """(top-1, top-5) of `logits_fn(variables, uint8 images)` over `test`, read in batches
    (`cache.split_features`, no cache): no split is held in memory, only its logits."""
    out = cache.split_features(logits_fn, test, batch_size, mesh, variables=variables)
    return top1_top5(out.feats, out.labels)


def finetune_streamed(backbone: nn.Module, variables, train: datasets.TfdsSource,
                      test: eval_input.EvalInput, cfg, mean, std, *, seed: int = 0,
                      positions: Optional[np.ndarray] = None, mesh=None,
                      cache_dir: Optional[str] = None,
                      log: Callable[[str], None] = logs.say,
                      checkpoint_dir: Optional[str] = None,
                      hooks: Sequence[Callable[[int], None]] = ()) -> dict:
    """`finetune` for a streamed TFDS training split (ImageNet): the labelled subset
    (`positions`, default `tfds_subset_positions`) is streamed as canvases by tf.data
    (`pipeline.tfds_subset_canvases`) and cut into RandomResizedCrop + flip views on the device
    (deterministic in (seed, step)); `test` (an
    `eval_input.evaluation_input`, e.g. Resize 256 + CenterCrop 224) is scored in batches. The
    training crop is config.finetune.crop_size, else the test images' side. `cache_dir`: keep
    the subset's encoded records there after the first pass (see `tfds_subset_canvases`).
    `checkpoint_dir`, `hooks`: as `finetune` (a resumed run streams from its step on). Same
    result dict."""
    r = recipe(cfg)
    mesh = sharding.make_mesh() if mesh is None else mesh
    positions = tfds_subset_positions(train, r, log) if positions is None else positions
    check_batch(r, len(positions))
    crop = r["crop_size"] or test.image_shape[0]

    def score(model, variables):
        def logits(v, x):
            return model.apply(v, interface.to_network_input(eval_views(x, crop), mean, std),
                               train=False)
        return streamed_accuracy(logits, variables, test, r["batch_size"], mesh)

    run, state = _finetune_run(backbone, variables, train, positions, train.num_classes, crop, r,
                               mean, std, seed, mesh, score, cache_dir)
    history = _train(run, state, checkpoint_dir, hooks, log)
    return _result(r, history, len(positions), len(train))
