"""OBoW paper transfer protocol: the ImageNet-trained ResNet-50 of configs/obow_resnet50.py scored
on Pascal VOC 2007 classification by per-class linear SVMs (Gidaris et al., "OBoW: Online
Bag-of-Visual-Words Generation for Self-Supervised Learning", CVPR 2021, Table 6: OBoW 89.3 mAP;
BoWNet, CVPR 2020, Table 3, scores conv4 / conv5 the same way).

Run it on the training run's workdir (the task is `evaluate`; the network, its config and
config.data stay those of configs/obow_resnet50.py):

    VOC07_TFDS_DIR=DIR python3 -m bow_jax.main --config=configs/obow_resnet50_voc07.py \
        --workdir=RUN

Protocol (`protocols.voc07`, the benchmark of Goyal et al. 2019, fair_self_supervision_benchmark
`tools/svm/`): features of trainval (TFDS 'train+validation', 5,011 images) and test (4,952),
each image resized with its shorter side to 256 then wholly to 224x224 (no crop, no flip;
config.eval.transform='resize_whole'), ImageNet normalisation; the 2048-d global average pool
('pooled'); rows L2-normalised; per class a LinearSVC with its cost chosen by 3-fold
cross-validated AP among `voc07.COSTS`, refit on trainval; per-class all-points AP on test with
difficult-only images left out; mAP over the 20 classes. BoWNet's columns:
`--config.eval.feature=layer4_pool2` (conv5, 2x2x2048) or `layer3_pool3` (conv4, 3x3x1024).
Features are cached in RUN/eval/features like every protocol's. Linear probe, few-shot and k-NN
are off.

Data: TFDS `voc/2007` prepared in $VOC07_TFDS_DIR (default: TFDS's own data_dir), e.g.
`python3 -c "import tensorflow_datasets as tfds; tfds.builder('voc/2007', data_dir=DIR)
.download_and_prepare()"` on a machine with network. Its 'labels' / 'labels_no_difficult'
features give the targets (1 / -1 difficult only / 0).

config.eval.transform, train_split and test_split are read by `data.eval_input`.
"""
import os

from bow_jax.config import get_recipe


def get_config():
    c = get_recipe(os.path.join(os.path.dirname(__file__), "obow_resnet50.py"))
    c.task = "evaluate"
    c.eval.update(dict(protocols=("voc07_svm",), feature="pooled", image_size=224,
                       resize_shorter=256, transform="resize_whole",
                       train_split="train+validation", test_split="test", fewshot_classes=""))
    c.eval.data.update(dict(source="tfds", name="voc/2007", in_memory=False,
                            data_dir=os.environ.get("VOC07_TFDS_DIR", "")))
    return c
