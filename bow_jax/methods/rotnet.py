"""RotNet (Gidaris et al., ICLR 2018): predict which of the 4 rotations was applied.

Every image of the batch is shown in all 4 rotations (0, 90, 180, 270 degrees, exact rot90) in the
same batch, so a batch of B images is a forward pass over 4B inputs with labels 0..3; the learning
rate is not rescaled for the 4x batch (as in the official code). BatchNorm statistics are taken
over all 4B inputs.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bow_jax.data import geometric
from bow_jax.lib import config_checks
from bow_jax.lib.errors import InputError
from bow_jax.lib.state import TrainState
from bow_jax.methods import interface
from bow_jax.models import heads
from bow_jax.models.norm import BatchNorm

VIEWS = ("crop", "resized_crop")  # config.rotnet.view


class ResidualHeadBlock(nn.Module):
    """A pre-activation residual block on the last feature map: the BoWNet paper's RotNet head
    ("an extra residual block instead of just a linear layer")."""

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        norm = lambda name: BatchNorm(use_running_average=not train, name=name)  # torch numerics
        conv = lambda name: nn.Conv(channels, (3, 3), padding=1, use_bias=False, name=name,
                                    kernel_init=nn.initializers.variance_scaling(
                                        2.0, "fan_out", "normal"))
        h = conv("conv1")(nn.relu(norm("bn1")(x)))
        h = conv("conv2")(nn.relu(norm("bn2")(h)))
        return nn.relu(norm("bn_out")(x + h))


class RotNetModel(nn.Module):
    """Backbone plus rotation classifier; returns (rotation logits [N,4], backbone outputs)."""
    backbone: nn.Module
    head: str = "linear"  # 'linear': on the backbone's pooled vector; 'residual': block + pool
    head_feature: str = "pooled"

    @nn.compact
    def __call__(self, x, train: bool):
        features = self.backbone(x, train=train)
        if self.head == "residual":
            z = jnp.mean(ResidualHeadBlock(name="head_block")(features[self.head_feature], train),
                         axis=(1, 2))
        else:
            z = features["pooled"]
        return heads.RotationHead(name="rotation_head")(z), features


def default_config() -> ml_collections.ConfigDict:
    """config.rotnet."""
    r = ml_collections.ConfigDict()
    r.head = "linear"  # 'linear' on the pooled vector, or 'residual' (BoWNet paper's RotNet)
    r.head_feature = "pooled"  # input map of the residual head
    r.crop_size = 0  # 0: the stored image size (in-memory data); streamed data need a size
    r.crop_padding = 4  # CIFAR: RandomCrop(32, padding=4)
    r.view = "crop"  # 'crop': RandomCrop(crop_size, crop_padding) (CIFAR), after Resize(resize)
    #                  when resize > 0; 'resized_crop': RandomResizedCrop(crop_size, crop_scale)
    #                  (the official ImageNet RotNet, github.com/gidariss/FeatureLearningRotNet,
    #                  config ImageNet_RotNet_AlexNet: random_sized_crop). Both then flip.
    r.resize = 0  # 'crop' view: > 0 resizes the shorter side first (Resize 256 + RandomCrop 224)
    r.crop_scale = (0.08, 1.0)  # 'resized_crop' view: area fraction (torchvision's default)
    r.flip = True
    return r


@dataclasses.dataclass(frozen=True)
class Setup:
    """What RotNet's functions need besides the state and the batch, fixed by `create`."""
    cfg: Any  # config.rotnet
    backbone: nn.Module
    model: RotNetModel
    tx: optax.GradientTransformation
    lr_schedule: Callable
    mean: tuple
    std: tuple
    crop: int  # side of the training views
    eval_feature: str  # config.eval.feature


def check_rotnet_config(cfg, training: bool = True) -> None:
    """InputError naming the config.rotnet field: the head always (it shapes the state), the
    view's crop and padding when `training`."""
    if cfg.head not in ("linear", "residual"):
        raise InputError(f"config.rotnet.head={cfg.head!r}; expected 'linear' or 'residual'.")
    if training and (cfg.crop_size < 0 or cfg.crop_padding < 0 or cfg.resize < 0):
        raise InputError(f"config.rotnet.crop_size={cfg.crop_size}, crop_padding="
                         f"{cfg.crop_padding}, resize={cfg.resize}; expected all >= 0 (crop_size "
                         "0: the stored image size).")
    if training and cfg.view not in VIEWS:
        raise InputError(f"config.rotnet.view={cfg.view!r}; expected one of {list(VIEWS)}.")
    if training and cfg.view == "resized_crop":
        config_checks.interval(cfg.crop_scale, "config.rotnet.crop_scale", 0.0, 1.0,
                               "(min, max) area fraction of the random resized crop")
    if training and cfg.resize and cfg.resize < cfg.crop_size:
        raise InputError(f"config.rotnet.resize={cfg.resize} is smaller than crop_size="
                         f"{cfg.crop_size}: the crop must fit the resized image.")


def view_size(cfg, image_shape) -> int:
    """Side of RotNet's training views: config.rotnet.crop_size, or the stored images' side
    (in-memory square images). InputError naming the field when neither gives one (streamed
    images of many sizes, non-square images)."""
    if cfg.crop_size:
        return int(cfg.crop_size)
    if image_shape is None or image_shape[0] != image_shape[1]:
        raise InputError("config.rotnet.crop_size=0 takes the stored images' side, but these "
                         + ("are streamed (sizes vary)" if image_shape is None else
                            f"are {image_shape[0]}x{image_shape[1]}")
                         + "; set the side of the square views (rotations need squares), e.g. "
                         "224 with config.rotnet.resize=256 on ImageNet.")
    return int(image_shape[0])


def setup(config, data_info: interface.DataInfo, training: bool = True) -> Setup:
    """The network, optimizer and sizes of `config`; InputError naming a bad field (`training`
    False: only the fields that shape the state)."""
    cfg = config.rotnet
    check_rotnet_config(cfg, training)
    backbone = interface.backbone_from_config(config)
    model = RotNetModel(backbone=backbone, head=cfg.head, head_feature=cfg.head_feature,
                        name=None)
    tx, lr_schedule = interface.optimizer_from_config(config, data_info)
    mean, std = interface.normalization(config)
    # A task that does not train only needs a shape to initialise the state with (the
    # parameters do not depend on it): any side will do when the views have none.
    crop = (view_size(cfg, data_info.image_shape) if training
            else cfg.crop_size or (data_info.image_shape or (224,))[0])
    if training:
        interface.warn_if_canvas_below_views(config, data_info, {
            "config.rotnet.crop_size": crop, "config.rotnet.resize": cfg.resize})
    return Setup(cfg=cfg, backbone=backbone, model=model, tx=tx, lr_schedule=lr_schedule,
                 mean=mean, std=std, crop=crop, eval_feature=config.eval.feature)


def init_state(s: Setup, key) -> TrainState:
    """The state at random initialisation (backbone + rotation head), step 0."""
    init_key, state_key = jax.random.split(key)
    dummy = jnp.zeros((1, s.crop, s.crop, 3), jnp.float32)
    variables = s.model.init({"params": init_key}, dummy, train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"],
                      opt_state=s.tx.init(variables["params"]), rng=state_key)


def image_view(s: Setup, key, image, size):
    """The geometric augmentation of the true (h, w) = `size` image of a uint8 canvas:
    RandomResizedCrop (config.rotnet.view='resized_crop', ImageNet), Resize + RandomCrop
    (config.rotnet.resize) or RandomCrop with zero padding (CIFAR: 32, pad 4), then a flip ->
    uint8 [crop, crop, 3]. An in-memory image that already has the
    view's size and no padding is used as it is."""
    crop_key, flip_key = jax.random.split(key)
    cfg = s.cfg
    if cfg.view == "resized_crop":
        image = geometric.random_resized_crop(crop_key, image, s.crop, tuple(cfg.crop_scale),
                                              size=size)
    elif cfg.resize:
        image = geometric.resize_random_crop(crop_key, image, size, cfg.resize, s.crop)
    elif cfg.crop_padding or image.shape[:2] != (s.crop, s.crop):
        image = geometric.random_crop_with_padding(crop_key, image, s.crop, cfg.crop_padding,
                                                   true_size=size)
    if cfg.flip:
        image = geometric.random_flip(flip_key, image)
    return image


def make_views(s: Setup, images, sizes, key) -> dict:
    """{'image': uint8 [B, crop, crop, 3]}: one view per canvas [B, S, S, 3] of true sizes
    [B, 2], one key per image."""
    keys = jax.random.split(key, images.shape[0])
    return {"image": jax.vmap(functools.partial(image_view, s))(keys, images, sizes)}


def rotation_loss(s: Setup, params, batch_stats, inputs, labels):
    """Cross-entropy of the rotation classifier on the 4B rotated inputs (train-mode BN).
    Returns (loss, (new batch_stats, logits))."""
    (logits, _), updates = s.model.apply({"params": params, "batch_stats": batch_stats}, inputs,
                                         train=True, mutable=["batch_stats"])
    return interface.cross_entropy(logits, labels), (updates["batch_stats"], logits)


def train_step(s: Setup, state: TrainState, batch):
    """One SGD step on all 4 rotations of every image of batch['image'] (uint8 [B, H, H, 3])."""
    inputs, labels = geometric.rotate4(interface.to_network_input(batch["image"], s.mean, s.std))
    loss_fn = functools.partial(rotation_loss, s, batch_stats=state.batch_stats, inputs=inputs,
                                labels=labels)
    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = {"loss": loss,
               "rotation_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "lr": s.lr_schedule(state.step)}
    return state.apply_gradients(grads, s.tx, batch_stats=batch_stats), metrics


def encode(s: Setup, state: TrainState, images):
    """Frozen features [B, D] of uint8 images: `config.eval.feature`, eval-mode BN, pooled."""
    return interface.encode_with(s.backbone, interface.backbone_variables(state), images,
                              s.eval_feature, s.mean, s.std)


def pretext_scores(s: Setup, state: TrainState, images):
    """Rotation accuracy per image (mean over its 4 rotations), eval-mode BatchNorm."""
    inputs, labels = geometric.rotate4(interface.to_network_input(images, s.mean, s.std))
    logits, _ = s.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              inputs, train=False)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"rotation_accuracy": correct.reshape(-1, 4).mean(axis=1)}


def create(config, data_info: interface.DataInfo, training: bool = True) -> interface.Method:
    """RotNet's `Method` for `config` (InputError naming a bad field; `training` False: only the
    checks that a trained state's use needs)."""
    return interface.bind(setup(config, data_info, training), init_state=init_state,
                          train_step=train_step, make_views=make_views, encode=encode,
                          pretext_scores=pretext_scores)
