"""OBoW on CIFAR-10 with a full-width ResNet-18 (CIFAR stem), sized for one GPU.

32x32 images make layer4 4x4, below OBoW's 5x5 minimum (one border location is skipped on each
side and queue words are 3x3 local averages, as in the official code), so the teacher sees
the whole image resized to 48x48 (layer3 12x12, layer4 6x6) and both levels of the paper's "full"
model are kept. Student views scaled from the ImageNet recipe (factor about 1/5): two 32x32
RandomResizedCrops (scale 0.08-0.6) and five 20x20 jittered patches (jitter 5) of one 56x56
RandomResizedCrop (scale 0.6-1). ResNet-18 values of the official configs: kappa 5, inv_delta 10,
lr 0.05, wd 5e-4, per-epoch cosine; K = 4096 words (batch 256: renewed every 16 steps), 200 epochs.
Evaluated on the pooled layer4 vector (what the student was trained to make predictive).
Data: $BOW_JAX_CIFAR10 or ../shared/data/cifar10 (train.npz, test.npz), held on the device.
"""
from bow_jax.config import (base_config, cifar10_npz, obow_targets, obow_views,
                            schedule_of_checkpoints, sgd)

def get_config():
    c = base_config("obow")
    c.model.name = "resnet18"
    c.model.kwargs.cifar_stem = True
    cifar10_npz(c)
    c.batch_size = 256
    c.num_epochs = 200
    sgd(c, 0.05, weight_decay=5e-4, schedule="cosine")
    o = c.obow
    obow_targets(o, ("layer3", "layer4"), num_words=4096, inv_delta=10.0, kappa=5.0)
    # The whole 32x32 image, resized to 48x48, as the teacher view.
    obow_views(o, teacher_size=48, teacher_resize=0, crop_size=32, crop_scale=o.crop_scale,
               patch_size=20, patch_source_size=56, patch_jitter=5)
    o.monitor, o.num_classes = True, 10  # logged monitor_accuracy (not part of the method)
    schedule_of_checkpoints(c, 195 * 10, keep_every=195 * 50, log_every=100)
    c.eval.feature = "pooled"
    c.eval.random_init = True
    return c
