"""The base config every experiment config starts from, assembled from the shared fields and the
sections that the method and task registries define.

Experiment files in `configs/` call `base_config(method)` and override fields. Because `main.py`
locks the config, `--config.some.typo=1` fails at once with the unknown key named.
"""
import importlib.util
import os

import ml_collections

from bow_jax import tasks
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

    c.data = ml_collections.ConfigDict()
    c.data.source = "npz"  # 'npz' | 'jpeg_npz' | 'digits' | 'image_folder' | 'tfds'
    c.data.path = ""  # folder (npz, jpeg_npz, image_folder) holding the splits
    c.data.name = ""  # TFDS name
    c.data.data_dir = ""  # TFDS data_dir
    c.data.image_size = 0  # resize on load (digits, image folders); 0 = keep
    c.data.normalization = "cifar"  # 'cifar' | 'imagenet'
    c.data.limit = 0  # use only the first N training images (0 = all): quick runs
    c.data.num_examples = 0  # TFDS only, when split sizes are unknown (mock data)
    c.data.in_memory = True  # False: stream a TFDS training split through tf.data (ImageNet)
    c.data.max_unreadable_fraction = 0.05  # image folders: undecodable files up to this share are
    #                                        skipped with a warning naming them; more: an error

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


def cifar10_cpu_setting(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The shared setting the CPU-sized CIFAR-10 runs of every method are compared on: ResNet-18
    at width 16 with the CIFAR stem (32x32: layer3 8x8, layer4 4x4), CIFAR-10 npz files from
    $BOW_JAX_CIFAR10 or ../shared/data/cifar10, batch 64."""
    c.model.name = "resnet18"
    c.model.kwargs.width = 16
    c.model.kwargs.cifar_stem = True
    c.data.source = "npz"
    c.data.path = os.environ.get("BOW_JAX_CIFAR10", "../shared/data/cifar10")
    c.data.normalization = "cifar"
    c.batch_size = 64
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/<name>.py), e.g. a BoWNet chain's RotNet stage.
    FileNotFoundError naming the path when it does not exist."""
    spec = importlib.util.spec_from_file_location(
        "_config_" + os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
