"""OBoW paper ablation recipe: ResNet-18 "vanilla" on ImageNet-20% (config/ImageNet20/
ResNet18_OBoW_vanilla): one BoW level (layer4 = conv5), one 160 crop, no patches.

K = 8192, inv_delta 10, kappa 5; SGD momentum 0.9, wd 5e-4, lr 0.05 with a per-epoch cosine to 0,
no warm-up, batch 256, 80 epochs. Teacher and crop views as in configs/obow_resnet50.py.

ImageNet-20% is "the first 260 images of each class in sorted-filename order" (260,000 images).
The TFDS catalog has no such split and bow_jax's data layer does not slice per class, so it is a
TFDS dataset of its own, `imagenet20`, built once offline from the extracted ILSVRC2012 train
folder (TRAIN_DIR/<wnid>/<file>.JPEG) and the validation images sorted into the same <wnid>/
folders (VAL_DIR); this script (checked with tensorflow-datasets 4.9.10) writes it to DATA_DIR:

    import os, tensorflow_datasets as tfds
    TRAIN_DIR, VAL_DIR, DATA_DIR = ..., ..., ...
    class Imagenet20(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000)}))
        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(TRAIN_DIR, 260),
                    "test": self._generate_examples(VAL_DIR, None)}
        def _generate_examples(self, root, per_class):
            for label, wnid in enumerate(sorted(os.listdir(root))):
                for name in sorted(os.listdir(os.path.join(root, wnid)))[:per_class]:
                    yield f"{wnid}/{name}", {"image": os.path.join(root, wnid, name),
                                             "label": label}
    Imagenet20(data_dir=DATA_DIR).download_and_prepare()

then train with --config.data.data_dir=DATA_DIR (TFDS finds a prepared dataset by name there).
Without it the run stops at once naming config.data.name. To train on all of ImageNet instead,
prepare `imagenet2012` and pass --config.data.name=imagenet2012 (not the paper's setting).

Evaluation after training: the paper's ResNet-18 linear probe on precached features of the centre
crop and its flip (batch 256, lr 10, wd 2e-6, 50 epochs, x0.1 at 15/30/45), 50-way 1/5-shot
episodes on the validation images of 300 classes drawn with seed 0 (config.eval.fewshot_classes),
and k-NN (see configs/obow_resnet50.py); the k-NN monitor every epoch during training. Paper
(Gidaris et al., CVPR 2021, Table 5, 80 epochs): linear 45.86%, 1-shot 42.11%, 5-shot 62.44%.
"""
from bow_jax.config import (base_config, imagenet_probes, imagenet_setting, obow_targets,
                            schedule_of_checkpoints, sgd)

def get_config():
    c = imagenet_setting(base_config("obow"), "resnet18", "imagenet20")
    c.batch_size = 256
    c.num_epochs = 80
    sgd(c, 0.05, weight_decay=5e-4, schedule="cosine")
    o = c.obow
    obow_targets(o, ("layer4",), num_words=8192, inv_delta=10.0, kappa=5.0)
    o.num_crops = 1
    o.num_patches = 0
    o.monitor, o.num_classes = True, 1000  # logged monitor_accuracy (not part of the method)
    schedule_of_checkpoints(c, 1015, log_every=100)  # one epoch of 260,000 images at batch 256
    return imagenet_probes(c, "imagenet_r18_obow", monitor_every=1015)
