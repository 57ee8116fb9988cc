"""RotNet on CIFAR-10 sized for 2 CPU cores (minutes, not hours).

The shared CPU setting that RotNet, BoWNet and OBoW are compared on: ResNet-18 at width 16 with
the CIFAR stem (32x32 input; layer3 is 8x8, layer4 4x4), batch 64 images (x4 rotations), 400 steps,
SGD Nesterov lr 0.1, wd 5e-4. Evaluated on layer3 (RotNet's mid-level features are its best).
Data: $BOW_JAX_CIFAR10 or ../shared/data/cifar10 (train.npz, test.npz).
"""
from bow_jax.config import base_config, cifar10_cpu_setting, probes, schedule_of_checkpoints, sgd

def get_config():
    c = base_config("rotnet")
    cifar10_cpu_setting(c)
    c.num_train_steps = 400
    c.steps_per_epoch = 100  # schedule "epochs" of 100 steps: lr 0.1, then 0.02 from step 300
    sgd(c, 0.1, nesterov=True, weight_decay=5e-4, schedule="step", milestones=(3,), decay=0.2)
    schedule_of_checkpoints(c, 100, log_every=25)
    return probes(c, "layer3", shots=(1, 5, 10, 50), episodes=1000, random_init=True,
                  linear_epochs=20)
