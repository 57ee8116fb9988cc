"""RotNet teacher of BoWNet's CIFAR-100 recipe (Gidaris et al., CVPR 2020, section 4.1.1).

WRN-28-10 whose rotation head is an extra residual block on the last (3rd) residual block
("in our experiments this led the feature extractor to learn better representations"), trained
like the BoWNet students: SGD momentum 0.9, batch 128 (x4 rotations), 30 epochs of 2000
iterations, lr 0.1 x0.1 after epochs 12 and 24, wd 5e-4; augmentation RandomCrop(32, pad 4) +
flip (RotNet's CIFAR recipe). Run on its own, or as the first stage of
configs/bownet_cifar100_wrn.py.
Data: TFDS 'cifar100' (must be prepared in config.data.data_dir; nothing is downloaded).
"""
from bow_jax.config import base_config, cifar100_wrn_setting

def get_config():
    c = cifar100_wrn_setting(base_config("rotnet"))
    c.rotnet.head = "residual"
    c.rotnet.head_feature = "block3"
    return c
