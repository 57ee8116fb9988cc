"""Linear probe trained on online-augmented images through a frozen backbone (OBoW's ImageNet
ResNet-50 protocol, github.com/valeoai/obow `main_linear_classification.py`).

Each step draws a global batch of training images, makes one RandomResizedCrop(crop, scale
(0.08, 1)) + horizontal-flip view per image, computes the frozen `encode(variables, views)`
features (eval-mode backbone, under `stop_gradient`) and takes one SGD step of the head
(`linear.LinearHead`: [BatchNorm(affine=False)] -> Dense, N(0, 0.01) weights, zero bias;
PyTorch SGD with momentum and weight decay). The learning rate is set once per epoch
(`linear.epoch_learning_rate`, e.g. the per-epoch cosine to 0 of the R50 recipe). One jitted,
donated step, data parallel over the mesh: the head state is replicated, the batch sharded on
'data', so the gradient is the global mean.

Data (`training_data`), from the one batch source (`data.batches.training_batches`):
* TFDS (`data.eval_input.TfdsInput`): streamed by tf.data, each image decoded once into a
  canvas; the device crops and flips (`batches.crop_flip_views`), keyed by (seed, step).
* In-memory arrays (`ArraysInput`: npz, digits): the split lives on every device; the host
  produces the batch indices and the device gathers, crops and flips (the same views).
* Image folders raise `UnsupportedSourceError` (not implemented yet: use TFDS, e.g.
  `tfds.ImageFolder`, or a precached protocol).
Either way the views of step s are a function of (seed, s) only, so a resumed run sees the
batches an uninterrupted one would have seen.

Epoch = num_examples // batch steps: the last, smaller batch is dropped (the official PyTorch
DataLoader keeps it, so an official epoch has one more, smaller step when batch does not divide
the split). Test input: the cached centre-crop test features (Resize 256 + CenterCrop 224 on
ImageNet, `protocols.cache.split_features`).

The steps run on the step driver (`lib.loop`): the head state (step, params, batch statistics,
optimizer state) is checkpointed under `<workdir>/eval/linear/<tag>/checkpoints` every
`config.eval.linear_checkpoint_every_steps` steps and at the end, a row per epoch goes to
`<workdir>/eval/linear/<tag>/metrics.jsonl` (and TensorBoard); a start restores the newest
intact checkpoint and continues from its step. A SIGTERM / SIGINT (agreed by every process)
saves the current step and raises `stop.Stopped`. The finished probe's result goes to
`<workdir>/eval/linear/<tag>/result.json`, and a rerun with the same settings reads it instead of
training. Checkpoints or a result written under other settings (epochs, batch, crop, another
backbone state, ...) are refused with a ValueError naming what differs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bow_jax.data import batches as batch_source
from bow_jax.data import eval_input
from bow_jax.protocols import cache, linear
from bow_jax.lib import checkpoint, errors, files, logs, loop, schedules, sharding

SCALE = (0.08, 1.0)  # RandomResizedCrop's area range in the official linear-probe transform
_PROBE_STREAM = 0x1_1AE5  # separates the probe's data seed from the pre-training's


class UnsupportedSourceError(NotImplementedError, errors.InputError):
    """The augmented probe cannot stream this source yet (image folders)."""


@flax.struct.dataclass
class HeadState:
    """The probe's whole training state: `step` int32 [] (steps done), `variables`
    {'params'[, 'batch_stats']} of `linear.LinearHead`, the SGD `opt_state`."""
    step: jax.Array
    variables: Any
    opt_state: Any


# ------------------------------------------------------------------------------------ settings


def step_learning_rate(step: int, steps_per_epoch: int, protocol: dict) -> float:
    """The learning rate of (0-based) step `step`: that of its epoch, step // steps_per_epoch
    (`linear.epoch_learning_rate`; OBoW sets it once per epoch)."""
    return linear.epoch_learning_rate(
        step // steps_per_epoch, lr=protocol["lr"], epochs=protocol["epochs"],
        schedule=protocol["schedule"], milestones=protocol.get("milestones", ()),
        decay_factor=protocol.get("decay_factor", 0.1))


def optimizer(lr, protocol: dict) -> optax.GradientTransformation:
    """The protocol's PyTorch SGD (`schedules.torch_sgd`)."""
    return schedules.torch_sgd(lr, momentum=protocol.get("momentum", 0.9),
                               nesterov=protocol.get("nesterov", False),
                               weight_decay=protocol.get("weight_decay", 0.0))


def data_seed(seed: int) -> int:
    """A 31-bit seed for the probe's data order and views, distinct from pre-training's."""
    state = np.random.SeedSequence([int(seed), _PROBE_STREAM]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF)


def training_data(inp: eval_input.EvalInput):
    """(source, num_examples) of a training `EvalInput`: a `datasets.TfdsSource` (streamed) or an
    `ArrayDataset` (on the device); first `inp.num_examples` examples (the evaluation's limits).
    Raises UnsupportedSourceError for image folders (not implemented)."""
    if isinstance(inp, eval_input.TfdsInput):
        return inp.source, inp.num_examples
    if isinstance(inp, eval_input.ArraysInput):
        return inp.data, inp.num_examples
    raise UnsupportedSourceError(
        f"config.eval.linear_protocol: an augmented linear probe streams TFDS or in-memory "
        f"arrays; {type(inp).__name__} ({inp.name}) is not supported yet. Use TFDS "
        f"(config.data.source='tfds', e.g. tfds.ImageFolder) or a precached protocol.")


def probe_crop(image_size: int, protocol: dict, train_input: eval_input.EvalInput) -> int:
    """The side of the training views: config.eval.image_size when set; else the protocol's crop
    where the evaluation crops the source's images (images of several sizes: ImageNet's 224);
    else the data's own image size (in-memory arrays, fixed-size TFDS images)."""
    if image_size:
        return int(image_size)
    if train_input.transform.kind != "none":
        return int(protocol.get("crop") or train_input.transform.crop)
    height, width = train_input.image_shape[:2]
    if height != width:
        raise errors.InputError(
            f"{train_input.name}: images are {height}x{width}; the probe's square "
            f"crops need config.eval.image_size.")
    return int(height)


# ------------------------------------------------------------------------------------- batches


def probe_batches(data, num_examples: int, *, batch_size: int, crop: int, seed: int, mesh,
                  start_step: int):
    """Global batches {'image' uint8 [batch, crop, crop, 3], 'label' int32 [batch]} sharded on
    'data', for steps start_step, start_step + 1, ...: RandomResizedCrop(crop, SCALE) + flip of
    the first `num_examples` examples (`data.batches`; see the module docstring)."""
    seed = data_seed(seed)
    return batch_source.training_batches(
        data, batch_size=batch_size, seed=seed, mesh=mesh, start_step=start_step,
        device_views=functools.partial(batch_source.crop_flip_views, crop=crop, scale=SCALE),
        view_key=jax.random.key(seed), limit=num_examples)


# ---------------------------------------------------------------------------------- head, step


def init_head(num_classes: int, feature_dim: int, protocol: dict, seed: int) -> HeadState:
    """The head at step 0: weights N(0, 0.01), zero bias (`linear.LinearHead`), SGD state."""
    model = linear.LinearHead(num_classes, bool(protocol.get("batch_norm", False)))
    variables = model.init(jax.random.key(seed), jnp.zeros((1, feature_dim)), train=False)
    variables = dict(variables)
    # The optimizer state's structure does not depend on the learning rate.
    opt_state = optimizer(0.0, protocol).init(variables["params"])
    return HeadState(jnp.zeros((), jnp.int32), variables, opt_state)


def head_update(state: HeadState, feats, labels, lr, *, num_classes: int, protocol: dict):
    """One SGD step of the head on features [B, D] (float32) and labels int32 [B]: mean
    softmax cross-entropy, BatchNorm (if any) in train mode. Returns (state, {'loss', 'top1',
    'lr'})."""
    model = linear.LinearHead(num_classes, bool(protocol.get("batch_norm", False)))
    tx = optimizer(lr, protocol)
    variables = state.variables

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, feats, train=True,
                                      mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    deltas, opt_state = tx.update(grads, state.opt_state, variables["params"])
    variables = {**variables, **updates,
                 "params": optax.apply_updates(variables["params"], deltas)}
    top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
    metrics = {"loss": loss, "top1": top1, "lr": jnp.asarray(lr, jnp.float32)}
    return HeadState(state.step + 1, variables, opt_state), metrics


def compile_train_step(encode: Callable, num_classes: int, protocol: dict, mesh):
    """`step(state, variables, batch, lr) -> (state, metrics)`, jitted once: frozen features of
    batch['image'] (`encode(variables, images)`, no gradient), then `head_update`. The head state
    is donated; state and variables replicated, the batch sharded on 'data'."""
    def train_step(state, variables, batch, lr):
        feats = jax.lax.stop_gradient(encode(variables, batch["image"]).astype(jnp.float32))
        return head_update(state, feats, batch["label"], lr, num_classes=num_classes,
                           protocol=protocol)

    replicated = sharding.replicated(mesh)
    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(replicated, replicated, sharding.batch_sharded(mesh),
                                 replicated),
                   out_shardings=(replicated, replicated))


# ------------------------------------------------------------------------------- training loop


@dataclasses.dataclass
class ProbeRun:
    """What one probe trains: `total_steps` = epochs · steps_per_epoch global batches of
    `batch_size` views of side `crop`; `settings` (JSON) identify it in checkpoints and results."""
    protocol: dict
    num_classes: int
    batch_size: int
    crop: int
    seed: int
    steps_per_epoch: int
    total_steps: int
    settings: dict


def _feature_dim(encode: Callable, variables, crop: int) -> int:
    x = jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.uint8)
    out = jax.eval_shape(encode, variables, x)
    if len(out.shape) != 2:
        raise ValueError(f"encode must return [B, D] features; got shape {out.shape}.")
    return int(out.shape[1])


def _restore(checkpointer: Optional[checkpoint.Checkpointer], init: HeadState,
             settings: dict) -> HeadState:
    """The newest intact checkpoint (same settings: ValueError otherwise), or `init`."""
    if checkpointer is None:
        return init
    folder = os.path.dirname(checkpointer.directory)
    state, _ = checkpoint.restore_matching(
        checkpointer, init, lambda saved, where: _check_settings(saved, settings, where, folder))
    return state


def _check_settings(saved: dict, settings: dict, where: str, folder: str) -> None:
    """ValueError naming the differing settings when `saved` (of the file or checkpoint `where`,
    in the probe's `folder`) are not `settings`."""
    checkpoint.refuse_other_settings(
        saved, settings, where, "a linear probe",
        f"Remove {folder} to train this one, or restore the settings (config.eval.linear_*).")


def _title(tag: str) -> str:
    return f"linear probe {tag}" if tag else "linear probe"


def probe_loop(run: ProbeRun, state: HeadState, encode: Callable, variables, data,
               num_examples: int, mesh, checkpointer, checkpoint_every: int, hooks,
               tag: str) -> loop.Loop:
    """The `lib.loop.Loop` of the probe from `state.step`: one row per epoch (mean loss, top-1,
    lr) into the probe's folder (the checkpoints' parent) when checkpointed."""
    step_fn = compile_train_step(encode, run.num_classes, run.protocol, mesh)

    def step(state, batch, index):
        lr = step_learning_rate(index, run.steps_per_epoch, run.protocol)
        return step_fn(state, variables, batch, jnp.float32(lr))

    return loop.Loop(
        step=step, total_steps=run.total_steps, images_per_step=run.batch_size,
        batches=probe_batches(data, num_examples, batch_size=run.batch_size, crop=run.crop,
                              seed=run.seed, mesh=mesh, start_step=int(state.step)),
        title=_title(tag), log_every=run.steps_per_epoch, checkpointer=checkpointer,
        workdir=None if checkpointer is None else os.path.dirname(checkpointer.directory),
        checkpoint_every=checkpoint_every, settings=run.settings, hooks=tuple(hooks),
        advice="Lower config.eval.linear_lr, or check the frozen features.")


def train_head(encode: Callable, variables, data, num_examples: int, run: ProbeRun, mesh=None,
               checkpoint_dir: Optional[str] = None, checkpoint_every: int = 1000,
               hooks: Iterable[Callable[[int], None]] = (), tag: str = ""):
    """Trains the head of `run` on augmented views of `data` (a `TfdsSource` or `ArrayDataset`,
    its first `num_examples` examples) through the frozen `encode(variables, uint8 images)`, on
    the step driver (`lib.loop`); returns the head variables {'params'[, 'batch_stats']}.

    With `checkpoint_dir`, resumes from its newest checkpoint, saves every `checkpoint_every`
    steps and at the end, and writes a metrics row per epoch to the folder above it
    (metrics.jsonl, TensorBoard). A stop signal saves the current step and raises stop.Stopped.
    `hooks`: called with the number of steps done after each step.
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    dim = _feature_dim(encode, variables, run.crop)
    init = sharding.replicate(init_head(run.num_classes, dim, run.protocol, run.seed), mesh)
    checkpointer = None if checkpoint_dir is None else checkpoint.Checkpointer(
        checkpoint_dir, max_to_keep=2)
    try:
        state = _restore(checkpointer, init, run.settings)
        start = int(state.step)
        if start < run.total_steps:
            if start:
                logs.say(f"{_title(tag)}: resuming at step {start}/{run.total_steps} from "
                         f"{checkpointer.folder(start)}")
            state = loop.run(probe_loop(run, state, encode, variables, data, num_examples, mesh,
                                        checkpointer, checkpoint_every, hooks, tag), state)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return jax.device_get(state.variables)


# ----------------------------------------------------------------------------------- the probe


def probe_run(protocol: dict, num_classes: int, num_examples: int, *, crop: int, seed: int,
              identity: Optional[dict] = None) -> ProbeRun:
    """The `ProbeRun` of `protocol` (its 'epochs' and 'batch_size', already overridden by the
    config) on `num_examples` training examples. ValueError naming config.eval.linear_batch_size
    when one batch is more than the examples. `identity`: what else the settings record (the
    training split, the backbone's fingerprint)."""
    batch, epochs = int(protocol["batch_size"]), int(protocol["epochs"])
    if batch < 1 or epochs < 1 or crop < 1:
        raise errors.InputError(
            f"batch_size={batch}, epochs={epochs}, crop={crop}: expected >= 1 "
            f"(config.eval.linear_batch_size, linear_epochs, image_size).")
    if num_examples < batch:
        raise errors.InputError(
            f"config.eval.linear_batch_size: a batch of {batch} is more than the "
            f"{num_examples} training examples (the last partial batch is dropped).")
    spe = num_examples // batch
    settings = dict(protocol=protocol, num_classes=int(num_classes), batch_size=batch,
                    crop=int(crop), seed=int(seed), num_examples=int(num_examples),
                    **(identity or {}))
    return ProbeRun(dict(protocol), int(num_classes), batch, int(crop), int(seed), spe,
                    spe * epochs, json.loads(json.dumps(settings)))


def _labels_id(labels) -> dict:
    labels = np.ascontiguousarray(np.asarray(labels, np.int32))
    return {"num_examples": int(labels.size),
            "labels": hashlib.sha256(labels.tobytes()).hexdigest()[:16]}


def _read_result(path: str, settings: dict, test: dict) -> Optional[dict]:
    """The result of a finished probe with these settings on this test split, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    _check_settings(saved.get("settings", {}), settings, path, os.path.dirname(path))
    return saved["result"] if saved.get("test") == test else None


def augmented_linear_probe(encode: Callable, variables, train_input: eval_input.EvalInput,
                           test_feats, test_labels, protocol: dict, *, seed: int, crop: int,
                           mesh=None, workdir: Optional[str] = None, tag: str = "",
                           checkpoint_every: int = 1000, train_feats=None, train_labels=None,
                           hooks: Iterable[Callable[[int], None]] = ()) -> dict:
    """Trains the head on augmented views of `train_input` (see the module docstring) and
    returns dict(top1=test top-1 on `test_feats` [N, D] / `test_labels` [N], train_top1=top-1 on
    the centre training features `train_feats` when given), fractions in [0, 1], the keys of
    `linear.linear_probe`. With `workdir`: checkpoints and result.json under
    <workdir>/eval/linear/<tag>/ (resumed, reused). Raises UnsupportedSourceError (image
    folders), ValueError (batch larger than the split, settings differing from the saved ones)."""
    data, num_examples = training_data(train_input)
    identity = {"train": train_input.describe(), "backbone": cache.state_fingerprint(variables)}
    run = probe_run(protocol, train_input.num_classes, num_examples, crop=crop, seed=seed,
                    identity=identity)
    test = _labels_id(test_labels)
    folder = os.path.join(workdir, "eval", "linear", tag or "probe") if workdir else None
    result_path = None if folder is None else os.path.join(folder, "result.json")
    saved = None if result_path is None else _read_result(result_path, run.settings, test)
    if saved is not None:
        logs.say(f"{_title(tag)}: result of the finished run read from {result_path}")
        return saved
    head = train_head(encode, variables, data, num_examples, run, mesh,
                         None if folder is None else os.path.join(folder, "checkpoints"),
                         checkpoint_every, hooks, tag)
    result = {"top1": linear.evaluate_linear_probe(head, test_feats, test_labels)}
    if train_feats is not None:
        result["train_top1"] = linear.evaluate_linear_probe(head, train_feats, train_labels)
    if result_path is not None:
        if jax.process_index() == 0:
            files.atomic_write_text(result_path, json.dumps(
                {"settings": run.settings, "test": test, "result": result}, indent=1) + "\n")
        logs.say(f"{_title(tag)}: top-1 {100 * result['top1']:.2f}% after "
                 f"{run.total_steps} steps; result: {result_path}")
    return result


def probe_for_score(config, encode: Callable, variables, train_input: eval_input.EvalInput,
                    train_x: cache.SplitFeatures, test_x: cache.SplitFeatures, protocol: dict,
                    mesh=None, workdir: Optional[str] = None, tag: str = "") -> dict:
    """`augmented_linear_probe` as the linear protocol (`linear_protocol.py`) calls it for a
    protocol with 'augment': crop from `probe_crop` (it must be the side of the evaluation's
    images, which the cached test features `test_x` were computed on), checkpoints every
    config.eval.linear_checkpoint_every_steps."""
    ev = config.eval
    crop = probe_crop(int(getattr(ev, "image_size", 0) or 0), protocol, train_input)
    if tuple(train_input.image_shape[:2]) != (crop, crop):
        raise errors.InputError(
            f"config.eval.image_size: the augmented linear probe trains on {crop}x"
            f"{crop} crops, but the evaluation reads {train_input.name} images of "
            f"{train_input.image_shape[0]}x{train_input.image_shape[1]}; set "
            f"config.eval.image_size to match (in-memory data: its image size).")
    return augmented_linear_probe(
        encode, variables, train_input, test_x.feats, test_x.labels, protocol=protocol,
        seed=config.seed,
        crop=crop, mesh=mesh, workdir=workdir, tag=tag,
        checkpoint_every=int(getattr(ev, "linear_checkpoint_every_steps", 1000)),
        train_feats=train_x.feats, train_labels=train_x.labels)


def check_probe_config(config, num_train_examples: int) -> None:
    """Before training: the augmented probe's settings fit the devices and the data (called by
    `evaluate.checks` when the protocol has 'augment'). ValueError naming the field."""
    ev, protocol = config.eval, linear.PROTOCOLS[config.eval.linear_protocol]
    batch = int(getattr(ev, "linear_batch_size", 0) or 0) or int(protocol["batch_size"])
    sharding.check_divisible(batch, jax.device_count(), "config.eval.linear_batch_size "
                             "(0: the protocol's batch)", "the number of devices")
    if num_train_examples and batch > num_train_examples:
        raise errors.InputError(
            f"config.eval.linear_batch_size: a batch of {batch} is more than the "
            f"{num_train_examples} training examples of the linear probe.")
    if int(getattr(ev, "linear_checkpoint_every_steps", 1000)) < 1:
        raise errors.InputError(f"config.eval.linear_checkpoint_every_steps="
                         f"{ev.linear_checkpoint_every_steps}; expected >= 1.")
    if getattr(eval_input.evaluation_data(config), "source", None) == "image_folder":
        raise UnsupportedSourceError(
            f"config.eval.linear_protocol={ev.linear_protocol!r} trains on augmented images, "
            f"which image folders do not stream yet; use TFDS (tfds.ImageFolder) or a "
            f"precached protocol.")
