"""Export a run's latest checkpoint as a torchvision ResNet `.pth` (or a Detectron2 `.pkl`), or
score a torchvision / official OBoW file.

    # our checkpoint -> torchvision (torchvision.models.resnet50().load_state_dict(torch.load(OUT)))
    python scripts/convert_to_torchvision.py --config=configs/obow_resnet50.py --workdir=RUN \
        --out=RUN/resnet50.pth [--layout=obow|detectron2] [--fc=zero|random|none] \
        [--network=teacher]

    # any torchvision ResNet file -> our linear probe / few-shot / k-NN (results in WORKDIR/eval)
    python scripts/convert_to_torchvision.py --config=configs/<eval data + model>.py \
        --workdir=WORKDIR --evaluate=resnet50.pth [--network=teacher]

`--layout=obow` writes the official OBoW release layout ({'network': state_dict}, fc = kappa·G(V)
of the last BoW level; OBoW runs only); `--layout=detectron2` a `.pkl` for Detectron2's
DetectionCheckpointer (Detectron2's ResNet names, no fc). `--evaluate` also reads the official
OBoW files (entire model: `--network` picks student or teacher). The backbone is config.model
(name and kwargs); a torchvision file is read with torch.load(weights_only=True) only. torch is
imported first, before anything that could import TensorFlow.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bow_jax.export import torchvision  # noqa: E402  (torch itself is imported in main, first)
from bow_jax.tasks import evaluate_torchvision, export  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's workdir (export: read; --evaluate: results).")
flags.DEFINE_string("out", "", "Output .pth / .pkl (default: export.default_path).")
flags.DEFINE_enum("layout", "torchvision", list(export.LAYOUTS),
                  "'torchvision': plain state dict; 'obow': {'network': sd} with fc = kappa G(V); "
                  "'detectron2': .pkl with Detectron2's ResNet names.")
flags.DEFINE_enum("network", "student", list(torchvision.NETWORKS),
                  "The backbone exported, or read from an official OBoW entire-model file.")
flags.DEFINE_enum("fc", "zero", ["zero", "random", "none", "params"],
                  "The fc written in the torchvision layout (zero / torch init / absent / ours).")
flags.DEFINE_integer("num_classes", 1000, "fc rows for --fc=zero|random.")
flags.DEFINE_string("evaluate", "", "Instead of exporting: score this torchvision .pth file with "
                    "config.eval's protocols on config.data.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    torchvision.import_torch()  # before any TensorFlow import (the reverse order can crash)
    config = FLAGS.config
    with config.unlocked():
        config.export = export.default_config()
        config.export.network = FLAGS.network
    if FLAGS.evaluate:
        evaluate_torchvision.run(config, FLAGS.workdir, FLAGS.evaluate)
        return
    with config.unlocked():
        config.export.path = FLAGS.out
        config.export.layout = FLAGS.layout
        config.export.fc = FLAGS.fc
        config.export.num_classes = FLAGS.num_classes
    export.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
