"""RotNet on CIFAR-10 sized for 2 CPU cores (minutes, not hours).

The shared CPU setting that RotNet, BoWNet and OBoW are compared on: ResNet-18 at width 16 with
the CIFAR stem (32x32 input; layer3 is 8x8, layer4 4x4), batch 64 images (x4 rotations), 400 steps,
SGD Nesterov lr 0.1, wd 5e-4. Evaluated on layer3 (RotNet's mid-level features are its best).
Data: $BOW_JAX_CIFAR10 or ../shared/data/cifar10 (train.npz, test.npz).
"""
from bow_jax.config import base_config, cifar10_cpu_setting


def get_config():
    c = base_config("rotnet")
    cifar10_cpu_setting(c)
    c.num_train_steps = 400
    c.steps_per_epoch = 100  # schedule "epochs" of 100 steps: lr 0.1, then 0.02 from step 300
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.milestones = (3,)
    c.optim.decay = 0.2
    c.log_every = 25
    c.checkpoint_every_steps = 100
    c.eval.feature = "layer3"
    c.eval.random_init = True
    c.eval.linear_epochs = 20
    c.eval.fewshot_shots = (1, 5, 10, 50)
    c.eval.fewshot_episodes = 1000
    return c
