"""OBoW paper recipe: ResNet-50 on full ImageNet (official config/ImageNetFull/ResNet50_OBoW_full).

Teacher: EMA of the student (momentum 0.99 -> 1, per-step cosine), Resize 256 + CenterCrop 224 +
flip. Student: 2 RandomResizedCrops of 160 (scale 0.08-0.6) and 5 of the 9 jittered 96x96 patches
of one 256 crop (scale 0.6-1). BoW levels layer3 (conv4, 14x14) and layer4 (conv5, 7x7), K = 8192
words each, inv_delta 15 (delta_base 1/15), kappa 8. SGD momentum 0.9, wd 1e-4 on every parameter,
lr 0.03 with 10 warm-up epochs (linear per step from 0) then a per-epoch cosine towards 3e-5,
global batch 256, 200 epochs (5004 steps per epoch). README of the official code: 73.8% ImageNet
linear top-1.

Data: the prepared TFDS `imagenet2012` (in $TFDS_DATA_DIR or ~/tensorflow_datasets), streamed
through tf.data (`config.data.in_memory=False`); without it the run stops within seconds saying
how to prepare it (`tfds build imagenet2012` with the two ILSVRC2012 tars in the manual dir).
The linear-probe / few-shot evaluation of the frozen-feature runner needs in-memory data, so it is
off here; evaluate ImageNet features with a dedicated linear-probe run (batch 1024, lr 10, 100
epochs, cosine: reference section g). The official monitor head (a linear classifier on the
detached teacher conv5 features, trained on the labels alongside) is on: its accuracy is logged.
"""
import os

from bow_jax.config import base_config


def get_config():
    c = base_config("obow")
    c.model.name = "resnet50"
    c.model.kwargs.width = 64  # torchvision widths (overridable, e.g. for quick checks)
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    c.data.in_memory = False
    c.data.normalization = "imagenet"
    c.batch_size = 256
    c.num_epochs = 200
    c.optim.lr = 0.03
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 10
    c.optim.end_lr = 3e-5
    o = c.obow  # the defaults are this recipe's values; restated for the reader
    o.bow_levels = ("layer3", "layer4")
    o.num_words = 8192
    o.inv_delta = 15.0
    o.kappa = 8.0
    o.teacher_momentum = 0.99
    o.teacher_size, o.teacher_resize = 224, 256
    o.num_crops, o.crop_size, o.crop_scale = 2, 160, (0.08, 0.6)
    o.num_patches, o.patch_size, o.patch_source_size = 5, 96, 256
    o.patch_source_scale, o.patch_jitter = (0.6, 1.0), 24
    o.monitor, o.num_classes = True, 1000  # logged monitor_accuracy (not part of the method)
    c.log_every = 100
    c.checkpoint_every_steps = 5004  # about one epoch
    c.keep_every_steps = 5004 * 10  # and every 10th epoch, as the official `permanent: 10`
    c.eval.after_training = False
    return c
