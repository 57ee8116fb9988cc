"""RotNet teacher of BoWNet's CIFAR-100 recipe (Gidaris et al., CVPR 2020, section 4.1.1).

WRN-28-10 whose rotation head is an extra residual block on the last (3rd) residual block
("in our experiments this led the feature extractor to learn better representations"), trained
like the BoWNet students: SGD momentum 0.9, batch 128 (x4 rotations), 30 epochs of 2000
iterations, lr 0.1 x0.1 after epochs 12 and 24, wd 5e-4; augmentation RandomCrop(32, pad 4) +
flip (RotNet's CIFAR recipe). Run on its own, or as the first stage of
configs/bownet_cifar100_wrn.py.
Data: TFDS 'cifar100' (must be prepared in config.data.data_dir; nothing is downloaded).
"""
from bow_jax.config import base_config


def get_config():
    c = base_config("rotnet")
    c.model.name = "wrn28"
    c.model.kwargs.widen_factor = 10
    c.rotnet.head = "residual"
    c.rotnet.head_feature = "block3"
    c.data.source = "tfds"
    c.data.name = "cifar100"
    c.data.normalization = "cifar"  # CIFAR-10 statistics, as for every CIFAR run here
    c.batch_size = 128
    c.steps_per_epoch = 2000
    c.num_epochs = 30
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.milestones = (12, 24)
    c.optim.decay = 0.1
    c.log_every = 100
    c.checkpoint_every_steps = 2000
    c.keep_every_steps = 10 * 2000
    # Section 4.1.2: 640-d pooled features, 100-way linear probe, 5-way few-shot episodes.
    c.eval.feature = "pooled"
    c.eval.linear_protocol = "cifar_bownet"
    c.eval.fewshot_shots = (1, 5, 10, 50)
    c.eval.fewshot_ways = 5
    c.eval.fewshot_queries = 15
    c.eval.fewshot_episodes = 2000
    return c
