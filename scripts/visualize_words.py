"""The image patches that best match chosen visual words, as one PNG grid (BoWNet fig. 5, OBoW
fig. 6): one row per word, its top patches left to right.

    python scripts/visualize_words.py --config=configs/obow_cifar10_cpu.py --workdir=RUN \
        --words=0,1,2 [--level=layer4] [--top=8] [--num_images=2000] --out=words.png

How: the teacher's feature map of the level is computed for (a subset of) the training images,
with eval-mode BatchNorm; every location is compared with every word (squared Euclidean distance,
after skipping the method's border). With --assignment=nearest (default; BoWNet's hard words) a
location counts for a word only if that word is its nearest one, ranked by distance; with 'soft'
(OBoW) the score is the soft assignment softmax(-inv_delta / m * d). Each image contributes at most
one patch per word (its best location). The location is mapped back to the input image: a square
of --patch pixels (default 3 strides of the map, "receptive-field-ish") centred on it.

Where the words come from (`word_source`):
  obow    the teacher (EMA) backbone, state.vocabularies[level] (the queue), the teacher's input
          size config.obow.teacher_size, border config.obow.border, m = state.mean_min_dist;
  bownet  the frozen teacher backbone and state.vocabulary at config.bownet.teacher_layer;
  rotnet  (fallback, no vocabulary of its own) the backbone, and a k-means vocabulary of
          --kmeans_words words computed on the fly on the same images' features.
The PNG is written atomically (temporary file + rename).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional, Sequence

import numpy as np

# absl / jax are imported in main() and the functions, so `--help` is instant.

MODES = ("nearest", "soft")
GAP = 2  # pixels between tiles
BACKGROUND = (255, 255, 255)
EMPTY = (200, 200, 200)  # a word with fewer matching images than --top


@dataclasses.dataclass
class WordSource:
    """What the figure needs from a trained model."""
    backbone: Any
    variables: Any  # {'params', 'batch_stats'} of the (teacher) backbone
    vocabulary: np.ndarray  # [K, C]
    level: str
    border: int
    input_size: Optional[int]  # images are resized to this square size first (None: as stored)
    inv_delta: Optional[float] = None  # soft scores: softmax(-inv_delta / m * d)
    mean_min_dist: Optional[float] = None  # m; None: the mean minimum distance of the images


# ------------------------------------------------------------------------------------------------
# The maths (pure; tests check them against brute-force numpy).


def word_scores(fmap, vocabulary, *, border: int = 0, mode: str = "nearest",
                inv_delta: Optional[float] = None, mean_min_dist=None):
    """Per image and word, the best score over locations and where: ([B, K], [B, K] int32).

    fmap [B, h, w, C] (the raw map); the location index is into the border-cropped map, row-major.
    'nearest': -distance where the word is the location's nearest word, else -inf.
    'soft': softmax over words of -(inv_delta / m) * distance (m: `mean_min_dist`, default the
    mean minimum distance over this batch's locations).
    """
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from bow_jax.bow import quantize  # pylint: disable=import-outside-toplevel
    if mode not in MODES:
        raise ValueError(f"--assignment={mode!r}; expected one of {list(MODES)}.")
    fmap = quantize.skip_border(fmap.astype(jnp.float32), border)
    b, h, w, _ = fmap.shape
    dist = quantize.squared_distances(fmap, vocabulary).reshape(b, h * w, -1)
    if mode == "nearest":
        nearest = jnp.argmin(dist, axis=-1)
        own = jnp.arange(dist.shape[-1]) == nearest[..., None]
        scores = jnp.where(own, -dist, -jnp.inf)
    else:
        m = jnp.mean(jnp.min(dist, axis=-1)) if mean_min_dist is None else mean_min_dist
        scores = quantize.soft_assign(dist, inv_delta if inv_delta else 1.0, m)
    return jnp.max(scores, axis=1), jnp.argmax(scores, axis=1).astype(jnp.int32)


def top_matches(best: np.ndarray, where: np.ndarray, words: Sequence[int], top: int):
    """For each word: [(image index, location index)] of its `top` best images (fewer if fewer
    images have a finite score for it), best first; ties go to the lower image index."""
    out = []
    for k in words:
        scores = best[:, k]
        order = np.argsort(-scores, kind="stable")
        order = [i for i in order[:top] if np.isfinite(scores[i])]
        out.append([(int(i), int(where[i, k])) for i in order])
    return out


def patch_box(location: int, map_hw, border: int, image_hw, patch: int):
    """(top, left, size) in image pixels of the square of `patch` pixels centred on a location of
    the border-cropped map, shifted to lie inside the image."""
    h, w = map_hw
    inner_w = w - 2 * border
    row, col = divmod(int(location), inner_w)
    row, col = row + border, col + border
    stride_y, stride_x = image_hw[0] / h, image_hw[1] / w
    size = int(min(patch, image_hw[0], image_hw[1]))
    top = int(round((row + 0.5) * stride_y - size / 2))
    left = int(round((col + 0.5) * stride_x - size / 2))
    top = min(max(top, 0), image_hw[0] - size)
    left = min(max(left, 0), image_hw[1] - size)
    return top, left, size


def grid_size(num_words: int, top: int, tile: int) -> tuple:
    """(width, height) of the PNG: a label column and `top` tiles per row, GAP pixels apart."""
    return (GAP + tile + top * (tile + GAP), GAP + num_words * (tile + GAP))


def words_grid(images: np.ndarray, matches, words: Sequence[int], map_hw, border: int,
               patch: int, tile: int = 48):
    """The PIL image: row r shows word words[r]'s label then its matched patches (`matches` from
    `top_matches`), each resized to tile x tile; missing matches are grey squares."""
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
    top = max([len(m) for m in matches] + [1])
    width, height = grid_size(len(words), top, tile)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, (word, found) in enumerate(zip(words, matches)):
        y = GAP + r * (tile + GAP)
        draw.text((GAP + 2, y + tile // 2 - 5), f"#{word}", fill=(0, 0, 0))
        for c in range(top):
            x = GAP + tile + c * (tile + GAP)
            if c >= len(found):
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=EMPTY)
                continue
            image_index, location = found[c]
            t, l, s = patch_box(location, map_hw, border, images.shape[1:3], patch)
            crop = Image.fromarray(images[image_index, t:t + s, l:l + s])
            canvas.paste(crop.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
    return canvas


def save_png_atomic(image, path: str) -> str:
    """Writes a PIL image as PNG to a temporary file beside `path`, then renames it."""
    from bow_jax.lib import files  # pylint: disable=import-outside-toplevel
    with files.atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return path


# ------------------------------------------------------------------------------------------------
# Where the words come from, per method (thin on purpose: only public state fields).


def _level_maps(backbone, variables, images, level, mean, std, batch_size, mesh):
    """The level's eval-mode feature maps of uint8 images, [N, h, w, C] float32 on the host."""
    from bow_jax.protocols import features  # pylint: disable=import-outside-toplevel
    from bow_jax.methods import interface  # pylint: disable=import-outside-toplevel

    def encode(v, x):
        return backbone.apply(v, interface.to_network_input(x, mean, std), train=False)[level]

    return features.extract_features(encode, images, batch_size, mesh, variables=variables)


def kmeans_vocabulary(backbone, variables, images, level, mean, std, *, num_words: int,
                      border: int = 0, batch_size: int = 64, mesh=None, seed: int = 0):
    """A k-means vocabulary [num_words, C] of the level's (border-cropped) location features."""
    import jax  # pylint: disable=import-outside-toplevel
    from bow_jax.bow import kmeans  # pylint: disable=import-outside-toplevel
    maps = _level_maps(backbone, variables, images, level, mean, std, batch_size, mesh)
    if border:
        maps = maps[:, border:-border, border:-border]
    vectors = maps.reshape(-1, maps.shape[-1])
    if num_words > len(vectors):
        raise ValueError(f"--kmeans_words={num_words} exceeds the {len(vectors)} feature vectors "
                         "of the images; lower it or raise --num_images.")
    return np.asarray(kmeans.kmeans(jax.random.key(seed), vectors, num_words, n_iter=30).centroids)


def word_source(config, state, level: Optional[str] = None, *, images=None,
                kmeans_words: int = 64, batch_size: int = 64, mesh=None) -> WordSource:
    """The teacher backbone, vocabulary and level of a trained state (see the module docstring).

    `images` (uint8, as stored) are only needed by the RotNet fallback (k-means on the fly).
    """
    import jax  # pylint: disable=import-outside-toplevel
    from bow_jax.methods import interface  # pylint: disable=import-outside-toplevel
    method = config.method
    if method == "obow":
        from bow_jax.methods import obow  # pylint: disable=import-outside-toplevel
        levels = list(config.obow.bow_levels)
        level = level or levels[-1]
        if level not in levels:
            raise ValueError(f"--level={level!r} is not a BoW level of this run; "
                             f"config.obow.bow_levels={levels}.")
        i = levels.index(level)
        return WordSource(interface.backbone_from_config(config),
                          jax.device_get(obow.teacher_variables(state)),
                          np.asarray(jax.device_get(state.vocabularies[i])), level,
                          config.obow.border, config.obow.teacher_size,
                          inv_delta=config.obow.inv_delta if config.obow.inv_delta > 0 else None,
                          mean_min_dist=float(jax.device_get(state.mean_min_dist[i])))
    if method == "bownet":
        from bow_jax.methods import bownet  # pylint: disable=import-outside-toplevel
        layer = config.bownet.teacher_layer
        if level and level != layer:
            raise ValueError(f"--level={level!r}: this BoWNet's words live on its teacher's "
                             f"config.bownet.teacher_layer={layer!r}.")
        _, teacher_config = bownet.teacher_checkpoint(config.bownet.teacher_workdir)
        return WordSource(bownet.teacher_backbone(teacher_config),
                          jax.device_get(state.teacher), np.asarray(jax.device_get(
                              state.vocabulary)), layer, config.bownet.border, None)
    # RotNet (or any method with a backbone but no vocabulary): k-means words on the fly.
    level = level or "layer3"
    backbone = interface.backbone_from_config(config)
    variables = jax.device_get(interface.backbone_variables(state))
    if images is None:
        raise ValueError(f"config.method={method!r} has no vocabulary: pass images for k-means.")
    mean, std = interface.normalization(config)
    vocab = kmeans_vocabulary(backbone, variables, images, level, mean, std,
                              num_words=kmeans_words, batch_size=batch_size, mesh=mesh,
                              seed=config.seed)
    return WordSource(backbone, variables, vocab, level, 0, None)


def resize_images(images: np.ndarray, size: Optional[int]) -> np.ndarray:
    """uint8 [N, H, W, 3] resized (bilinear, PIL) to size x size; unchanged when None or equal."""
    if not size or images.shape[1:3] == (size, size):
        return images
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size),
                                                           Image.Resampling.BILINEAR))
                     for im in images])


def visual_words_figure(source: WordSource, images: np.ndarray, words: Sequence[int], mean, std,
                        *, top: int = 8, mode: str = "nearest", patch: int = 0, tile: int = 48,
                        batch_size: int = 64, mesh=None):
    """The PIL grid of `words`' top patches over `images` (uint8, as stored)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from bow_jax.protocols import features  # pylint: disable=import-outside-toplevel
    from bow_jax.methods import interface  # pylint: disable=import-outside-toplevel
    k = source.vocabulary.shape[0]
    bad = [w for w in words if not 0 <= w < k]
    if bad:
        raise ValueError(f"--words: {bad} outside the vocabulary's [0, {k}).")
    images = resize_images(images, source.input_size)
    backbone, level = source.backbone, source.level

    def encode(v, x):
        fmap = backbone.apply(v["backbone"], interface.to_network_input(x, mean, std),
                              train=False)[level]
        return word_scores(fmap, v["vocabulary"], border=source.border, mode=mode,
                           inv_delta=source.inv_delta, mean_min_dist=source.mean_min_dist)

    fmap_shape = jax.eval_shape(lambda v, x: backbone.apply(v, x, train=False)[level],
                                source.variables,
                                jnp.zeros((1,) + images.shape[1:3] + (3,)))
    if len(fmap_shape.shape) != 4:
        raise ValueError(f"--level={level!r} is not a spatial feature map "
                         f"(shape {fmap_shape.shape}).")
    map_shape = fmap_shape.shape[1:3]
    variables = {"backbone": source.variables, "vocabulary": np.asarray(source.vocabulary)}
    best, where = features.extract_features(encode, images, batch_size, mesh,
                                            variables=variables)
    matches = top_matches(best, where.astype(np.int64), words, top)
    stride = images.shape[1] / map_shape[0]
    patch = patch or int(round(3 * stride))
    return words_grid(images, matches, words, map_shape, source.border, patch, tile)


# ------------------------------------------------------------------------------------------------
# The command.


def main(argv):
    del argv
    from absl import flags  # pylint: disable=import-outside-toplevel
    from bow_jax.tasks import common  # pylint: disable=import-outside-toplevel
    from bow_jax.data.splits import load_split  # pylint: disable=import-outside-toplevel
    from bow_jax.methods import interface  # pylint: disable=import-outside-toplevel
    f = flags.FLAGS
    config = f.config
    with common.restore_trained(config, f.workdir, "visualise") as run:
        mesh, state = run.mesh, run.state
    data = load_split(config, f.split)
    images = data.images[:f.num_images] if f.num_images else data.images
    # A multiple of the device count (the batch is sharded over the mesh).
    batch = max(mesh.size, f.batch_size // mesh.size * mesh.size)
    source = word_source(config, state, f.level or None, images=images,
                         kmeans_words=f.kmeans_words, batch_size=batch, mesh=mesh)
    words = [int(w) for w in f.words.split(",") if w.strip()]
    mean, std = interface.normalization(config)
    figure = visual_words_figure(source, images, words, mean, std, top=f.top,
                                 mode=f.assignment, patch=f.patch, tile=f.tile, batch_size=batch,
                                 mesh=mesh)
    save_png_atomic(figure, f.out)
    print(f"{f.out}: {len(words)} words x top {f.top} ({config.method}, level {source.level}, "
          f"{len(images)} images)", flush=True)


def define_flags():
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
    config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run's workdir (latest checkpoint).")
    flags.DEFINE_string("level", "", "BoW level (feature map); default the method's last level.")
    flags.DEFINE_string("words", "0,1,2,3", "Comma-separated word indices, one row each.")
    flags.DEFINE_integer("top", 8, "Patches per word.")
    flags.DEFINE_integer("num_images", 2000, "Use the first N images of the split (0 = all).")
    flags.DEFINE_string("split", "train", "Data split searched.")
    flags.DEFINE_enum("assignment", "nearest", list(MODES), "Hard nearest-word or soft scores.")
    flags.DEFINE_integer("patch", 0, "Patch side in input pixels (0: 3 strides of the map).")
    flags.DEFINE_integer("tile", 48, "Tile side in the PNG.")
    flags.DEFINE_integer("kmeans_words", 64, "RotNet fallback: k-means vocabulary size.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
    flags.DEFINE_string("out", "words.png", "Output PNG.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app  # pylint: disable=import-outside-toplevel
    define_flags()
    app.run(main)
    sys.exit(0)
