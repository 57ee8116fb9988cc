"""What every method shares: the `Method` interface, the backbone, normalisation, the optimizer.

A method is a bundle of pure functions; `pretrain.py` jits them over the device mesh:
- `init_state(key) -> state`
- `make_views(canvases uint8 [B,S,S,3], sizes int32 [B,2], key) -> batch`: the geometric views,
  on the device, of the true (h, w) image in the corner of each canvas (in-memory images are their
  own canvases; streamed ones are padded by the host, `data/batches.py`);
- `train_step(state, batch) -> (state, metrics)`: photometric augmentation, forward, loss, update;
- `encode(state, images_uint8) -> [B, D]`: frozen features for evaluation (eval-mode BatchNorm);
- `backbone_variables(state) -> {'params', 'batch_stats'}`: the student backbone's variables.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from bow_jax.data import augment
from bow_jax.data.datasets import DEFAULT_CANVAS_SIZE
from bow_jax.lib import logs, schedules
from bow_jax.lib.errors import InputError
from bow_jax.models import create_backbone


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its training data."""
    image_shape: tuple  # (H, W, 3) of the stored uint8 images
    num_examples: int
    steps_per_epoch: int
    total_steps: int


def backbone_variables(state) -> dict:
    """{'params', 'batch_stats'} of the student backbone of a training state: every method keeps
    it under the 'backbone' key of its params and batch_stats (what evaluation, export and a
    BoWNet teacher read)."""
    return {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}


@dataclasses.dataclass(frozen=True)
class Method:
    init_state: Callable
    train_step: Callable
    make_views: Callable
    encode: Callable
    # (state, images_uint8) -> {name: per-image score [B]}: the pretext task scored on held-out
    # images (RotNet: rotation accuracy), averaged over the test split by the evaluation.
    pretext_scores: Optional[Callable] = None
    # state -> {'params', 'batch_stats'} of the student backbone: the one way to the backbone.
    backbone_variables: Callable = backbone_variables


def bind(setup: Any, **functions: Callable) -> Method:
    """The `Method` whose functions are `functions` (name -> f(setup, ...)) with the method's
    frozen `setup` bound as their first argument."""
    return Method(**{name: functools.partial(f, setup) for name, f in functions.items()})


def normalization(config):
    """(mean, std) of `config.data.normalization`: 'imagenet' or 'cifar' (else InputError)."""
    name = config.data.normalization
    if name == "imagenet":
        return augment.IMAGENET_MEAN, augment.IMAGENET_STD
    if name == "cifar":
        return augment.CIFAR_MEAN, augment.CIFAR_STD
    raise InputError(f"config.data.normalization={name!r}; expected 'imagenet' or 'cifar'.")


def to_network_input(images_uint8, mean, std):
    """uint8 views → normalised float32, the network's input."""
    return augment.normalize(augment.to_float(images_uint8), mean, std)


def warn_if_canvas_below_views(config, data_info: DataInfo, view_sides: dict) -> None:
    """Warns (stderr, process 0) when streamed images are padded into a canvas smaller than a
    view's side: every image is then shrunk to config.data.canvas_size on the host and its views
    are upscaled from it, blurrier than the full-size image would give (`data/pipeline.tf_canvas`).

    view_sides: {config field name: side in pixels} of the method's views (resize targets, crop
    sizes). In-memory data (data_info.image_shape set) has no canvas: nothing to check."""
    if data_info.image_shape is not None or not view_sides:
        return
    canvas = int(config.data.get("canvas_size", DEFAULT_CANVAS_SIZE))
    field, side = max(view_sides.items(), key=lambda item: item[1])
    if canvas < side:
        logs.warn(f"config.data.canvas_size={canvas} is smaller than {field}={side}: every "
                  f"streamed image is shrunk to fit {canvas}x{canvas} on the host and its views "
                  f"are upscaled from it (blurrier); set canvas_size >= {side} (default "
                  f"{DEFAULT_CANVAS_SIZE}).")


def backbone_from_config(config):
    return create_backbone(config.model.name, **config.model.kwargs.to_dict())


def optimizer_from_config(config, data_info: DataInfo):
    lr = schedules.make_lr_schedule(config.optim, data_info.steps_per_epoch,
                                    data_info.total_steps // data_info.steps_per_epoch)
    return schedules.make_optimizer(config.optim, lr), lr


def pooled(feature) -> jax.Array:
    """A [B,D] vector from a named backbone output: maps are globally average-pooled."""
    return feature if feature.ndim == 2 else jnp.mean(feature, axis=(1, 2))


def adaptive_avg_pool(feature, size: int) -> jax.Array:
    """[B,H,W,C] -> [B,size,size,C]: PyTorch `AdaptiveAvgPool2d(size)`, bin i of an axis of n
    averaging [floor(i·n/size), ceil((i+1)·n/size)) (bins overlap when size does not divide
    n). ValueError when a side is smaller than `size`."""
    h, w = feature.shape[1:3]
    if min(h, w) < size:
        raise ValueError(f"a {h}x{w} map cannot be pooled to {size}x{size}.")

    def bins(n):
        return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
    rows = [jnp.stack([jnp.mean(feature[:, top:bottom, left:right], axis=(1, 2))
                       for left, right in bins(w)], axis=1) for top, bottom in bins(h)]
    return jnp.stack(rows, axis=1)


def split_pooled_name(feature_name: str) -> tuple[str, int]:
    """'layer4_pool2' -> ('layer4', 2): a map average-pooled to 2x2 (`adaptive_avg_pool`) and
    flattened, Goyal et al. 2019's SVM features (ResNet-50 conv5 2x2x2048 = 8192, conv4
    3x3x1024 = 9216); any other name -> (name, 0), the output as it is (maps: global mean)."""
    base, _, size = feature_name.rpartition("_pool")
    if base and size.isdigit() and int(size) > 0:
        return base, int(size)
    return feature_name, 0


def encode_with(backbone, variables: Any, images_uint8, feature_name: str, mean, std):
    """Frozen float32 [B, D] features of uint8 [B,H,W,3] `images_uint8`: eval-mode backbone, the
    named output (config.eval.feature), globally average-pooled; '<map>_pool<k>' (e.g.
    'layer4_pool2', 'layer3_pool3') is the map adaptively pooled to k x k and flattened in
    (row, column, channel) order, D = k²·C. InputError naming config.eval.feature when the
    backbone has no such output or its map is smaller than k x k."""
    features = backbone.apply(variables, to_network_input(images_uint8, mean, std), train=False)
    name, size = (feature_name, 0) if feature_name in features else split_pooled_name(feature_name)
    if name not in features or (size and features[name].ndim != 4):
        raise InputError(f"config.eval.feature={feature_name!r} is not an output of "
                         f"{type(backbone).__name__}; available: {sorted(features)} (maps also "
                         f"as '<map>_pool<k>', k x k average-pooled).")
    if not size:
        return pooled(features[name]).astype(jnp.float32)
    try:
        grid = adaptive_avg_pool(features[name], size)
    except ValueError as e:
        raise InputError(f"config.eval.feature={feature_name!r}: {e}") from None
    return grid.reshape(grid.shape[0], -1).astype(jnp.float32)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def soft_cross_entropy(logits, targets):
    """Mean over rows of −Σ_k t_k log p_k (same gradient as the reference KL loss)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.sum(targets * logp, axis=-1))
