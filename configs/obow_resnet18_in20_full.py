"""OBoW paper ablation recipe: ResNet-18 "full" on ImageNet-20% (config/ImageNet20/
ResNet18_OBoW_full): BoW levels layer3 + layer4, 2 crops of 160 and 5 patches of 96, batch 128.

K = 8192, inv_delta 10, kappa 5; SGD momentum 0.9, wd 5e-4, lr 0.05 with a per-epoch cosine to 0,
no warm-up, 80 epochs (2031 steps per epoch). Teacher and student views as in
configs/obow_resnet50.py. Data: the `imagenet20` TFDS dataset (the first 260 images of each class),
built once as described in configs/obow_resnet18_in20_vanilla.py. Evaluation as in that file.
Paper (Gidaris et al., CVPR 2021, Table 5, 80 epochs): linear 50.89%, 1-shot 44.18%, 5-shot
64.89%.
"""
import os

from bow_jax.config import get_recipe

def get_config():
    c = get_recipe(os.path.join(os.path.dirname(__file__), "obow_resnet18_in20_vanilla.py"))
    c.batch_size = 128
    c.obow.bow_levels = ("layer3", "layer4")
    c.obow.num_crops = 2
    c.obow.num_patches = 5
    c.checkpoint_every_steps = 2031  # one epoch of 260,000 images at batch 128
    c.eval.every_steps = 2031  # the k-NN monitor, every epoch
    return c
