"""OBoW paper ablation recipe: ResNet-18 "full" on ImageNet-20% (config/ImageNet20/
ResNet18_OBoW_full): BoW levels layer3 + layer4, 2 crops of 160 and 5 patches of 96, batch 128.

K = 8192, inv_delta 10, kappa 5; SGD momentum 0.9, wd 5e-4, lr 0.05 with a per-epoch cosine to 0,
no warm-up, 80 epochs (2031 steps per epoch). Teacher and student views as in
configs/obow_resnet50.py. Data: the `imagenet20` TFDS dataset (the first 260 images of each class),
built once as described in configs/obow_resnet18_in20_vanilla.py.
"""
import os

from bow_jax.config import base_config


def get_config():
    c = base_config("obow")
    c.model.name = "resnet18"
    c.model.kwargs.width = 64  # torchvision widths (overridable, e.g. for quick checks)
    c.data.source = "tfds"
    c.data.name = "imagenet20"
    c.data.data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    c.data.in_memory = False
    c.data.normalization = "imagenet"
    c.batch_size = 128
    c.num_epochs = 80
    c.optim.lr = 0.05
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 0
    c.optim.end_lr = 0.0
    o = c.obow
    o.bow_levels = ("layer3", "layer4")
    o.num_words = 8192
    o.inv_delta = 10.0
    o.kappa = 5.0
    o.num_crops = 2
    o.num_patches = 5
    o.monitor, o.num_classes = True, 1000  # logged monitor_accuracy (not part of the method)
    c.log_every = 100
    c.checkpoint_every_steps = 2031  # one epoch of 260,000 images at batch 128
    c.eval.after_training = False
    return c
