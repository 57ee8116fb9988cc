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
"""
import os

from bow_jax.config import base_config


def get_config():
    c = base_config("obow")
    c.model.name = "resnet18"
    c.model.kwargs.width = 64  # torchvision widths (overridable, e.g. for quick checks)
    c.data.source = "tfds"
    c.data.name = "imagenet20"
    c.data.data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    c.data.in_memory = False
    c.data.normalization = "imagenet"
    c.batch_size = 256
    c.num_epochs = 80
    c.optim.lr = 0.05
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 0
    c.optim.end_lr = 0.0
    o = c.obow
    o.bow_levels = ("layer4",)
    o.num_words = 8192
    o.inv_delta = 10.0
    o.kappa = 5.0
    o.num_crops = 1
    o.num_patches = 0
    o.monitor, o.num_classes = True, 1000  # logged monitor_accuracy (not part of the method)
    c.log_every = 100
    c.checkpoint_every_steps = 1015  # one epoch of 260,000 images at batch 256
    c.eval.after_training = False
    return c
