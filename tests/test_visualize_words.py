"""scripts/visualize_words.py: word scores and top matches against brute-force numpy, the patch
boxes, and whole PNG grids from a tiny RotNet (k-means fallback) and a tiny OBoW-like state."""
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bow_jax.data import datasets
from bow_jax.models import ResNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "visualize_words", os.path.join(REPO, "scripts", "visualize_words.py"))
vw = importlib.util.module_from_spec(_spec)
sys.modules["visualize_words"] = vw  # dataclasses look their module up there
_spec.loader.exec_module(vw)

MEAN, STD = (0.5,) * 3, (0.25,) * 3


def brute_force_best(fmap, vocab, border, mode, inv_delta=None, m=None):
    """Per image and word: best score and its location, by explicit loops over locations."""
    fmap = fmap[:, border:fmap.shape[1] - border, border:fmap.shape[2] - border]
    b, h, w, _ = fmap.shape
    k = len(vocab)
    best = np.full((b, k), -np.inf)
    where = np.zeros((b, k), np.int64)
    if mode == "soft" and m is None:
        m = np.mean([min(np.sum((fmap[i, y, x] - v) ** 2) for v in vocab)
                     for i in range(b) for y in range(h) for x in range(w)])
    for i in range(b):
        for loc in range(h * w):
            f = fmap[i, loc // w, loc % w].astype(np.float64)
            d = np.sum((f[None] - vocab) ** 2, axis=1)
            if mode == "nearest":
                scores = np.full(k, -np.inf)
                scores[np.argmin(d)] = -d[np.argmin(d)]
            else:
                z = -inv_delta / m * d
                scores = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            better = scores > best[i]
            best[i, better], where[i, better] = scores[better], loc
    return best, where


@pytest.mark.parametrize("mode,border", [("nearest", 0), ("nearest", 1), ("soft", 1)])
def test_word_scores_and_top_matches_match_brute_force(mode, border):
    rng = np.random.default_rng(0)
    fmap = np.abs(rng.normal(size=(5, 4, 4, 3))).astype(np.float32)
    vocab = np.abs(rng.normal(size=(6, 3))).astype(np.float32)
    best, where = jax.jit(lambda f, v: vw.word_scores(f, v, border=border, mode=mode,
                                                      inv_delta=10.0))(fmap, vocab)
    ref_best, ref_where = brute_force_best(fmap, vocab, border, mode, inv_delta=10.0)
    np.testing.assert_allclose(np.asarray(best), ref_best, rtol=1e-4, atol=1e-5)
    finite = np.isfinite(ref_best)
    np.testing.assert_array_equal(np.asarray(where)[finite], ref_where[finite])

    matches = vw.top_matches(np.asarray(best), np.asarray(where), [0, 3, 5], top=3)
    for k, found in zip([0, 3, 5], matches):
        order = [i for i in np.argsort(-ref_best[:, k], kind="stable")[:3]
                 if np.isfinite(ref_best[i, k])]
        assert found == [(i, ref_where[i, k]) for i in order]


def test_patch_boxes_are_centred_on_the_location_and_stay_inside():
    # 32x32 image, 4x4 map (stride 8), border 1: cropped map 2x2, location 0 = map cell (1, 1).
    assert vw.patch_box(0, (4, 4), 1, (32, 32), 8) == (8, 8, 8)
    assert vw.patch_box(3, (4, 4), 1, (32, 32), 16) == (12, 12, 16)  # cell (2, 2), centre 20
    assert vw.patch_box(0, (4, 4), 0, (32, 32), 24) == (0, 0, 24)  # clipped at the corner
    assert vw.patch_box(15, (4, 4), 0, (32, 32), 24) == (8, 8, 24)
    assert vw.patch_box(5, (4, 4), 0, (32, 32), 99) == (0, 0, 32)  # never larger than the image


def tiny_rotnet_config():
    from bow_jax.config import base_config
    c = base_config("rotnet")
    c.model.kwargs = ml_collections.ConfigDict(dict(width=4, cifar_stem=True))
    c.data.source = "digits"
    c.data.image_size = 16
    return c


def test_rotnet_fallback_figure_has_the_grid_shape_and_the_best_patches(tmp_path):
    from bow_jax.methods import rotnet
    config = tiny_rotnet_config()
    images = datasets.load_digits("train", image_size=16).images[:64]
    method = rotnet.create(config, types.SimpleNamespace(
        image_shape=(16, 16, 3), num_examples=64, steps_per_epoch=1, total_steps=1))
    state = jax.jit(method.init_state)(jax.random.key(0))
    source = vw.word_source(config, state, "layer3", images=images, kmeans_words=6,
                            batch_size=32)
    assert source.vocabulary.shape == (6, 16) and source.level == "layer3"

    words, top, tile = [0, 2, 5], 4, 16
    figure = vw.visual_words_figure(source, images, words, MEAN, STD, top=top, tile=tile,
                                    batch_size=32)
    path = vw.save_png_atomic(figure, str(tmp_path / "figs" / "words.png"))
    png = Image.open(path)
    assert png.format == "PNG" and png.size == vw.grid_size(len(words), top, tile)
    assert os.listdir(tmp_path / "figs") == ["words.png"]

    # The first tile of row 0 is the best image's patch, found here by brute force on maps
    # computed directly with the backbone.
    x = (images.astype(np.float32) / 255 - np.asarray(MEAN)) / np.asarray(STD)
    fmap = np.asarray(source.backbone.apply(source.variables, x, train=False)["layer3"])
    ref_best, ref_where = brute_force_best(fmap, source.vocabulary, 0, "nearest")
    i = int(np.argsort(-ref_best[:, 0], kind="stable")[0])
    t, l, s = vw.patch_box(ref_where[i, 0], fmap.shape[1:3], 0, (16, 16), 12)
    expected = Image.fromarray(images[i, t:t + s, l:l + s]).resize((tile, tile),
                                                                    Image.Resampling.NEAREST)
    x0, y0 = vw.GAP + tile, vw.GAP
    np.testing.assert_array_equal(np.asarray(png)[y0:y0 + tile, x0:x0 + tile],
                                  np.asarray(expected))
    with pytest.raises(ValueError, match=r"--words: \[9\] outside"):
        vw.visual_words_figure(source, images, [9], MEAN, STD)


def test_obow_source_reads_teacher_queue_and_statistic():
    """The OBoW words: the teacher's variables, the level's queue and m from the state; the
    teacher input size from the config (images resized to it)."""
    backbone = ResNet(stage_sizes=(1, 1), width=4, cifar_stem=True)
    teacher = jax.device_get(backbone.init(jax.random.key(1), jnp.zeros((1, 12, 12, 3)),
                                           train=False))
    rng = np.random.default_rng(0)
    state = types.SimpleNamespace(
        teacher_params=teacher["params"], teacher_batch_stats=teacher["batch_stats"],
        vocabularies=(rng.random((8, 4)).astype(np.float32),
                      rng.random((8, 8)).astype(np.float32)),
        mean_min_dist=(np.float32(0.3), np.float32(0.7)))
    config = ml_collections.ConfigDict(dict(
        method="obow", seed=0, model=dict(name="resnet18", kwargs=dict(width=4, cifar_stem=True)),
        obow=dict(bow_levels=("layer1", "layer2"), border=1, teacher_size=12, inv_delta=10.0)))
    source = vw.word_source(config, state)
    assert source.level == "layer2" and source.input_size == 12 and source.border == 1
    assert source.mean_min_dist == pytest.approx(0.7) and source.inv_delta == 10.0
    np.testing.assert_array_equal(source.vocabulary, state.vocabularies[1])
    assert jax.tree.all(jax.tree.map(np.array_equal, source.variables,
                                     {"params": teacher["params"],
                                      "batch_stats": teacher["batch_stats"]}))
    with pytest.raises(ValueError, match="--level='layer4' is not a BoW level"):
        vw.word_source(config, state, "layer4")

    source.backbone = backbone  # the same maps, a smaller compile
    images = datasets.load_digits("train", image_size=8).images[:16]
    figure = vw.visual_words_figure(source, images, [1, 7], MEAN, STD, top=3, mode="soft",
                                    tile=12, batch_size=16)
    assert figure.size == vw.grid_size(2, 3, 12)
    assert vw.resize_images(images, 12).shape == (16, 12, 12, 3)
