"""OBoW on CIFAR-10 with the official code's CIFAR recipe (github.com/valeoai/obow), equal config.

What it reproduces: the official OBoW CIFAR-10 setting, short (780 steps = 2 epochs of 390 steps),
sized to run on the 2-core CPU machine in the background:

  network   WRN-16-2 of the official code (`wrn_obow`: 690,384 parameters, pooled 128-d), strides
            (1, 2, 2): at 32x32 block1 32x32x32, block2 16x16x64, block3 8x8x128
  BoW       levels block2 + block3, K = 2048 words per level (queue renewed every 16 steps at
            batch 128), inv_delta 10 (delta_base 1/10), kappa 5, mean-min-distance statistic
            momentum 0.99, teacher EMA momentum 0.99 -> 1 (per-step cosine over the 780 steps)
  views     teacher: the whole 32x32 image (+ flip; block3 is 8x8 >= the 5x5 OBoW needs);
            student: 2 RandomResizedCrops of 24 (scale 0.2-0.6) and 5 of the 3x3 jittered 16x16
            patches (jitter 4) of one 36x36 RandomResizedCrop (scale 0.6-1); colour jitter
            0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, no blur
  optim     batch 128, SGD lr 0.05, momentum 0.9, weight decay 5e-4 on every parameter, cosine to 0
            per step (steps_per_epoch = 1 makes the schedules' "epoch" one step; the data still
            passes over all 50k images per 390 steps), no warm-up, 780 steps
  eval      frozen student, 'pooled' = global average of block3 (128-d), on all 50k train / 10k
            test images: standardised multinomial logistic regression solved by L-BFGS
            ('logistic_standardized': scikit-learn's StandardScaler + LogisticRegression(C=1),
            no schedule to tune), 20-NN (cosine, exp(s/0.07) votes), 5-way 1- and 5-shot
            prototypes (15 queries, 1000 episodes), beside the same network at random
            initialisation.

A logged `monitor_accuracy` (linear classifier on the detached teacher block3; cannot reach the
backbones) tracks progress. How long: on the idle 2-core CPU machine 33 images/s (0.26 steps/s:
128 teacher images, 256 crops and 640 patches through the WRN per step), so ~50 min for the 780
steps plus ~6 min of evaluation (2026-11-30); on one GPU it is minutes. Result (README, Results):
OBoW 46.27 linear / 30.62 1-shot / 38.31 5-shot / 41.96 k-NN against 41.77 / 26.65 / 30.93 /
38.30 for the same network at random init.

Data: $BOW_JAX_CIFAR10 or ../shared/data/cifar10 (train.npz, test.npz).
"""
from bow_jax.config import (base_config, cifar10_npz, obow_targets, obow_views, probes,
                            schedule_of_checkpoints, sgd)


def get_config():
    c = base_config("obow")
    cifar10_npz(c)
    c.model.name = "wrn_obow"
    c.model.kwargs = {"depth": 16, "widen_factor": 2, "strides": (1, 2, 2)}
    c.batch_size = 128
    c.num_train_steps = 780
    c.steps_per_epoch = 1  # the per-"epoch" cosine changes every step
    sgd(c, 0.05, weight_decay=5e-4, schedule="cosine")
    o = c.obow
    obow_targets(o, ("block2", "block3"), num_words=2048, inv_delta=10.0, kappa=5.0)
    o.stat_momentum = 0.99
    o.teacher_momentum = 0.99
    # The whole image (already 32x32: no resize) as the teacher view.
    obow_views(o, teacher_size=32, teacher_resize=0, crop_size=24, crop_scale=(0.2, 0.6),
               patch_size=16, patch_source_size=36, patch_jitter=4)
    o.color_jitter, o.color_jitter_p, o.grayscale_p = (0.4, 0.4, 0.4, 0.1), 0.8, 0.2
    o.blur_p = 0.0
    o.monitor, o.num_classes, o.monitor_feature = True, 10, "block3"
    schedule_of_checkpoints(c, 130, log_every=10)
    # pooled = global average of block3.
    return probes(c, "pooled", episodes=1000, random_init=True,
                  linear_protocol="logistic_standardized")
