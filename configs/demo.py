"""The demo: OBoW self-supervised pre-training on real images, then frozen-feature evaluation
(linear probe, 5-way few-shot, k-NN) printed side by side with the same network at random init.

    python3 -m bow_jax.main --config=configs/demo.py --workdir=/tmp/bow_demo

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, upsampled to 16x16; a
fixed stratified 4/5 train - 1/5 test split), so it runs anywhere, offline, on 2 CPU cores.
Method: OBoW (Gidaris et al., CVPR 2021; github.com/valeoai/obow), its maths unchanged; only its
settings are sized for tiny images and a few minutes of CPU. The RotNet demo it replaces is
configs/demo_rotnet.py.

Setting (ResNet-18 at width 16, CIFAR stem; 2,000 steps of 32 images, about 44 epochs):
- Views sized for 16x16 images: the teacher sees the whole image resized to 20x20, so its layer3
  map is 5x5, the smallest a BoW level may be (one border location is skipped on each side and
  queue words are 3x3 local averages); layer4 would be 3x3, so layer3 is the only BoW level. The
  student sees two 16x16 RandomResizedCrops (scale 0.2-1: a crop of 8% of an 8x8 digit is about
  two source pixels) and no patch group, so the student's BatchNorm statistics are taken at the
  size the probes read (with 8x8 patches and 12x12 crops the features collapsed: pooled linear
  20.6% at step 100). No flips: digits are not mirror-symmetric.
- Hard codes (inv_delta <= 0): on these 5x5 maps the soft codes of a random teacher are nearly
  flat (per-image perplexity 58 of 128 words at inv_delta 20, 26-40 at 60): the loss stayed at
  ln K and the features did not recover (inv_delta 60, batch 64, step 400: pooled linear 31.0,
  k-NN 40.6). Hard codes give ~7 words per image.
- Fast bootstrap: K = 128 words (the queue is renewed every 4 steps), teacher momentum 0.9 (the
  teacher follows the student within ~10 steps; cosine to 1), statistic momentum 0.9, lr 0.1 with
  one "epoch" (40 steps) of warm-up, cosine. Batch 32 instead of 64: the number of steps, not of
  images, sets how fast OBoW climbs out of its early dip (hard codes, pooled features, at 6,400
  images seen: batch 64 step 100 linear 18.9 / k-NN 50.7; batch 32 step 200 linear 66.8 / k-NN 71.0).
- Probes read 'pooled' (layer4, what the loss trains): at step 800 layer3 was still below random
  init on 5-way 5-shot (70.4 vs 74.5), pooled was above on every probe.

Learning curve (seed 0, 800-step cosine run, pooled, accuracies in %; random init 84.79 linear,
57.80 1-shot, 76.12 5-shot, 90.70 k-NN): OBoW first collapses, then climbs past random init:
  step 100: 25.4 / 34.3 / 42.6 / 62.5    step 400: 88.5 / 65.4 / 76.9 / 84.5
  step 200: 66.8 / 50.0 / 58.0 / 71.0    step 600: 92.4 / 70.6 / 81.4 / 89.0
  step 300: 83.7 / 62.3 / 71.4 / 82.8    step 800: 93.2 / 72.9 / 83.1 / 92.4

Result (pooled, accuracies in %; 355 test digits, one image is 0.28 points; 2-core machine,
2026-11-29). The setting was chosen at 1,200 steps, where seed 1 later lost on 5-shot and k-NN
(78.29 vs 81.72, 88.17 vs 92.39) once the code's float rounding changed; at 2,000 steps every
seed wins on every probe by a wide margin:
  seed  network          linear  1-shot  5-shot  k-NN
  0     OBoW 2000 steps  96.06   82.67   92.11   95.77
  0     random init      84.79   57.79   76.12   90.70
  1     OBoW 2000 steps  95.49   83.63   91.41   95.21
  1     random init      81.69   64.26   81.72   92.39
  2     OBoW 2000 steps  97.46   87.17   94.34   97.46
  2     random init      83.94   58.31   76.99   91.83
Speed: ~4.2 steps/s on the idle machine; seed 2 took 6 min 19 s end to end.
"""
from bow_jax.config import (base_config, digits_setting, obow_targets, obow_views, probes,
                            schedule_of_checkpoints, sgd)


def get_config():
    c = digits_setting(base_config("obow"))
    c.batch_size = 32
    c.num_train_steps = 2000
    c.steps_per_epoch = 40
    sgd(c, 0.1, weight_decay=5e-4, schedule="cosine", warmup_epochs=1)
    o = c.obow
    obow_targets(o, ("layer3",), num_words=128, inv_delta=0.0, kappa=5.0)  # hard codes
    o.stat_momentum = 0.9  # official 0.99; short run (configs/obow_cifar10_cpu.py)
    o.teacher_momentum = 0.9
    o.flip = False  # digits are not mirror-symmetric
    obow_views(o, teacher_size=20, teacher_resize=0, crop_size=16, crop_scale=(0.2, 1.0),
               num_patches=0)
    schedule_of_checkpoints(c, 1000, log_every=250)
    return probes(c, "pooled", episodes=500, random_init=True, linear_epochs=30)
