"""The base config every experiment config starts from, assembled from the shared fields and the
sections that the method and task registries define.

Experiment files in `configs/` call `base_config(method)` and override fields. Because `main.py`
locks the config, `--config.some.typo=1` fails at once with the unknown key named.
"""
import importlib.util
import os

import ml_collections

from bow_jax.lib.errors import MissingInputError
from bow_jax import tasks
from bow_jax.data import fields
from bow_jax.methods import method_module


def shared_fields(method: str) -> ml_collections.ConfigDict:
    """The fields every run has, whatever its method and task."""
    c = ml_collections.ConfigDict()
    c.task = "train"  # a name of bow_jax.tasks.REGISTRY
    c.method = method  # 'rotnet' | 'bownet' | 'obow'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"
    c.model.kwargs = ml_collections.ConfigDict()  # passed to the backbone constructor

    c.data = fields.data_fields()  # source, path, name, data_dir, image_size, normalization, ...

    c.batch_size = 128  # global, over all devices and hosts
    c.num_epochs = 1
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.steps_per_epoch = 0  # > 0: what the schedules call an epoch (BoWNet: 2000 iterations)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"  # 'step' | 'cosine' | 'constant'
    c.optim.milestones = ()  # epochs, for 'step'
    c.optim.decay = 0.1
    c.optim.warmup_epochs = 0  # for 'cosine'
    c.optim.end_lr = 0.0

    c.log_every = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.keep_every_steps = 0  # also keep every K-th step's checkpoint (0 = none)
    # A jax.profiler trace of steps [start, start + count) into <workdir>/profile/ (TensorBoard's
    # profile plugin or Perfetto); count 0 = off.
    c.profile_start_step = 10
    c.profile_num_steps = 0
    return c


def base_config(method: str = "rotnet") -> ml_collections.ConfigDict:
    """The shared fields, every task's section (config.eval, config.export, config.finetune) and
    the section of `method` (config.rotnet, config.bownet or config.obow)."""
    c = shared_fields(method)
    for task in tasks.REGISTRY.values():
        if task.SECTION:
            c[task.SECTION] = task.default_config()
    c[method] = method_module(method).default_config()
    return c


# ------------------------------------------------------------------------------------------------
# Recipe pieces the configs in configs/ share (one home per recipe number).


def sgd(c, lr: float, *, weight_decay: float, schedule: str, momentum: float = 0.9,
        nesterov: bool = False, milestones=(), decay: float = 0.1, warmup_epochs: int = 0,
        end_lr: float = 0.0) -> ml_collections.ConfigDict:
    """config.optim: SGD with PyTorch weight decay on every parameter and a per-epoch schedule
    ('step' x`decay` at `milestones`, or 'cosine' towards `end_lr` after `warmup_epochs`)."""
    c.optim.update(dict(name="sgd", lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, schedule=schedule, milestones=tuple(milestones),
                        decay=decay, warmup_epochs=warmup_epochs, end_lr=end_lr))
    return c


def cifar10_npz(c) -> ml_collections.ConfigDict:
    """CIFAR-10 from npz files: $BOW_JAX_CIFAR10, a folder with train.npz and test.npz (images
    uint8 [N,32,32,3], labels [N]), default ../shared/data/cifar10; CIFAR normalisation."""
    c.data.update(dict(source="npz", normalization="cifar",
                       path=os.environ.get("BOW_JAX_CIFAR10", "../shared/data/cifar10")))
    return c


def tfds_data(c, name: str, *, in_memory: bool, normalization: str) -> ml_collections.ConfigDict:
    """A prepared TFDS dataset `name` in $TFDS_DATA_DIR (default ~/tensorflow_datasets)."""
    c.data.update(dict(source="tfds", name=name, in_memory=in_memory, normalization=normalization,
                       data_dir=os.environ.get("TFDS_DATA_DIR",
                                               os.path.expanduser("~/tensorflow_datasets"))))
    return c


def probes(c, feature: str, *, shots=(1, 5), ways: int = 5, queries: int = 15,
           episodes: int = 200, **eval_fields) -> ml_collections.ConfigDict:
    """config.eval: the feature the probes read, the few-shot episodes, and any other eval field
    (linear_protocol, linear_epochs, random_init, ...)."""
    c.eval.update(dict(feature=feature, fewshot_shots=tuple(shots), fewshot_ways=ways,
                       fewshot_queries=queries, fewshot_episodes=episodes, **eval_fields))
    return c


def schedule_of_checkpoints(c, every: int, keep_every: int = 0,
                            log_every: int = 0) -> ml_collections.ConfigDict:
    """Checkpoint every `every` steps, keep every `keep_every`-th for good, log every `log_every`."""
    c.checkpoint_every_steps, c.keep_every_steps = every, keep_every
    if log_every:
        c.log_every = log_every
    return c


def imagenet_setting(c, arch: str, dataset: str) -> ml_collections.ConfigDict:
    """A torchvision ResNet (`arch`, width 64, overridable for quick checks) on the prepared TFDS
    `dataset` (imagenet2012, or the imagenet20 subset), streamed, ImageNet normalisation."""
    c.model.name = arch
    c.model.kwargs.width = 64
    return tfds_data(c, dataset, in_memory=False, normalization="imagenet")


def digits_setting(c) -> ml_collections.ConfigDict:
    """The demos' setting: scikit-learn's digits (1,797 real 8x8 images, bundled, offline)
    upsampled to 16x16, CIFAR normalisation, ResNet-18 at width 16 with the CIFAR stem."""
    c.model.name = "resnet18"
    c.model.kwargs.width = 16
    c.model.kwargs.cifar_stem = True
    c.data.update(dict(source="digits", image_size=16, normalization="cifar"))
    return c


def cifar10_cpu_setting(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The shared setting the CPU-sized CIFAR-10 runs of every method are compared on: ResNet-18
    at width 16 with the CIFAR stem (32x32: layer3 8x8, layer4 4x4), CIFAR-10 npz files
    (`cifar10_npz`), batch 64."""
    c.model.name = "resnet18"
    c.model.kwargs.width = 16
    c.model.kwargs.cifar_stem = True
    c.batch_size = 64
    return cifar10_npz(c)


def cifar100_wrn_setting(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The BoWNet paper's CIFAR-100 setting (section 4.1): WRN-28-10, TFDS cifar100 (CIFAR-10
    statistics, as every CIFAR run here), batch 128, 30 "epochs" of 2000 iterations, SGD lr 0.1
    x0.1 at 12 and 24, wd 5e-4; 640-d pooled features, 100-way linear probe and 5-way few-shot
    (1/5/10/50 shots, 15 queries, 2000 episodes)."""
    c.model.name = "wrn28"
    c.model.kwargs.widen_factor = 10
    tfds_data(c, "cifar100", in_memory=True, normalization="cifar")
    c.batch_size, c.steps_per_epoch, c.num_epochs = 128, 2000, 30
    sgd(c, 0.1, weight_decay=5e-4, schedule="step", milestones=(12, 24))
    schedule_of_checkpoints(c, 2000, keep_every=10 * 2000, log_every=100)
    return probes(c, "pooled", shots=(1, 5, 10, 50), episodes=2000,
                  linear_protocol="cifar_bownet")


def bownet_chain(c, rotnet_config_file: str, *, teacher_layer: str, num_words: int,
                 target: str = "histogram", **bownet_fields) -> ml_collections.ConfigDict:
    """The `bownet_chain` task with the RotNet stage of `rotnet_config_file` (a path), BoW
    targets (`target`: 'histogram', eq. 3, or 'binary', eq. 4) of all locations (border 0) of
    `teacher_layer` predicted from the pooled feature, and any other config.bownet field."""
    c.task = "bownet_chain"
    c.bownet.update(dict(rotnet=get_recipe(rotnet_config_file), teacher_layer=teacher_layer,
                         num_words=num_words, target=target, border=0,
                         student_feature="pooled", **bownet_fields))
    return c


def obow_targets(o, levels, *, num_words: int, inv_delta: float,
                 kappa: float) -> ml_collections.ConfigDict:
    """config.obow's BoW targets: the levels, K words per level, 1/delta_base, the head's kappa."""
    o.update(dict(bow_levels=tuple(levels), num_words=num_words, inv_delta=inv_delta,
                  kappa=kappa))
    return o


def imagenet_probes(c, linear_protocol: str, *, monitor_every: int) -> ml_collections.ConfigDict:
    """The OBoW paper's ImageNet evaluation: pooled features, the official linear-probe recipe
    `linear_protocol` ('imagenet_r50_obow' | 'imagenet_r18_obow'), 50-way 1/5-shot episodes with
    1 query (200 episodes) on the validation images of 300 classes drawn with seed 0
    (config.eval.fewshot_classes='random:300:0', a documented stand-in for the paper's held-out
    novel classes, whose file we cannot bundle), k-NN; run after training. The paper's split:
    `--config.eval.fewshot_classes=PATH/IMAGENET_LOWSHOT_BENCHMARK_CATEGORY_SPLITS.json
    --config.eval.fewshot_classes_key=novel_classes_2` (311 test classes; 'novel_classes_1':
    the 300 validation classes), the Hariharan & Girshick low-shot benchmark's file that the
    official OBoW code reads (indices into the sorted wnids, as TFDS imagenet2012 numbers them).
    During training, the k-NN monitor every `monitor_every` steps (one epoch; 10k training
    images as memory, 5k validation images as queries: `evaluate.monitor`)."""
    return probes(c, "pooled", ways=50, queries=1, episodes=200, linear_protocol=linear_protocol,
                  after_training=True, fewshot_classes="random:300:0", every_steps=monitor_every)


def obow_views(o, *, teacher_size: int, teacher_resize: int, crop_size: int, crop_scale,
               num_crops: int = 2, num_patches: int = 5, **patches) -> ml_collections.ConfigDict:
    """config.obow's views: the teacher view, the student's crops and its jittered patches
    (`patches`: patch_size, patch_source_size, patch_source_scale, patch_jitter; defaults kept)."""
    o.update(dict(teacher_size=teacher_size, teacher_resize=teacher_resize, num_crops=num_crops,
                  crop_size=crop_size, crop_scale=tuple(crop_scale), num_patches=num_patches,
                  **patches))
    return o


def get_recipe(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/<name>.py), e.g. a BoWNet chain's RotNet stage.
    FileNotFoundError naming the path when it does not exist."""
    spec = importlib.util.spec_from_file_location(
        "_config_" + os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or not os.path.isfile(path):
        raise MissingInputError(f"config file {path!r} does not exist.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
