"""OBoW paper transfer protocol: the ImageNet-trained ResNet-50 of configs/obow_resnet50.py scored
by a 205-way linear classifier on Places205 (Gidaris et al., "OBoW: Online Bag-of-Visual-Words
Generation for Self-Supervised Learning", CVPR 2021, Table 6: OBoW 56.8% Places205 linear top-1,
supervised ResNet-50 53.2%).

Run it on the training run's workdir (the task is `evaluate`; the network, its config and
config.data stay those of configs/obow_resnet50.py, whose ImageNet description the restore still
reads):

    python3 -m bow_jax.main --config=configs/obow_resnet50_places205.py --workdir=DIR

Probe: the official code's Places205 command (its README; `linear.PROTOCOLS['places205']`):
BatchNorm without affine before the linear layer on the 2048-d pooled features, SGD momentum 0.9,
batch 256, lr 0.01, wd 1e-5, 28 epochs, x0.1 at epochs 10 and 20. (The paper's text says 14 epochs,
x0.1 at 5 and 10, wd 1e-4; the README's run name says "wd1e4" but passes 1e-5: the command is
followed.) Features are those of Resize(256) + CenterCrop(224) (config.eval.image_size=224),
extracted once and cached in DIR/eval/features; the official probe trains on RandomCrop(224) + flip
views of each image, so expect the cached-feature stand-in a little below 56.8. Only the linear
protocol runs (config.eval.protocols=('linear',): few-shot and k-NN are not part of the paper's
Places205 protocol; `--config.eval.protocols="('linear', 'knn')"` adds k-NN).

Data (config.eval.data; config.data's splits are not read for evaluation, and the network's input
normalisation stays config.data.normalization, ImageNet's):
* an image folder, the default: $PLACES205_DIR (default ../shared/data/places205) holding
  `train/<class>/<image>.jpg` (the 2.45M training images, 205 class folders) and
  `test/<class>/<image>.jpg` (the 20,500 validation images, 100 per class, in folders named as
  train's: the evaluation reads splits 'train' and 'test', so a validation folder `val/` is passed
  as `ln -s val $PLACES205_DIR/test`). Override with `--config.eval.data.path=PATH`;
* or a TFDS builder you prepare (Places205 is not in the TFDS catalog) with splits 'train' and
  'test' and features 'image' / 'label': `--config.eval.data.source=tfds
  --config.eval.data.name=NAME --config.eval.data.data_dir=DIR`.
A missing folder stops the run before any work, naming config.eval.data.path.
"""
import os

from bow_jax.config import get_recipe


def get_config():
    c = get_recipe(os.path.join(os.path.dirname(__file__), "obow_resnet50.py"))
    c.task = "evaluate"
    c.eval.update(dict(linear_protocol="places205", image_size=224, protocols=("linear",),
                       fewshot_classes=""))
    c.eval.data.update(dict(source="image_folder", image_size=224,
                            path=os.environ.get("PLACES205_DIR", "../shared/data/places205")))
    return c
