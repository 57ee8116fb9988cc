"""The base config every experiment config starts from, and its checks.

Experiment files in `configs/` call `base_config()` and override fields. Because `main.py` locks
the config, `--config.some.typo=1` fails at once with the unknown key named.
"""
import importlib
import os

import ml_collections


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


def base_config(method: str = "rotnet") -> ml_collections.ConfigDict:
    """Defaults shared by every run, plus the section of `method`."""
    c = ml_collections.ConfigDict()
    c.task = "train"  # 'train' | 'evaluate' | 'demo'
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

    c.eval = ml_collections.ConfigDict()
    c.eval.after_training = True
    c.eval.feature = "pooled"  # backbone output the probes read (maps are average-pooled)
    c.eval.random_init = False  # also score the same network at random init, side by side
    c.eval.batch_size = 256
    c.eval.linear = True
    c.eval.linear_protocol = "cifar_bownet"
    c.eval.linear_epochs = 0  # > 0 overrides the protocol's epochs (quick runs)
    c.eval.fewshot = True
    c.eval.fewshot_shots = (1, 5)
    c.eval.fewshot_ways = 5
    c.eval.fewshot_queries = 15
    c.eval.fewshot_episodes = 200
    c.eval.knn = True
    c.eval.test_limit = 0  # evaluate on the first N test images (0 = all)
    c.eval.train_limit = 0  # fit the probes on the first N training images (0 = all): quick looks
    c.eval.checkpoint_steps = ()  # the `evaluate` task scores these kept checkpoints (a learning
    #                               curve; keep them with keep_every_steps); () = the latest

    # Sections of the export and fine-tuning tasks, defined beside them.
    from bow_jax.evaluate import finetune  # pylint: disable=import-outside-toplevel
    from bow_jax.export import torchvision  # pylint: disable=import-outside-toplevel
    c.export = torchvision.default_config()
    c.finetune = finetune.default_config()

    # The method's own section (config.rotnet, config.bownet, config.obow), defined beside it.
    module = importlib.import_module(f"bow_jax.methods.{method}")
    c[method] = module.default_config()
    return c
