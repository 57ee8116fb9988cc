"""The demo: self-supervised pre-training on real images, then frozen-feature evaluation, printed
side by side with the same network at random initialisation.

Default data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, upsampled to
16x16), so it runs anywhere, offline, on 2 CPU cores in a few minutes. With the CIFAR-10 files:
  --config.data.source=npz --config.data.path=../shared/data/cifar10 --config.data.image_size=0
Method: RotNet. OBoW is not the demo: within minutes of CPU its features do not beat random
init (README, OBoW results: its first targets carry less information than random features).
"""
from bow_jax.config import base_config


def get_config():
    c = base_config("rotnet")
    c.model.name = "resnet18"
    c.model.kwargs.width = 16
    c.model.kwargs.cifar_stem = True
    c.data.source = "digits"
    c.data.image_size = 16
    c.data.normalization = "cifar"
    c.rotnet.crop_padding = 2
    c.rotnet.flip = False  # digits are not mirror-symmetric
    c.batch_size = 64
    c.num_epochs = 15
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.milestones = (10,)
    c.optim.decay = 0.2
    c.log_every = 20
    c.checkpoint_every_steps = 200
    c.eval.feature = "layer3"
    c.eval.random_init = True
    c.eval.linear_epochs = 30
    c.eval.fewshot_shots = (1, 5)
    c.eval.fewshot_episodes = 500
    return c
