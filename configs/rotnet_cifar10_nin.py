"""RotNet paper recipe, CIFAR-10, Network-in-Network with 4 conv blocks (Gidaris et al. 2018).

Official CIFAR10_RotNet_NIN4blocks: batch 128 images (x4 rotations), 200 epochs, SGD momentum 0.9
Nesterov, wd 5e-4, lr 0.1 → 0.02 (ep 60) → 0.004 (ep 120) → 0.0008 (ep 160); train augmentation
RandomCrop(32, pad 4) + flip. Evaluated on conv2, the paper's best block on CIFAR-10.
Data: the CIFAR-10 npz files (`train.npz`, `test.npz`) in $BOW_JAX_CIFAR10 or config.data.path.
"""
import os

from bow_jax.config import base_config


def get_config():
    c = base_config("rotnet")
    c.model.name = "nin"
    c.model.kwargs.num_blocks = 4
    c.data.source = "npz"
    c.data.path = os.environ.get("BOW_JAX_CIFAR10", "../shared/data/cifar10")
    c.data.normalization = "cifar"
    c.batch_size = 128
    c.num_epochs = 200
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.milestones = (60, 120, 160)
    c.optim.decay = 0.2
    c.eval.feature = "conv2"
    c.checkpoint_every_steps = 390 * 10
    c.keep_every_steps = 390 * 50
    return c
