"""How much class information do OBoW's targets carry? k-NN accuracy of the teacher's BoW targets.

    python scripts/obow_target_knn.py --config=configs/obow_cifar10_cpu.py [--workdir=DIR]
        [--train_every=5] [--test_images=2000]

For the teacher of the latest checkpoint in --workdir (or of the random initialisation without it),
on the teacher view of each image (the config's teacher_size, no flip): per BoW level, the
average-pooled teacher map and the BoW target (`quantize.obow_level_targets`, the config's K,
inv_delta, pooling and border) are scored by the weighted k-NN of the evaluation (k=20) on a
subset of the training images (every --train_every-th) against the first --test_images test
images. The vocabulary is a queue as training fills it: one word per image (the config's
word_sampling) from the K first training images of the subset; the temperature statistic is the
mean minimum distance of the subset (the value the running statistic settles at).

A student trained to predict targets that carry less class information than the teacher's own
features can lose information before the teacher improves: at random init on CIFAR-10 the BoW
targets score well below the pooled maps (README, OBoW section).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bow_jax.bow import quantize, vocabulary
from bow_jax.data import augment
from bow_jax.data.splits import load_split
from bow_jax.protocols import knn
from bow_jax.methods import interface, create_method, data_info_for
from bow_jax.tasks import common

FLAGS = flags.FLAGS


def define_flags():
    """Defined when run as a script only (tests import this module)."""
    config_flags.DEFINE_config_file("config", None, "An OBoW config file.", lock_config=True)
    flags.DEFINE_string("workdir", "", "Run whose latest checkpoint's teacher is scored "
                        "('' = the random initialisation).")
    flags.DEFINE_integer("train_every", 5, "Use every N-th training image as the k-NN memory.")
    flags.DEFINE_integer("test_images", 2000, "Score the first N test images.")
    flags.mark_flag_as_required("config")


def teacher_maps(config, state, images: np.ndarray, levels, batch: int = 500) -> dict:
    """{level: [N, h, w, C]} teacher maps of the teacher view (resize to teacher_size)."""
    cfg = config.obow
    backbone = interface.backbone_from_config(config)
    mean, std = interface.normalization(config)
    size = (cfg.teacher_size, cfg.teacher_size)

    @jax.jit
    def forward(x):
        if x.shape[1:3] != size:
            x = jax.vmap(lambda im: augment.resize(im, size))(x)
        feats, _ = backbone.apply(
            {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats},
            interface.to_network_input(x, mean, std), train=True,
            mutable=["batch_stats"])  # as in training: batch statistics
        return {level: feats[level] for level in levels}

    parts = [jax.device_get(forward(jnp.asarray(images[i:i + batch])))
             for i in range(0, len(images), batch)]
    return {level: np.concatenate([p[level] for p in parts]) for level in levels}


def bow_targets(cfg, train_map, test_map, level: str):
    """Targets of both splits over a queue filled from the first K training maps."""
    k = cfg.num_words
    if len(train_map) < k:
        raise ValueError(f"--train_every leaves {len(train_map)} training images, fewer than "
                         f"config.obow.num_words={k} (one queue word per image).")
    vocab = vocabulary.sample_words(jax.random.key(0), jnp.asarray(train_map[:k]),
                                    cfg.word_sampling, border=cfg.border, level=level)
    cropped = quantize.skip_border(jnp.asarray(train_map[:1000]), cfg.border)
    m = jnp.mean(jnp.min(quantize.squared_distances(cropped, vocab), axis=-1))
    inv_delta = cfg.inv_delta if cfg.inv_delta > 0 else None

    def targets(maps):
        return np.concatenate([np.asarray(quantize.obow_level_targets(
            jnp.asarray(maps[i:i + 500]), vocab, m, inv_delta=inv_delta, momentum=1.0,
            pool=cfg.bow_pool, border=cfg.border)[0]) for i in range(0, len(maps), 500)])
    return targets(train_map), targets(test_map)


def main(argv):
    del argv
    config = FLAGS.config
    train_split, test_split = load_split(config, "train"), load_split(config, "test")
    train_idx = np.arange(0, len(train_split), FLAGS.train_every)
    test_idx = np.arange(min(FLAGS.test_images, len(test_split)))
    if FLAGS.workdir:
        with common.restore_trained(config, FLAGS.workdir, "score") as run:
            state = run.state
        source = f"teacher of {FLAGS.workdir} step {int(state.step)}"
    else:
        method = create_method(config, data_info_for(config, train_split))
        state = jax.jit(method.init_state)(jax.random.key(config.seed))
        source = "teacher at random init"
    levels = tuple(config.obow.bow_levels)
    tr = teacher_maps(config, state, train_split.images[train_idx], levels)
    te = teacher_maps(config, state, test_split.images[test_idx], levels)
    y_tr, y_te = train_split.labels[train_idx], test_split.labels[test_idx]
    classes = train_split.num_classes

    def score(a, b):
        return 100 * knn.knn_accuracy(a, y_tr, b, y_te, classes)

    print(f"{source}; k-NN top-1 (%) with {len(train_idx)} training / {len(test_idx)} test images")
    print("| level | pooled teacher map | BoW target | target perplexity (per image) |")
    print("|---|---|---|---|")
    for level in levels:
        bow_tr, bow_te = bow_targets(config.obow, tr[level], te[level], level)
        perplexity = float(quantize.perplexity(jnp.asarray(bow_te))[0])
        print(f"| {level} | {score(tr[level].mean((1, 2)), te[level].mean((1, 2))):.2f} | "
              f"{score(bow_tr, bow_te):.2f} | {perplexity:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
