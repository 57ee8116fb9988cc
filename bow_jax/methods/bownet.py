"""BoWNet (Gidaris et al., CVPR 2020): predict the bag of visual words of a frozen teacher.

One training step (paper section 2):
  1. the frozen teacher (eval-mode BatchNorm) maps the *unperturbed* image x to its feature map
     `config.bownet.teacher_layer`; every location goes to its nearest word of the fixed k-means
     vocabulary (eq. 1) and the words are pooled into an L1-normalised BoW y(x): a histogram
     (eq. 3, CIFAR-100 / MiniImageNet) or word presence (eq. 4, ImageNet);
  2. the student sees a perturbed view g(x): random resized crop (scale and aspect-ratio
     distortion) and flip (geometric, `make_views`), colour jitter and grayscale (photometric, in
     the step), then CutMix with a shuffled partner, whose target is lam·y(xA) + (1-lam)·y(xB) with
     1 - lam the pasted area ratio;
  3. the head is the cosine BoW layer of eq. 5 (L2-normalised word weights, one learnable gamma)
     on the student's pooled feature, trained with the soft cross-entropy of eq. 6.

Choices the paper leaves open, made here:
  * border: `config.bownet.border` locations are skipped at the map's edge (0 by default: eq. 1-3
    run over all U = h·w locations, and on the 8x8 CIFAR maps a 1-location border would drop 28 of
    the 64 words). The vocabulary is built on the same locations.
  * Sp-BoWNet (`pyramid=True`): the 1x1 map + 2x2 cells give 5 BoWs; each has its own cosine head
    (own weights and gamma) on the same pooled feature, and the loss is the mean of the 5 soft
    cross-entropies. Following the paper literally, the cells are those of the unperturbed image
    even when the student's view is flipped.
  * gamma starts at `gamma_init` (1.0, not given in the paper).

State: a `TrainState` subclass that also holds the frozen teacher's backbone variables and the
vocabulary, so a checkpoint is self-contained; neither is ever updated. Both are read from the
previous stages' outputs (`config.bownet.teacher_workdir`, `config.bownet.vocabulary`, written by
the task `bownet_chain`) by `create`, so those paths must exist when a run starts or resumes.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bow_jax.bow import build, quantize
from bow_jax.data import augment, geometric, photometric
from bow_jax.lib import checkpoint, config_checks
from bow_jax.lib.errors import InputError, MissingInputError
from bow_jax.lib.state import TrainState
from bow_jax.methods import interface
from bow_jax.models import check_feature_names, create_backbone, feature_dims, heads

TARGET_MODES = ("histogram", "binary")
PYRAMID_GRIDS = (1, 2)  # whole map, then the 2x2 cells: 5 BoWs


def default_config() -> ml_collections.ConfigDict:
    """config.bownet."""
    b = ml_collections.ConfigDict()
    # Inputs from the previous stages (the chain sets them).
    b.teacher_workdir = ""  # workdir of the frozen teacher's run (RotNet or a BoWNet round)
    b.vocabulary = ""  # vocabulary .npz written by the vocabulary stage
    # BoW targets.
    b.teacher_layer = "layer3"  # teacher feature map quantised into visual words
    b.num_words = 2048  # K
    b.target = "histogram"  # 'histogram' (eq. 3) | 'binary' (eq. 4)
    b.border = 0  # locations skipped on each side of the teacher map (targets and vocabulary)
    b.pyramid = False  # Sp-BoWNet: 1x1 + 2x2 grids, 5 BoWs, one head each
    # Student and head.
    b.student_feature = "pooled"  # backbone output the BoW head reads (maps are average-pooled)
    b.gamma_init = 1.0
    # Views: the teacher sees the unperturbed image, the student g(x); both view_size square.
    b.view_size = 0  # 0: the stored image size (in-memory data); ImageNet: 224
    b.teacher_resize = 0  # > 0: the teacher's view is Resize(teacher_resize) + CenterCrop(
    #                       view_size) (ImageNet: 256); 0: the whole image resized to view_size
    # Perturbations g(.) of the student view.
    b.crop_scale = (0.2, 1.0)  # random resized crop: area fraction (32x32 CIFAR: not below 0.2)
    b.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio distortion
    b.flip = True
    b.jitter = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    b.jitter_p = 0.8
    b.gray_p = 0.2
    b.cutmix = True
    b.cutmix_beta = 1.0  # lam ~ Beta(1, 1) = U(0, 1): "size sampled from a uniform distribution"
    # Vocabulary stage (task 'bownet_chain', bow_jax.bow.build).
    b.vocab_images = 0  # use a random subset of this many training images (0 = all)
    b.vocab_max_vectors = 0  # cap: each image gives floor(cap / images) random locations (0 = all)
    b.kmeans_method = "lloyd"  # 'lloyd' | 'minibatch'
    b.kmeans_iters = 50
    b.kmeans_tol = 1e-4
    b.kmeans_n_init = 1
    # The chain (task 'bownet_chain').
    b.rounds = 1  # BoWNet rounds: 2 or 3 = BoWNet x2, x3 (each student teaches the next round)
    b.rotnet = ml_collections.ConfigDict()  # full config of the RotNet pre-training stage
    b.eval_features = ()  # features the chain scores every stage on (() = (config.eval.feature,))
    return b


# ------------------------------------------------------------------------------------------------
# State, teacher and vocabulary


@flax.struct.dataclass
class BoWNetState(TrainState):
    teacher: Any  # {'params', 'batch_stats'} of the frozen teacher backbone; never updated
    vocabulary: jax.Array  # [K, C] k-means centroids; never updated


def teacher_checkpoint(workdir: str, field: str = "config.bownet.teacher_workdir"):
    """(step, config dict) of the latest checkpoint of the teacher run in `workdir`; InputError
    when `workdir` is empty, MissingInputError naming `field` when it holds no checkpoint."""
    if not workdir:
        raise InputError(f"{field} is empty: BoWNet needs the workdir of a trained teacher "
                         "(RotNet or a previous BoWNet round).")
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise MissingInputError(f"{field}={workdir!r}: no checkpoints folder {directory}.")
    ckpt = checkpoint.Checkpointer(directory)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise MissingInputError(f"{field}={workdir!r}: no checkpoint in {directory}.")
        return step, ckpt.read_meta(step)["config"]
    finally:
        ckpt.close()


def load_teacher_variables(workdir: str, step: int) -> dict:
    """The teacher backbone's variables {'params', 'batch_stats'} at `step`, as numpy (restored
    without a target tree, so any method's state works: RotNet and BoWNet both keep their
    backbone under 'backbone'). InputError when the checkpoint has no backbone."""
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state = ckpt.restore(None, step=step)
    finally:
        ckpt.close()
    try:
        variables = interface.backbone_variables(types.SimpleNamespace(
            params=state["params"], batch_stats=state["batch_stats"]))
    except (KeyError, TypeError) as e:
        raise InputError(f"The teacher checkpoint {workdir}/checkpoints/{step} has no 'backbone' "
                         "variables; expected a RotNet or BoWNet run.") from e
    return jax.tree.map(np.asarray, variables)


def teacher_backbone(teacher_config: dict) -> nn.Module:
    """The teacher's backbone, rebuilt from the `model` block of its own checkpointed config."""
    model = teacher_config["model"]
    return create_backbone(model["name"], **dict(model.get("kwargs") or {}))


# ------------------------------------------------------------------------------------------------
# Targets, CutMix, model


def bow_targets(fmap, vocabulary, cfg) -> jax.Array:
    """BoW targets of the teacher map [B,h,w,C]: [B,K], or [B,5,K] with `cfg.pyramid`."""
    return quantize.bownet_targets(fmap, vocabulary, mode=cfg.target, pyramid=cfg.pyramid,
                                   border=cfg.border)


def cutmix_bows(key, images, targets, beta: float):
    """CutMix of the student's images with BoW targets [B,K] or [B,P,K] (pyramid): every BoW is
    mixed as lam·y(xA) + (1-lam)·y(xB), lam = 1 - pasted area / image area."""
    flat = targets.reshape(targets.shape[0], -1)
    mixed, flat = geometric.cutmix(key, images, flat, beta)
    return mixed, flat.reshape(targets.shape)


class BoWNetModel(nn.Module):
    """Student backbone + cosine BoW head(s) (eq. 5) on its pooled feature.

    Returns (logits [B,K] or [B,num_bows,K], backbone outputs).
    """
    backbone: nn.Module
    num_words: int
    num_bows: int = 1
    feature: str = "pooled"
    gamma_init: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool):
        features = self.backbone(x, train=train)
        z = interface.pooled(features[self.feature])
        if self.num_bows == 1:
            head = heads.CosineBoWHead(self.num_words, self.gamma_init, name="bow_head")
            return head(z), features
        logits = [heads.CosineBoWHead(self.num_words, self.gamma_init, name=f"bow_head_{i}")(z)
                  for i in range(self.num_bows)]
        return jnp.stack(logits, axis=1), features


def bow_loss(logits, targets) -> jax.Array:
    """Eq. 6: soft cross-entropy, averaged over images (and over the pyramid's BoWs)."""
    k = logits.shape[-1]
    return interface.soft_cross_entropy(logits.reshape(-1, k), targets.reshape(-1, k))


def check_bownet_config(cfg, training: bool = True) -> None:
    """InputError naming the config.bownet field: the targets' settings always (they shape the
    state and the teacher's map); the views and the student's perturbations (tuple fields
    checked for length and range, probabilities) when `training`."""
    if cfg.target not in TARGET_MODES:
        raise InputError(f"config.bownet.target={cfg.target!r}; expected one of {TARGET_MODES}.")
    if cfg.border < 0:
        raise InputError(f"config.bownet.border={cfg.border}; expected >= 0.")
    if cfg.num_words < 2:
        raise InputError(f"config.bownet.num_words={cfg.num_words}; expected >= 2.")
    if training:
        check_bownet_views(cfg)


def view_shape(cfg, image_shape) -> tuple:
    """(side, side, 3) of both views: config.bownet.view_size, or the stored images' shape
    (in-memory data). InputError naming the field when streamed images (sizes vary) have none."""
    if cfg.view_size:
        return (int(cfg.view_size), int(cfg.view_size), 3)
    if image_shape is None:
        raise InputError("config.bownet.view_size=0 takes the stored images' size, but these "
                         "are streamed (sizes vary); set it, e.g. 224 with "
                         "config.bownet.teacher_resize=256 on ImageNet.")
    return tuple(image_shape)

def check_bownet_views(cfg) -> None:
    """The student's perturbations g(.): crop scale and ratio ranges, colour jitter strengths,
    probabilities, the CutMix beta; InputError naming the field."""
    if cfg.view_size < 0 or cfg.teacher_resize < 0 or (
            cfg.teacher_resize and cfg.teacher_resize < cfg.view_size):
        raise InputError(f"config.bownet.view_size={cfg.view_size}, teacher_resize="
                         f"{cfg.teacher_resize}; expected both >= 0 and teacher_resize (when "
                         "set) at least view_size (the centre crop must fit).")
    config_checks.interval(cfg.crop_scale, "config.bownet.crop_scale", 0.0, 1.0,
                           "(min, max) area fraction of the random resized crop")
    config_checks.interval(cfg.crop_ratio, "config.bownet.crop_ratio", 0.0, None,
                           "(min, max) aspect ratio of the random resized crop")
    config_checks.color_jitter(cfg.jitter, "config.bownet.jitter")
    for field in ("jitter_p", "gray_p"):
        config_checks.probability(cfg[field], f"config.bownet.{field}")
    if cfg.cutmix and not cfg.cutmix_beta > 0:
        raise InputError(f"config.bownet.cutmix_beta={cfg.cutmix_beta!r}; expected > 0 (the "
                         "Beta(beta, beta) of CutMix's area).")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What BoWNet's functions need besides the state and the batch, fixed by `create`; the
    frozen teacher's variables and the vocabulary are read on the host (numpy) by `create`."""
    cfg: Any  # config.bownet
    backbone: nn.Module  # the student's
    model: BoWNetModel
    teacher: nn.Module
    teacher_variables: Any  # {'params', 'batch_stats'} numpy
    vocabulary: np.ndarray  # [K, C] float32
    tx: optax.GradientTransformation
    lr_schedule: Callable
    mean: tuple
    std: tuple
    view_shape: tuple  # (H, W, 3) of both views (`view_shape`)
    eval_feature: str  # config.eval.feature


def teacher_map_shape(cfg, teacher: nn.Module, teacher_config: dict, view_shape) -> tuple:
    """[1, h, w, C] of the teacher's `teacher_layer` on one view [H, W, 3]; InputError naming
    config.bownet.teacher_layer (or pyramid) when it is not a map BoWNet can quantise."""
    dims = feature_dims(teacher, (1,) + tuple(view_shape))
    check_feature_names([cfg.teacher_layer], dims, "config.bownet.teacher_layer",
                        teacher_config["model"]["name"])
    shape = dims[cfg.teacher_layer]
    if len(shape) != 4:
        raise InputError(f"config.bownet.teacher_layer={cfg.teacher_layer!r} is not a feature "
                         f"map (shape {shape}); choose a convolutional layer.")
    if cfg.pyramid and min(shape[1:3]) - 2 * cfg.border < 2:
        raise InputError("config.bownet.pyramid needs a teacher map of at least 2x2 locations "
                         "after the border.")
    return shape


def load_frozen_inputs(cfg, view_shape):
    """(teacher backbone, its variables as numpy, vocabulary [K, C] float32) from the previous
    stages (`teacher_workdir`, `vocabulary`), checked against each other and the config."""
    teacher_step, teacher_config = teacher_checkpoint(cfg.teacher_workdir)
    teacher = teacher_backbone(teacher_config)
    channels = teacher_map_shape(cfg, teacher, teacher_config, view_shape)[-1]
    centroids, meta = build.read_vocabulary(cfg.vocabulary)
    build.check_vocabulary(meta, centroids.shape, teacher_step=teacher_step,
                           layer=cfg.teacher_layer, border=cfg.border, num_words=cfg.num_words,
                           channels=channels, path=cfg.vocabulary)
    return teacher, load_teacher_variables(cfg.teacher_workdir, teacher_step), centroids


def setup(config, data_info: interface.DataInfo, training: bool = True) -> Setup:
    """The student, the frozen teacher and vocabulary, the optimizer; every check made before
    anything is compiled (InputError / MissingInputError naming the config field; `training`
    False skips the perturbations' checks)."""
    cfg = config.bownet
    check_bownet_config(cfg, training)
    shape = view_shape(cfg, data_info.image_shape) if training or cfg.view_size or (
        data_info.image_shape is not None) else (224, 224, 3)  # not training: any shape will do
    if training:
        interface.warn_if_canvas_below_views(config, data_info, {
            "config.bownet.view_size": shape[0],
            "config.bownet.teacher_resize": cfg.teacher_resize})
    teacher, teacher_variables, centroids = load_frozen_inputs(cfg, shape)
    backbone = interface.backbone_from_config(config)
    check_feature_names([cfg.student_feature, config.eval.feature],
                        feature_dims(backbone, (1,) + shape),
                        "config.bownet.student_feature / config.eval.feature", config.model.name)
    num_bows = sum(n * n for n in PYRAMID_GRIDS) if cfg.pyramid else 1
    model = BoWNetModel(backbone=backbone, num_words=cfg.num_words, num_bows=num_bows,
                        feature=cfg.student_feature, gamma_init=cfg.gamma_init)
    tx, lr_schedule = interface.optimizer_from_config(config, data_info)
    mean, std = interface.normalization(config)
    return Setup(cfg=cfg, backbone=backbone, model=model, teacher=teacher,
                 teacher_variables=teacher_variables, vocabulary=centroids, tx=tx,
                 lr_schedule=lr_schedule, mean=mean, std=std,
                 view_shape=shape, eval_feature=config.eval.feature)


def init_state(s: Setup, key) -> BoWNetState:
    """The student at random initialisation, with the frozen teacher and vocabulary.

    The teacher's variables and the vocabulary are host arrays closed over, so under `jax.jit`
    they are constants of this one program (compiled once per run start, when no checkpoint
    exists); a checkpoint then carries them.
    """
    init_key, state_key = jax.random.split(key)
    variables = s.model.init({"params": init_key}, jnp.zeros((1,) + s.view_shape),
                             train=False)
    return BoWNetState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=s.tx.init(variables["params"]), rng=state_key,
                       teacher=jax.tree.map(jnp.asarray, s.teacher_variables),
                       vocabulary=jnp.asarray(s.vocabulary, jnp.float32))


def teacher_view(s: Setup, image, size):
    """The unperturbed view x of the true (h, w) = `size` image of a uint8 canvas: Resize(
    teacher_resize) + CenterCrop(view), or the whole image resized to the view's size (an
    in-memory image of that size: itself) -> uint8 [H, W, 3]."""
    return geometric.resize_center_crop(image, size, s.cfg.teacher_resize, s.view_shape[:2])


def student_view(s: Setup, key, image, size):
    """g(x)'s geometric part: random resized crop (scale and aspect-ratio distortion) + flip of
    the true image of a uint8 canvas -> uint8 [H, W, 3]."""
    crop_key, flip_key = jax.random.split(key)
    view = geometric.random_resized_crop(crop_key, image, s.view_shape[:2],
                                         tuple(s.cfg.crop_scale), tuple(s.cfg.crop_ratio),
                                         size=size)
    return geometric.random_flip(flip_key, view) if s.cfg.flip else view


def make_views(s: Setup, images, sizes, key) -> dict:
    """{'teacher': the unperturbed views, 'student': g(x)'s geometric part} (uint8 [B, H, W, 3])
    of canvases [B, S, S, 3] with true sizes [B, 2], one key per image."""
    keys = jax.random.split(key, images.shape[0])
    return {"teacher": jax.vmap(functools.partial(teacher_view, s))(images, sizes),
            "student": jax.vmap(functools.partial(student_view, s))(keys, images, sizes)}


def teacher_bows(s: Setup, state: BoWNetState, images):
    """Eq. 1-4: the frozen teacher's (eval-mode BN) BoW targets of uint8 images, [B, K] or
    [B, 5, K] with the pyramid."""
    fmap = s.teacher.apply(state.teacher, interface.to_network_input(images, s.mean, s.std),
                           train=False)[s.cfg.teacher_layer]
    return bow_targets(fmap.astype(jnp.float32), state.vocabulary, s.cfg)


def student_inputs(s: Setup, key, images):
    """Photometric perturbation (colour jitter, grayscale) and normalisation of uint8 views."""
    cfg = s.cfg
    x = photometric.photometric(key, augment.to_float(images), jitter=tuple(cfg.jitter),
                                jitter_p=cfg.jitter_p, gray_p=cfg.gray_p, blur_p=0.0, flip=False)
    return augment.normalize(x, s.mean, s.std)


def student_loss(s: Setup, params, batch_stats, inputs, targets):
    """Eq. 6 on the student's train-mode logits. Returns (loss, (new batch_stats, logits))."""
    (logits, _), updates = s.model.apply({"params": params, "batch_stats": batch_stats}, inputs,
                                         train=True, mutable=["batch_stats"])
    return bow_loss(logits, targets), (updates["batch_stats"], logits)


def step_metrics(s: Setup, state: BoWNetState, loss, targets, logits) -> dict:
    """Loss, lr, gamma, the targets' perplexities, and whether the predicted most likely word is
    among the image's target words (all on the whole-image BoW)."""
    whole = targets[:, 0] if s.cfg.pyramid else targets  # the 1x1 BoW
    perp_image, perp_batch = quantize.perplexity(whole)
    head = state.params["bow_head_0" if s.cfg.pyramid else "bow_head"]
    top_logits = logits[:, 0] if s.cfg.pyramid else logits
    return {"loss": loss, "lr": s.lr_schedule(state.step), "gamma": head["gamma"],
            "target_perplexity_image": perp_image, "target_perplexity_batch": perp_batch,
            "top_word_hit": jnp.mean(jnp.take_along_axis(
                whole, jnp.argmax(top_logits, -1)[:, None], axis=-1) > 0)}


def train_step(s: Setup, state: BoWNetState, batch):
    """One BoWNet step (module docstring): teacher targets, perturbed student, CutMix, eq. 6."""
    photo_key, mix_key = jax.random.split(state.step_key())
    targets = teacher_bows(s, state, batch["teacher"])
    inputs = student_inputs(s, photo_key, batch["student"])
    if s.cfg.cutmix:
        inputs, targets = cutmix_bows(mix_key, inputs, targets, s.cfg.cutmix_beta)
    loss_fn = functools.partial(student_loss, s, batch_stats=state.batch_stats, inputs=inputs,
                                targets=targets)
    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = step_metrics(s, state, loss, targets, logits)
    return state.apply_gradients(grads, s.tx, batch_stats=batch_stats), metrics


def encode(s: Setup, state: BoWNetState, images):
    """Frozen student features [B, D] of uint8 images: `config.eval.feature`, eval-mode BN."""
    return interface.encode_with(s.backbone, interface.backbone_variables(state), images,
                              s.eval_feature, s.mean, s.std)


def pretext_scores(s: Setup, state: BoWNetState, images):
    """Per held-out image, eval-mode BN, no perturbation: is the student's most likely word one
    of the words the teacher finds in the image (the whole-image BoW)?"""
    targets = teacher_bows(s, state, images)
    logits, _ = s.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              interface.to_network_input(images, s.mean, s.std), train=False)
    if s.cfg.pyramid:
        targets, logits = targets[:, 0], logits[:, 0]
    hit = jnp.take_along_axis(targets, jnp.argmax(logits, -1)[:, None], axis=-1)[:, 0] > 0
    return {"bow_top_word_hit": hit.astype(jnp.float32)}


def create(config, data_info: interface.DataInfo, training: bool = True) -> interface.Method:
    """BoWNet's `Method` for `config`; reads the frozen teacher and vocabulary now (errors: see
    `setup`)."""
    return interface.bind(setup(config, data_info, training), init_state=init_state,
                          train_step=train_step, make_views=make_views, encode=encode,
                          pretext_scores=pretext_scores)
