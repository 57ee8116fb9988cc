"""RotNet ResNet-50 on full ImageNet: the teacher of BoWNet's ImageNet recipe (Gidaris et al.,
"Learning Representations by Predicting Bags of Visual Words", CVPR 2020, section 4.2: "We use
the ResNet-50 (v1) architecture with 224 x 224 input images for implementing the RotNet and
BoWNet models"), and the first stage of configs/bownet_resnet50_imagenet.py.

Network: torchvision ResNet-50 v1 (width 64). All 4 rotations (0, 90, 180, 270 degrees) of every
image in the same batch (RotNet, Gidaris et al., ICLR 2018). Rotation head: an extra residual
block on the last map (layer4, 7x7x2048), global average pooling and a 4-way linear layer:
BoWNet section 4.1.1, "The prediction head of RotNet consists of an extra residual block
(instead of just a linear layer) ... we followed this design choice of RotNet for all the
experiments in our paper" (that section's WRN puts it on its last block; the block's exact
shape for ResNet-50 is in the paper's appendix C.1, not in our copy: here a pre-activation
basic block of two 3x3 convolutions at 2048 channels, `methods.rotnet.ResidualHeadBlock`: 3.7
GMACs per input, about as much as the ResNet-50's own 4.1; a bottleneck block would cost 0.22,
but methods/rotnet.py has none). `--config.rotnet.head=linear` gives the ICLR paper's linear
head on the pooled feature.

Schedule: the BoWNet paper does not state its RotNet's. Chosen: the official RotNet code's
ImageNet config (github.com/gidariss/FeatureLearningRotNet, config/ImageNet_RotNet_AlexNet.py):
SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 192 images (x4 rotations = 768
inputs), 50 epochs, lr 0.01 x0.1 at epochs 15, 30 and 45 (its LUT_lr; the ICLR 2018 paper's
ImageNet implementation details state batch 192, lr 0.01 and 30 epochs, x0.1 after 10 and 20:
the released code trains longer, and is what its authors ran). Both are AlexNet schedules. An
epoch is 1,281,167 // 192 = 6672 steps.

Views: RandomResizedCrop(224) (scale 0.08-1, aspect 3/4-4/3) + horizontal flip, what the
official ImageNet config asks for (random_sized_crop=True: torchvision's RandomSizedCrop(224)).
`--config.rotnet.view=crop --config.rotnet.resize=256` gives the code's other ImageNet transform,
Resize(256) + RandomCrop(224) + flip.

Data: the prepared TFDS `imagenet2012` (in $TFDS_DATA_DIR or ~/tensorflow_datasets), streamed
(`config.data.in_memory=False`: each image decoded once into a canvas, the view cut on the
device). Evaluation after training (and with --config.task=evaluate): `imagenet_probes` (pooled
2048-d feature; the OBoW official linear probe, 50-way few-shot, 20-NN; the k-NN monitor every
epoch). The BoWNet paper's RotNet* (its ResNet-50 RotNet): ImageNet linear 40.6% pool5 (52.5%
best conv layer, Table 5), VOC07 SVM 64.6 conv4 / 62.8 conv5 mAP (Table 4).

    python -m bow_jax.main --config=configs/rotnet_resnet50_imagenet.py --workdir=DIR
"""
from bow_jax.config import (base_config, imagenet_probes, imagenet_setting,
                            schedule_of_checkpoints, sgd)

STEPS_PER_EPOCH = 1_281_167 // 192  # 6672


def get_config():
    c = imagenet_setting(base_config("rotnet"), "resnet50", "imagenet2012")
    c.batch_size = 192
    c.num_epochs = 50
    sgd(c, 0.01, nesterov=True, weight_decay=5e-4, schedule="step", milestones=(15, 30, 45))
    r = c.rotnet
    r.head, r.head_feature = "residual", "layer4"
    r.view, r.crop_size, r.crop_scale, r.crop_padding, r.flip = (
        "resized_crop", 224, (0.08, 1.0), 0, True)
    # About one epoch; every 10th epoch kept for good.
    schedule_of_checkpoints(c, STEPS_PER_EPOCH, keep_every=STEPS_PER_EPOCH * 10, log_every=100)
    return imagenet_probes(c, "imagenet_r50_obow", monitor_every=STEPS_PER_EPOCH)
