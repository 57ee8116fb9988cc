"""OBoW (Gidaris et al., CVPR 2021): online bag-of-visual-words generation.

A student sees crops of an image and predicts, with a dynamic BoW head, the bag of visual words of
the whole image as seen by a teacher (an EMA of the student). The visual words are a queue of
teacher features that is refreshed every step. One step, in the order of the official
`OBoW.forward` (github.com/valeoai/obow):

1. snapshot the vocabulary of every BoW level (here: the state's arrays, which are values);
2. student: one backbone pass per crop group (all crops, then all patches; BatchNorm statistics
   per group), the pooled last-layer vector; the BoW head's logits per level against the snapshot;
3. teacher: EMA of the student's *params* with the pre-step student, momentum annealed from 0.99
   to 1 by a per-step cosine; a train-mode forward (batch statistics; it keeps its own running
   statistics) on the teacher view; per level: border skip, distances, running mean-min-distance
   statistic updated with this batch *before* the codes, soft codes, max-pool, L1 (no gradient);
   then one new word per image of the global batch is written into the FIFO queue;
4. loss = per crop group the mean over levels of the soft cross-entropy (targets repeated
   image-major over the group's crops), summed over groups;
5. optional monitor: a linear classifier on the detached teacher features (needs labels);
6. one SGD step on the student backbone, the weight generators (and the monitor).

Views (`make_views`, on the device, from in-memory or streamed canvases alike): the teacher
view (Resize + CenterCrop + flip, no colour), `num_crops` RandomResizedCrops, and `num_patches` of
the 3x3 jittered grid patches cut from one RandomResizedCrop. Colour jitter, grayscale, blur and
the crops' flips run inside `train_step`; the patches of an image share one photometric draw.

Ablations of the paper (Table 1 / appendix D): `config.obow.vocabulary='online_kmeans'` with
`kmeans_assignment` 'hard' (rare-word reseeding) or 'sinkhorn' (balanced codes for both the k-means
update and the targets), and `word_sampling` 'local_average' | 'local_features' | 'global_average'.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bow_jax.bow import quantize, vocabulary
from bow_jax.data import augment, geometric, photometric
from bow_jax.lib import config_checks, ops, schedules
from bow_jax.lib.errors import InputError
from bow_jax.lib.state import TrainState
from bow_jax.methods import interface
from bow_jax.models import check_feature_names, feature_dims, heads

VOCABULARIES = ("queue", "online_kmeans")
KMEANS_ASSIGNMENTS = ("hard", "sinkhorn")


@flax.struct.dataclass
class OBoWState(TrainState):
    """TrainState plus the teacher and the BoW machinery (everything a resumed run needs).

    params / batch_stats: {'backbone', 'bow_head'[, 'monitor']} of the student side.
    teacher_params / teacher_batch_stats: the teacher backbone (EMA of params; own BN statistics).
    vocabularies: per BoW level, the words [K, C_l] (queue, or online k-means centroids).
    pointers: per level, the queue's int32 write pointer.
    mean_min_dist: per level, the running mean of the per-location minimum distance (starts 0.5).
    kmeans: per level {'ema_counts', 'ema_sums', 'steps_since_used'} for online k-means, else ().
    """
    teacher_params: Any
    teacher_batch_stats: Any
    vocabularies: tuple
    pointers: tuple
    mean_min_dist: tuple
    kmeans: tuple


def default_config() -> ml_collections.ConfigDict:
    """config.obow: the ImageNet ResNet-50 recipe's values (official ResNet50_OBoW_full.yaml)."""
    o = ml_collections.ConfigDict()
    # BoW targets and vocabulary.
    o.bow_levels = ("layer3", "layer4")  # backbone outputs used as BoW levels (conv4, conv5)
    o.num_words = 8192  # K, per level
    o.inv_delta = 15.0  # 1 / delta_base (15 for ResNet-50, 10 for ResNet-18); <= 0: hard codes
    o.stat_momentum = 0.99  # of the running mean-min-distance statistic
    o.teacher_distance = "l2"  # 'l2' (official: raw squared L2) | 'cosine' (L2-normalised
    #                            teacher features and words; the authors found no significant
    #                            difference on ImageNet, valeoai/obow issue #2)
    o.border = 1  # locations skipped on each side of a teacher map
    o.bow_pool = "max"  # 'max' (official) or 'avg'
    o.vocabulary = "queue"  # 'queue' | 'online_kmeans' (appendix D ablation)
    o.word_sampling = "local_average"  # queue words: 'local_average'|'local_features'|'global_average'
    o.kmeans_assignment = "hard"  # online k-means: 'hard' (+ reseeding) | 'sinkhorn'
    o.kmeans_momentum = 0.99  # gamma of eq. 6-7
    o.reseed_after = 1000  # steps without being a nearest word before a word is reseeded
    o.sinkhorn_iters = 3
    # Student head.
    o.kappa = 8.0  # 8 for ResNet-50, 5 for ResNet-18
    o.learn_kappa = False
    o.hidden_dim = 0  # weight generator hidden width; 0: 2 x the student's pooled dimension
    # Teacher.
    o.teacher_momentum = 0.99  # base of the cosine schedule to 1 over all training steps
    # Views (ImageNet sizes; CIFAR configs scale them down).
    o.teacher_size = 224
    o.teacher_resize = 256  # Resize(shorter side) before CenterCrop(teacher_size); 0: resize the
    #                         whole image to teacher_size (in-memory data of another size)
    o.flip = True  # random horizontal flips of every view (off for digits)
    o.num_crops = 2
    o.crop_size = 160
    o.crop_scale = (0.08, 0.6)
    o.num_patches = 5  # 0: no patch group (ResNet-18 vanilla)
    o.patch_size = 96
    o.patch_source_size = 256  # the RandomResizedCrop the patches are cut from
    o.patch_source_scale = (0.6, 1.0)
    o.patch_jitter = 24
    # Photometric augmentation of the student's views (crops; patches without blur).
    o.color_jitter = (0.4, 0.4, 0.4, 0.1)
    o.color_jitter_p = 0.8
    o.grayscale_p = 0.2
    o.blur_p = 0.5
    o.blur_sigma = (0.1, 2.0)
    # Monitor (not part of the method): a linear classifier on the detached, pooled teacher
    # features, trained on the batch's labels; its training accuracy tracks the teacher's
    # quality during training. Its loss is added to the total but cannot reach the backbones.
    o.monitor = False
    o.monitor_feature = "layer4"
    o.num_classes = 0
    return o


# ------------------------------------------------------------------------------------------------
# Pieces of the step (pure functions; tests check each against numpy).


def ema_update(teacher_params, student_params, momentum):
    """theta_T <- momentum * theta_T + (1 - momentum) * theta_S, leaf by leaf (params only)."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                        teacher_params, student_params)


def expand_targets(bow: jax.Array, copies: int) -> jax.Array:
    """[B, K] -> [B * copies, K], image-major (row i * copies + j is image i), matching the crops'
    flattening [B, copies, ...] -> [B * copies, ...] (the official `expand_target`)."""
    return jnp.repeat(bow, copies, axis=0)


def bow_prediction_loss(logits_per_group: Sequence[Sequence[jax.Array]],
                        targets: Sequence[jax.Array],
                        crops_per_group: Sequence[int]):
    """OBoW loss: sum over crop groups of the mean over levels of the soft cross-entropy.

    logits_per_group[g][l]: [B * n_g, K_l]; targets[l]: [B, K_l]. Returns (total, per-group list).
    Soft cross-entropy has the official KL loss's gradient; its value is KL + entropy(target).
    """
    group_losses = []
    for logits, copies in zip(logits_per_group, crops_per_group):
        per_level = [interface.soft_cross_entropy(lg, expand_targets(t, copies))
                     for lg, t in zip(logits, targets)]
        group_losses.append(jnp.mean(jnp.stack(per_level)))
    return sum(group_losses), group_losses


def student_forward(backbone, params, batch_stats, groups: Sequence[jax.Array]):
    """One train-mode backbone pass per crop group, in order, threading the BN running statistics.

    Returns ([pooled [N_g, C] per group], batch_stats after all groups). Each group is normalised
    by its own batch statistics, and the running statistics are updated once per group, as the
    official student that is called separately on the 160 crops and on the 96 patches.
    """
    def apply(p, stats, x):
        feats, updates = backbone.apply({"params": p, "batch_stats": stats}, x, train=True,
                                        mutable=["batch_stats"])
        return feats["pooled"], updates["batch_stats"]

    pooled = []
    for x in groups:
        z, batch_stats = apply(params, batch_stats, x)
        pooled.append(z)
    return pooled, batch_stats


def _sinkhorn_level_targets(fmap, vocab, mean_min_dist, *, inv_delta, momentum, pool, border,
                            iters):
    """Appendix D (b): Sinkhorn-balanced codes over all locations of the global batch.

    Same statistic as the soft codes (updated before use); the transport cost is dist / m_new
    and epsilon = 1 / inv_delta, so the unbalanced limit is exactly the soft assignment
    (choice: the paper gives no epsilon). Returns (bow, m_new, aux, codes [N, K]).
    """
    fmap = quantize.skip_border(fmap.astype(jnp.float32), border)
    dist = quantize.squared_distances(fmap, vocab)
    mu = jnp.mean(jnp.min(dist, axis=-1))
    m_new = momentum * mean_min_dist + (1.0 - momentum) * mu
    b, h, w, k = dist.shape
    epsilon = 1.0 / inv_delta if inv_delta > 0 else 0.05
    codes = vocabulary.sinkhorn(-(dist / m_new).reshape(b * h * w, k), iters, epsilon)
    bow = jax.lax.stop_gradient(quantize.reduce_codes(codes.reshape(b, h, w, k), pool))
    perp_image, perp_batch = quantize.perplexity(bow)
    aux = {"min_dist_mean": mu, "perplexity_image": perp_image, "perplexity_batch": perp_batch}
    return bow, jax.lax.stop_gradient(m_new), aux, jax.lax.stop_gradient(codes)


def level_targets(cfg, fmap, vocab, mean_min_dist):
    """Soft (or Sinkhorn-balanced) BoW targets of one level's teacher map [B, h, w, C] against
    `vocab` [K, C] (OBoW eq. 4; appendix D for 'sinkhorn'); the running mean-min-distance
    statistic is updated with this batch before the codes.

    With teacher_distance 'cosine' the map and the words are L2-normalised first. Returns (bow
    [B, K], mean_min_dist, aux, codes [N, K] for Sinkhorn else None, the compared map, the
    compared words).
    """
    if cfg.teacher_distance == "cosine":
        fmap = ops.l2_normalize(fmap.astype(jnp.float32))
        vocab = ops.l2_normalize(vocab)
    if cfg.vocabulary == "online_kmeans" and cfg.kmeans_assignment == "sinkhorn":
        bow, m_new, aux, codes = _sinkhorn_level_targets(
            fmap, vocab, mean_min_dist, inv_delta=cfg.inv_delta, momentum=cfg.stat_momentum,
            pool=cfg.bow_pool, border=cfg.border, iters=cfg.sinkhorn_iters)
    else:
        bow, m_new, aux = quantize.obow_level_targets(
            fmap, vocab, mean_min_dist, inv_delta=cfg.inv_delta if cfg.inv_delta > 0 else None,
            momentum=cfg.stat_momentum, pool=cfg.bow_pool, border=cfg.border)
        codes = None
    return bow, m_new, aux, codes, fmap, vocab


def update_vocabulary(cfg, level: str, teacher_map, vocab, pointer, kmeans, codes, key):
    """One level's vocabulary after this step: the queue gets one new word per image of the
    global batch (FIFO), or online k-means moves its centroids (appendix D, eq. 6-7).

    teacher_map: the level's map [B, h, w, C] as compared (no gradient). Returns (vocab, pointer,
    kmeans).
    """
    if cfg.vocabulary == "queue":
        words = vocabulary.sample_words(key, teacher_map, cfg.word_sampling, border=cfg.border,
                                        level=level)
        if cfg.teacher_distance == "cosine":
            words = ops.l2_normalize(words)
        vocab, pointer = vocabulary.update_queue(vocab, pointer, words)
        return vocab, pointer, kmeans
    cropped = quantize.skip_border(teacher_map, cfg.border)
    km = vocabulary.OnlineKMeansState(vocab, kmeans["ema_counts"], kmeans["ema_sums"],
                                      kmeans["steps_since_used"])
    km = vocabulary.online_kmeans_update(
        km, cropped.reshape(-1, cropped.shape[-1]), key=key, momentum=cfg.kmeans_momentum,
        reseed_after=cfg.reseed_after if codes is None else None, codes=codes)
    return km.centroids, pointer, {"ema_counts": km.ema_counts, "ema_sums": km.ema_sums,
                                   "steps_since_used": km.steps_since_used}


def teacher_level_update(cfg, level: str, fmap, vocab, pointer, mean_min_dist, kmeans, key):
    """Targets of one BoW level from the teacher map, and the level's updated vocabulary state.

    Targets use `vocab` as it was before this step (the student's snapshot); the statistic is
    updated with this batch before the codes; then the vocabulary is updated (queue write or
    online k-means). Returns (bow [B, K], (vocab, pointer, mean_min_dist, kmeans), aux).
    """
    bow, m_new, aux, codes, fmap, vocab = level_targets(cfg, fmap, vocab, mean_min_dist)
    teacher_map = jax.lax.stop_gradient(fmap.astype(jnp.float32))
    vocab, pointer, kmeans = update_vocabulary(cfg, level, teacher_map, vocab, pointer, kmeans,
                                               codes, key)
    return bow, (vocab, pointer, m_new, kmeans), aux


def augment_views(key, batch, cfg, mean, std):
    """Photometric augmentation and normalisation of a batch of uint8 views.

    Returns (teacher input [B, S, S, 3], student groups [crops [B*n, h, w, 3], patches
    [B*V, p, p, 3]] flattened image-major, crops per image of each group). Each crop gets its own
    draw (jitter, grayscale, blur, flip); the patches of one image share one draw without blur.
    """
    k_crops, k_patches = jax.random.split(key)
    recipe = dict(jitter=tuple(cfg.color_jitter), jitter_p=cfg.color_jitter_p,
                  gray_p=cfg.grayscale_p, blur_sigma=tuple(cfg.blur_sigma), flip=cfg.flip)
    teacher = interface.to_network_input(batch["teacher"], mean, std)
    crops = batch["crops"]
    b, n = crops.shape[:2]
    flat = crops.reshape((b * n,) + crops.shape[2:])
    x = photometric.photometric(k_crops, augment.to_float(flat), blur_p=cfg.blur_p, **recipe)
    groups, copies = [augment.normalize(x, mean, std)], [n]
    if cfg.num_patches > 0:
        patches = batch["patches"]
        v = patches.shape[1]
        # One coin flips all patches of an image: the official code flips the source crop
        # before cutting, which mirrors the (symmetric when S - P - jitter is even) patch grid,
        # so the distribution of the views is the same.
        y = photometric.photometric(k_patches, augment.to_float(patches), blur_p=0.0, **recipe)
        groups.append(augment.normalize(y.reshape((b * v,) + y.shape[2:]), mean, std))
        copies.append(v)
    return teacher, groups, copies


# ------------------------------------------------------------------------------------------------
# Checks made before anything is compiled.


def check_obow_config(config, level_shapes: dict, training: bool = True) -> None:
    """Clear errors for choices that would otherwise fail deep inside a compiled step: InputError
    naming the field, its value and what is expected.

    `training` False (evaluate, export, fine-tune): only what defines the state and the
    teacher's maps; True adds the views' settings and the global batch's (queue writes)."""
    cfg = config.obow
    check_obow_choices(cfg)
    if training:
        check_obow_views(cfg)
        if cfg.vocabulary == "queue":
            vocabulary.check_queue_divisible(cfg.num_words, config.batch_size)
    check_level_shapes(cfg, level_shapes)


def _check_choice(cfg, field: str, choices) -> None:
    value = cfg[field]
    if value not in choices:
        raise InputError(f"config.obow.{field}={value!r}; expected one of {list(choices)}.")


def check_obow_choices(cfg) -> None:
    """The named choices of config.obow (vocabulary, assignment, sampling, distance, pooling)
    and the monitor; InputError naming the field."""
    _check_choice(cfg, "vocabulary", VOCABULARIES)
    _check_choice(cfg, "kmeans_assignment", KMEANS_ASSIGNMENTS)
    _check_choice(cfg, "word_sampling", vocabulary.SAMPLE_MODES)
    _check_choice(cfg, "teacher_distance", ("l2", "cosine"))
    _check_choice(cfg, "bow_pool", ("max", "avg"))
    if cfg.monitor and cfg.num_classes <= 0:
        raise InputError("config.obow.monitor=True needs config.obow.num_classes > 0.")


def check_obow_views(cfg) -> None:
    """The student's views: crop counts and sizes, the tuple-valued sampling ranges (length and
    range) and the augmentation probabilities; InputError naming the field."""
    if cfg.num_crops < 1:
        raise InputError(f"config.obow.num_crops={cfg.num_crops}; at least 1 crop is needed.")
    if not 0 <= cfg.num_patches <= 9:
        raise InputError(f"config.obow.num_patches={cfg.num_patches}; expected 0 to 9 (3x3 "
                         "grid).")
    if cfg.teacher_resize and cfg.teacher_resize < cfg.teacher_size:
        raise InputError(f"config.obow.teacher_resize={cfg.teacher_resize} is smaller than "
                         f"teacher_size={cfg.teacher_size}: the centre crop must fit the resized "
                         "image (0: resize the whole image to teacher_size).")
    if cfg.num_patches > 0 and cfg.patch_size + cfg.patch_jitter > cfg.patch_source_size:
        raise InputError(
            f"config.obow.patch_size + patch_jitter = {cfg.patch_size}+{cfg.patch_jitter} does "
            f"not fit config.obow.patch_source_size={cfg.patch_source_size}.")
    config_checks.interval(cfg.crop_scale, "config.obow.crop_scale", 0.0, 1.0,
                           "(min, max) area fraction of the crops")
    config_checks.interval(cfg.patch_source_scale, "config.obow.patch_source_scale", 0.0, 1.0,
                           "(min, max) area fraction of the patches' source crop")
    config_checks.interval(cfg.blur_sigma, "config.obow.blur_sigma", 0.0, None,
                           "(min, max) Gaussian blur sigma")
    config_checks.color_jitter(cfg.color_jitter, "config.obow.color_jitter")
    for field in ("color_jitter_p", "grayscale_p", "blur_p"):
        config_checks.probability(cfg[field], f"config.obow.{field}")


def check_level_shapes(cfg, level_shapes: dict) -> None:
    """Every BoW level must be a spatial map [B, h, w, C] big enough for the border skip and the
    word sampling; InputError naming config.obow.bow_levels otherwise."""
    need = 2 * cfg.border + (3 if cfg.vocabulary == "queue"
                             and cfg.word_sampling == "local_average" else 1)
    for level, shape in level_shapes.items():
        if len(shape) != 4:
            raise InputError(f"config.obow.bow_levels: {level!r} is not a spatial feature map "
                             f"(shape {shape}); BoW levels must be [B, h, w, C] maps.")
        h, w = shape[1:3]
        if h < need or w < need:
            raise InputError(
                f"config.obow.bow_levels: level {level!r} is {h}x{w} for a "
                f"{cfg.teacher_size}x{cfg.teacher_size} teacher input "
                f"(config.obow.teacher_size), but OBoW needs at least {need}x{need} (a "
                f"{cfg.border}-location border is skipped"
                + (" and words are 3x3 local averages" if need == 2 * cfg.border + 3 else "")
                + "). Choose other levels, a larger teacher_size or another stem.")


# ------------------------------------------------------------------------------------------------
# The method: module-level functions of a `Setup` (what `create` fixes) and the state.


@dataclasses.dataclass(frozen=True)
class Setup:
    """What OBoW's functions need besides the state and the batch, fixed by `create`."""
    cfg: Any  # config.obow
    backbone: nn.Module
    head: heads.DynamicBoWHead
    monitor: Optional[nn.Module]  # heads.LinearClassifier on the teacher's features, or None
    tx: optax.GradientTransformation
    lr_schedule: Callable
    dims: dict  # backbone output name -> shape on a [1, teacher_size, teacher_size, 3] input
    mean: tuple
    std: tuple
    total_steps: int
    eval_feature: str  # config.eval.feature

    @property
    def levels(self) -> tuple:
        return tuple(self.cfg.bow_levels)

    @property
    def teacher_shape(self) -> tuple:
        return (1, self.cfg.teacher_size, self.cfg.teacher_size, 3)


def teacher_variables(state):
    """The teacher backbone's variables {'params', 'batch_stats'}."""
    return {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}


def setup(config, data_info: interface.DataInfo, training: bool = True) -> Setup:
    """The networks, optimizer and sizes of `config`, checked before anything is compiled
    (InputError naming the field; `training` False skips the views' and the batch's checks,
    see `check_obow_config`)."""
    cfg = config.obow
    backbone = interface.backbone_from_config(config)
    levels = config_checks.names(cfg.bow_levels, "config.obow.bow_levels", "backbone feature maps")
    dims = feature_dims(backbone, (1, cfg.teacher_size, cfg.teacher_size, 3))
    check_feature_names(levels, dims, "config.obow.bow_levels", config.model.name)
    check_obow_config(config, {level: dims[level] for level in levels}, training)
    if training:
        interface.warn_if_canvas_below_views(config, data_info, {
            "config.obow.teacher_size": cfg.teacher_size,
            "config.obow.teacher_resize": cfg.teacher_resize,
            "config.obow.crop_size": cfg.crop_size,
            "config.obow.patch_source_size": cfg.patch_source_size if cfg.num_patches else 0})
    if cfg.monitor:
        check_feature_names([cfg.monitor_feature], dims, "config.obow.monitor_feature",
                            config.model.name)
    head = heads.DynamicBoWHead(num_channels_out=dims["pooled"][-1], kappa=cfg.kappa,
                                hidden_dim=cfg.hidden_dim or None, learn_kappa=cfg.learn_kappa)
    monitor = (heads.LinearClassifier(cfg.num_classes, batch_norm=True) if cfg.monitor else None)
    tx, lr_schedule = interface.optimizer_from_config(config, data_info)
    mean, std = interface.normalization(config)
    return Setup(cfg=cfg, backbone=backbone, head=head, monitor=monitor, tx=tx,
                 lr_schedule=lr_schedule, dims=dims, mean=mean, std=std,
                 total_steps=data_info.total_steps, eval_feature=config.eval.feature)


def init_student(s: Setup, backbone_variables, vocabs, k_head, k_monitor):
    """(params, batch_stats) of the student side {'backbone', 'bow_head'[, 'monitor']}: the
    initial backbone, and the BoW head (and monitor) initialised from `k_head` (`k_monitor`)."""
    student_dim = s.dims["pooled"][-1]
    head_vars = s.head.init({"params": k_head}, jnp.zeros((1, student_dim)), vocabs,
                            train=False)
    params = {"backbone": backbone_variables["params"], "bow_head": head_vars["params"]}
    batch_stats = {"backbone": backbone_variables["batch_stats"],
                   "bow_head": head_vars["batch_stats"]}
    if s.monitor is not None:
        mon = s.monitor.init({"params": k_monitor},
                             jnp.zeros((1, s.dims[s.cfg.monitor_feature][-1])))
        params["monitor"], batch_stats["monitor"] = mon["params"], mon["batch_stats"]
    return params, batch_stats


def init_kmeans(cfg, vocabs) -> tuple:
    """Per level the online k-means statistics of appendix D, or () for the queue."""
    if cfg.vocabulary != "online_kmeans":
        return ()
    return tuple({"ema_counts": km.ema_counts, "ema_sums": km.ema_sums,
                  "steps_since_used": km.steps_since_used}
                 for km in map(vocabulary.init_online_kmeans, vocabs))


def init_state(s: Setup, key) -> OBoWState:
    """The state at initialisation: random student, teacher = a copy of the student, random
    queue words, pointers 0, mean-min-distance statistics 0.5."""
    k_backbone, k_head, k_monitor, k_vocab, k_state = jax.random.split(key, 5)
    variables = s.backbone.init({"params": k_backbone}, jnp.zeros(s.teacher_shape), train=False)
    vocabs = tuple(vocabulary.init_queue(jax.random.fold_in(k_vocab, i), s.cfg.num_words,
                                         s.dims[level][-1])
                   for i, level in enumerate(s.levels))
    params, batch_stats = init_student(s, variables, vocabs, k_head, k_monitor)
    # The teacher starts as a copy of the student (distinct buffers: the state is donated).
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return OBoWState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=s.tx.init(params), rng=k_state,
        teacher_params=copy(variables["params"]),
        teacher_batch_stats=copy(variables["batch_stats"]),
        vocabularies=vocabs,
        pointers=tuple(vocabulary.init_pointer() for _ in s.levels),
        mean_min_dist=tuple(jnp.full((), 0.5, jnp.float32) for _ in s.levels),
        kmeans=init_kmeans(s.cfg, vocabs))


def teacher_view(cfg, key, image, size):
    """Resize(teacher_resize) + CenterCrop(teacher_size) (or a resize of the whole image to
    teacher_size when teacher_resize is 0) + flip of the true (h, w) = `size` image of a uint8
    canvas [S, S, 3] -> uint8 [teacher_size, teacher_size, 3]."""
    teacher = geometric.resize_center_crop(image, size, cfg.teacher_resize, cfg.teacher_size)
    return geometric.random_flip(key, teacher) if cfg.flip else teacher


def image_views(cfg, key, image, size) -> dict:
    """OBoW's uint8 views of the true (h, w) = `size` image of a uint8 canvas [S, S, 3] (see the
    module docstring)."""
    k_flip, k_crops, k_src, k_patch = jax.random.split(key, 4)
    crop = lambda k: geometric.random_resized_crop(k, image, cfg.crop_size,
                                                   scale=tuple(cfg.crop_scale), size=size)
    views = {"teacher": teacher_view(cfg, k_flip, image, size),
             "crops": jax.vmap(crop)(jax.random.split(k_crops, cfg.num_crops))}
    if cfg.num_patches > 0:
        source = geometric.random_resized_crop(k_src, image, cfg.patch_source_size,
                                               scale=tuple(cfg.patch_source_scale), size=size)
        views["patches"] = geometric.jittered_patches(
            k_patch, source, patch_size=cfg.patch_size, jitter=cfg.patch_jitter,
            keep=cfg.num_patches)
    return views


def make_views(cfg, images, sizes, key) -> dict:
    """OBoW's geometric views of uint8 canvases [B, S, S, 3] with true sizes int32 [B, 2], one
    key per image (`data/batches.py`): in-memory and streamed images alike."""
    one = functools.partial(image_views, cfg)
    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images, sizes)


def teacher_features(s: Setup, teacher_params, teacher_batch_stats, x):
    """Train-mode teacher forward (batch statistics; it keeps its own running statistics), no
    gradient. Returns (named outputs, new teacher batch_stats)."""
    feats, updates = s.backbone.apply({"params": teacher_params,
                                       "batch_stats": teacher_batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
    return jax.lax.stop_gradient(feats), updates["batch_stats"]


def teacher_targets(s: Setup, state: OBoWState, feats, key):
    """Per level: the BoW targets against the pre-step vocabulary and the level's new
    (vocab, pointer, mean_min_dist, kmeans). Returns (targets, new levels, metrics)."""
    targets, new_levels, metrics = [], [], {}
    for i, level in enumerate(s.levels):
        bow, new, aux = teacher_level_update(
            s.cfg, level, feats[level], state.vocabularies[i], state.pointers[i],
            state.mean_min_dist[i], state.kmeans[i] if state.kmeans else None,
            jax.random.fold_in(key, i))
        targets.append(bow)
        new_levels.append(new)
        metrics[f"perplexity_image_{level}"] = aux["perplexity_image"]
        metrics[f"perplexity_batch_{level}"] = aux["perplexity_batch"]
        metrics[f"min_dist_batch_{level}"] = aux["min_dist_mean"]
        metrics[f"mean_min_dist_{level}"] = new[2]
    return targets, new_levels, metrics


def monitor_loss(s: Setup, params, batch_stats, feats, labels):
    """The monitor's cross-entropy on the detached teacher feature `monitor_feature`.
    Returns (loss, monitor batch_stats, metrics)."""
    logits, updates = s.monitor.apply({"params": params, "batch_stats": batch_stats},
                                      feats[s.cfg.monitor_feature], train=True,
                                      mutable=["batch_stats"])
    loss = interface.cross_entropy(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, updates["batch_stats"], {"monitor_loss": loss, "monitor_accuracy": accuracy}


def student_loss(s: Setup, params, batch_stats, groups, copies, snapshot, targets, feats,
                 labels):
    """OBoW loss of the student (plus the monitor's): one backbone pass per crop group, the
    dynamic BoW head's logits against the vocabulary `snapshot`, the soft cross-entropy with the
    teacher's `targets`. Returns (loss, (new batch_stats, metrics))."""
    pooled, backbone_stats = student_forward(s.backbone, params["backbone"],
                                             batch_stats["backbone"], groups)
    logits, head_updates = s.head.apply(
        {"params": params["bow_head"], "batch_stats": batch_stats["bow_head"]},
        pooled, snapshot, train=True, mutable=["batch_stats"])
    loss, group_losses = bow_prediction_loss(logits, targets, copies)
    new_stats = {"backbone": backbone_stats, "bow_head": head_updates["batch_stats"]}
    aux = dict(zip(("loss_crops", "loss_patches"), group_losses))
    if s.monitor is not None:
        mon_loss, new_stats["monitor"], mon_aux = monitor_loss(
            s, params["monitor"], batch_stats["monitor"], feats, labels)
        loss = loss + mon_loss
        aux.update(mon_aux)
    return loss, (new_stats, aux)


def train_step(s: Setup, state: OBoWState, batch):
    """One OBoW step, in the order of the official `OBoW.forward` (module docstring)."""
    k_augment, k_words = jax.random.split(state.step_key())
    teacher_x, groups, copies = augment_views(k_augment, batch, s.cfg, s.mean, s.std)
    if s.monitor is not None and "label" not in batch:
        raise InputError("config.obow.monitor=True needs 'label' in the batch (a labelled "
                         "training split); set it to False.")
    # 3. Teacher: EMA with the pre-step student params, then a train-mode forward.
    momentum = schedules.teacher_momentum(state.step, s.total_steps, s.cfg.teacher_momentum)
    teacher_params = ema_update(state.teacher_params, state.params["backbone"], momentum)
    feats, teacher_stats = teacher_features(s, teacher_params, state.teacher_batch_stats,
                                            teacher_x)
    targets, new_levels, metrics = teacher_targets(s, state, feats, k_words)
    # 1 + 2 + 4. The student predicts against the vocabulary snapshot: the state's arrays are
    #    values, so this step's queue writes above cannot reach it.
    loss_fn = functools.partial(student_loss, s, batch_stats=state.batch_stats, groups=groups,
                                copies=copies, snapshot=state.vocabularies, targets=targets,
                                feats=feats, labels=batch.get("label"))
    (loss, (batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    vocabs, pointers, stats, kmeans = (tuple(x) for x in zip(*new_levels))
    new_state = state.apply_gradients(
        grads, s.tx, batch_stats=batch_stats, teacher_params=teacher_params,
        teacher_batch_stats=teacher_stats, vocabularies=vocabs, pointers=pointers,
        mean_min_dist=stats, kmeans=kmeans if state.kmeans else ())
    metrics.update(aux, loss=loss, teacher_momentum=momentum, lr=s.lr_schedule(state.step))
    return new_state, metrics


def encode(s: Setup, state: OBoWState, images):
    """Frozen features of uint8 images [B, H, W, 3] -> [B, D]: the student backbone's
    `config.eval.feature`, eval-mode BatchNorm, pooled."""
    return interface.encode_with(s.backbone, interface.backbone_variables(state), images,
                              s.eval_feature, s.mean, s.std)


def create(config, data_info: interface.DataInfo, training: bool = True) -> interface.Method:
    """OBoW's `Method` for `config` (InputError naming the field for a bad config; `training`
    False: only the checks that a trained state's use needs, see `check_obow_config`)."""
    s = setup(config, data_info, training)
    return interface.Method(init_state=functools.partial(init_state, s),
                            train_step=functools.partial(train_step, s),
                            make_views=functools.partial(make_views, s.cfg),
                            encode=functools.partial(encode, s))
