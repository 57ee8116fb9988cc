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

from bow_jax.config import base_config, load_config_file


def get_config():
    c = base_config("bownet")
    c.task = "bownet_chain"
    c.model.name = "wrn28"
    c.model.kwargs.widen_factor = 10
    c.data.source = "tfds"
    c.data.name = "cifar100"
    c.data.normalization = "cifar"
    c.batch_size = 128
    c.steps_per_epoch = 2000
    c.num_epochs = 30
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.milestones = (12, 24)
    c.optim.decay = 0.1
    c.log_every = 100
    c.checkpoint_every_steps = 2000
    c.keep_every_steps = 10 * 2000

    b = c.bownet
    b.rotnet = load_config_file(os.path.join(os.path.dirname(__file__), "rotnet_cifar100_wrn.py"))
    b.teacher_layer = "block3"
    b.num_words = 2048
    b.target = "histogram"
    b.border = 0
    b.pyramid = False
    b.student_feature = "pooled"
    b.vocab_max_vectors = 1_000_000
    b.kmeans_iters = 50
    b.rounds = 1

    c.eval.feature = "pooled"
    c.eval.linear_protocol = "cifar_bownet"
    c.eval.fewshot_shots = (1, 5, 10, 50)
    c.eval.fewshot_ways = 5
    c.eval.fewshot_queries = 15
    c.eval.fewshot_episodes = 2000
    return c
