"""RotNet on the demo data: the demo of the repository before OBoW replaced it (configs/demo.py).

Self-supervised pre-training on real images (rotation prediction), then frozen-feature evaluation
printed side by side with the same network at random initialisation:

    python3 -m bow_jax.main --config=configs/demo_rotnet.py --workdir=/tmp/bow_demo_rotnet

Default data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, upsampled to
16x16), so it runs anywhere, offline, on 2 CPU cores in a few minutes (330 steps and the
evaluation took 141 s on an idle 2-core machine, README). With the CIFAR-10 files:
  --config.data.source=npz --config.data.path=../shared/data/cifar10 --config.data.image_size=0
It learns faster than OBoW in the first hundred steps (OBoW's features first dip below random
init, README OBoW section), so it remains the quickest check that self-supervision works.
"""
from bow_jax.config import base_config, digits_setting, probes, schedule_of_checkpoints, sgd


def get_config():
    c = digits_setting(base_config("rotnet"))
    c.rotnet.crop_padding = 2
    c.rotnet.flip = False  # digits are not mirror-symmetric
    c.batch_size = 64
    c.num_epochs = 15
    sgd(c, 0.1, nesterov=True, weight_decay=5e-4, schedule="step", milestones=(10,), decay=0.2)
    schedule_of_checkpoints(c, 200, log_every=20)
    return probes(c, "layer3", episodes=500, random_init=True, linear_epochs=30)
