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
Evaluation after training (and with --config.task=evaluate), the paper's (Gidaris et al., CVPR
2021, Table 6 and section 4.1) protocols:
  linear    the official README's probe, trained on RandomResizedCrop(224) + flip views of the
            streamed training images through the frozen backbone (batch 1024, lr 10, wd 0, 100
            epochs, per-epoch cosine; `evaluate.augmented_linear`, checkpointed under
            DIR/eval/linear/ and resumed), scored on the cached centre crops (Resize 256 +
            CenterCrop 224) of the validation images. Paper: 73.8% top-1.
  few-shot  50-way 1/5-shot episodes (1 query, 200 episodes, prototypes) on the validation
            images of 300 classes drawn with seed 0 (config.eval.fewshot_classes='random:300:0';
            the paper's held-out novel classes: pass the low-shot benchmark's file, see
            `bow_jax.config.imagenet_probes`).
  k-NN      20-NN on the cached pooled features.
  Places205 configs/obow_resnet50_places205.py (paper: 56.8%); semi-supervised fine-tuning on
            1% / 10% of the labels: --config.task=finetune (paper: 82.9% / 90.7% top-5).
During training: the k-NN monitor every epoch (`knn_top1`: 10k training images as memory, 5k
validation images as queries) and the official monitor head (a linear classifier on the detached
teacher conv5 features, trained on the labels alongside: `monitor_accuracy`).
"""
from bow_jax.config import (base_config, imagenet_probes, imagenet_setting, obow_targets,
                            obow_views, schedule_of_checkpoints, sgd)

def get_config():
    c = imagenet_setting(base_config("obow"), "resnet50", "imagenet2012")
    c.batch_size = 256
    c.num_epochs = 200
    sgd(c, 0.03, weight_decay=1e-4, schedule="cosine", warmup_epochs=10, end_lr=3e-5)
    o = c.obow  # the defaults are this recipe's values; restated for the reader
    obow_targets(o, ("layer3", "layer4"), num_words=8192, inv_delta=15.0, kappa=8.0)
    o.teacher_momentum = 0.99
    obow_views(o, teacher_size=224, teacher_resize=256, crop_size=160, crop_scale=(0.08, 0.6),
               patch_size=96, patch_source_size=256, patch_jitter=24)
    o.monitor, o.num_classes = True, 1000  # logged monitor_accuracy (not part of the method)
    # About one epoch; every 10th epoch kept for good, as the official `permanent: 10`.
    schedule_of_checkpoints(c, 5004, keep_every=5004 * 10, log_every=100)
    return imagenet_probes(c, "imagenet_r50_obow", monitor_every=5004)
