"""BoWNet on CIFAR-10 sized for 2 CPU cores: RotNet → vocabulary → BoWNet → evaluation in about
45 minutes of a shared 2-core machine (RotNet ~25, vocabulary ~1, BoWNet ~15, evaluation ~6-11).

The shared CPU setting (configs/rotnet_cifar10_cpu.py): ResNet-18 at width 16 with the CIFAR
stem (32x32 input; layer3 8x8x64, layer4 4x4x128). One command (task 'bownet_chain'):
  1. RotNet = configs/rotnet_cifar10_cpu.py unchanged (the lead's CPU RotNet, linear head);
  2. vocabulary: k-means (K=2048, Lloyd) of its layer3 vectors, 8x8 map like the paper's CIFAR
     maps, 20 random locations of each of 10,000 random training images (200k vectors);
  3. BoWNet round 1, 1400 steps of 64 images (lr 0.1, x0.1 at step 1000): histogram BoW (eq. 3)
     of all 64 locations predicted from the student's pooled layer4 feature with the cosine head,
     perturbations + CutMix as in the paper recipe;
  4. evaluation of the teacher and the student on layer3 and pooled features with the RotNet CPU
     config's probes (linear probe 20 epochs, 5-way 1/5/10/50-shot, 1000 episodes, k-NN).
    python -m bow_jax.main --config=configs/bownet_cifar10_cpu.py --workdir=DIR
Data: $BOW_JAX_CIFAR10 or ../shared/data/cifar10 (train.npz, test.npz).
"""
import os

from bow_jax.config import (base_config, bownet_chain, cifar10_cpu_setting, probes,
                            schedule_of_checkpoints, sgd)


def get_config():
    c = cifar10_cpu_setting(base_config("bownet"))
    # 1400 x 64 student images (+ as many teacher forward passes): about the compute of the
    # RotNet teacher (400 x 64 images x 4 rotations). At 600 steps BoWNet only tied its teacher.
    c.num_train_steps = 1400
    c.steps_per_epoch = 100  # schedule "epochs" of 100 steps: lr 0.1, x0.1 from step 1000
    sgd(c, 0.1, nesterov=True, weight_decay=5e-4, schedule="step", milestones=(10,))
    schedule_of_checkpoints(c, 100, log_every=25)
    bownet_chain(c, os.path.join(os.path.dirname(__file__), "rotnet_cifar10_cpu.py"),
                 teacher_layer="layer3", num_words=2048, vocab_images=10_000,
                 vocab_max_vectors=200_000, kmeans_iters=20, rounds=1,
                 eval_features=("layer3", "pooled"))
    # The probes of configs/rotnet_cifar10_cpu.py, so the numbers compare with its RotNet.
    return probes(c, "pooled", shots=(1, 5, 10, 50), episodes=1000, linear_epochs=20)
