"""RotNet paper recipe, CIFAR-10, Network-in-Network with 4 conv blocks (Gidaris et al. 2018).

Official CIFAR10_RotNet_NIN4blocks: batch 128 images (x4 rotations), 200 epochs, SGD momentum 0.9
Nesterov, wd 5e-4, lr 0.1 → 0.02 (ep 60) → 0.004 (ep 120) → 0.0008 (ep 160); train augmentation
RandomCrop(32, pad 4) + flip. Evaluated on conv2, the paper's best block on CIFAR-10.
Data: the CIFAR-10 npz files (`train.npz`, `test.npz`) in $BOW_JAX_CIFAR10 or config.data.path.
"""
from bow_jax.config import base_config, cifar10_npz, schedule_of_checkpoints, sgd

def get_config():
    c = base_config("rotnet")
    c.model.name = "nin"
    c.model.kwargs.num_blocks = 4
    cifar10_npz(c)
    c.batch_size = 128
    c.num_epochs = 200
    sgd(c, 0.1, nesterov=True, weight_decay=5e-4, schedule="step", milestones=(60, 120, 160),
        decay=0.2)
    c.eval.feature = "conv2"
    return schedule_of_checkpoints(c, 390 * 10, keep_every=390 * 50)
