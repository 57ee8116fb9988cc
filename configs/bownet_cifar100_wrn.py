"""BoWNet, the paper's CIFAR-100 recipe (Gidaris et al., CVPR 2020, sections 2 and 4.1).

One command runs the whole chain (task 'bownet_chain', see bow_jax/tasks/bownet_chain.py):
RotNet WRN-28-10 (configs/rotnet_cifar100_wrn.py) → K=2048 k-means vocabulary of its last (3rd)
residual block ('block3', 8x8x640) → BoWNet WRN-28-10 predicting the histogram BoW (eq. 3) from
its 640-d pooled feature with the cosine head (eq. 5) → evaluation (100-way linear probe, 5-way
few-shot). Students: SGD momentum 0.9, batch 128, 30 epochs of 2000 iterations, lr 0.1 x0.1 after
epochs 12 and 24, wd 5e-4; perturbations = colour jitter, grayscale, random resized crop (scale
0.2-1, aspect 3/4-4/3), flip, CutMix. BoWNet x2 / x3: --config.bownet.rounds=2 / 3;
Sp-BoWNet: --config.bownet.pyramid=True.

Not in the paper, chosen here: colour-jitter strengths (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale
p 0.2, the crop scale range, gamma_init 1, all 64 map locations per image (border 0), k-means on
1M vectors (about 20 random locations per training image), 50 Lloyd iterations.
Data: TFDS 'cifar100', which must already be prepared in config.data.data_dir (nothing is
downloaded; without it the run stops at once with the TFDS message).
    python -m bow_jax.main --config=configs/bownet_cifar100_wrn.py --workdir=DIR
"""
import os

from bow_jax.config import base_config, bownet_chain, cifar100_wrn_setting


def get_config():
    c = cifar100_wrn_setting(base_config("bownet"))
    return bownet_chain(c, os.path.join(os.path.dirname(__file__), "rotnet_cifar100_wrn.py"),
                        teacher_layer="block3", num_words=2048, pyramid=False,
                        vocab_max_vectors=1_000_000, kmeans_iters=50, rounds=1)
