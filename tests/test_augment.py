"""Device-side augmentations vs independent references: NumPy written from torchvision's documented
formulas, colorsys, PIL (blur, resize, enhance) and fixed-point models of PIL's C code."""
import colorsys
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from sklearn.datasets import load_sample_images

from bow_jax.data import augment as A
from bow_jax.data import geometric, photometric


@pytest.fixture(scope="module")
def photo():
    """A real 64x64 RGB photo crop (uint8) that ships with scikit-learn."""
    return load_sample_images().images[0][100:164, 200:264].copy()


@pytest.fixture(scope="module")
def small(photo):
    """A 12x12 float crop with a few grey, black, white and saturated pixels added."""
    x = photo[20:32, 20:32].astype(np.float64) / 255.0
    x[0, 0] = (0.5, 0.5, 0.5)
    x[0, 1] = (0.0, 0.0, 0.0)
    x[0, 2] = (1.0, 1.0, 1.0)
    x[0, 3] = (1.0, 0.0, 0.0)
    x[0, 4] = (0.2, 0.9, 0.9)  # max shared by g and b
    x[0, 5] = (0.7, 0.7, 0.1)  # max shared by r and g
    return x


def key(i=0):
    return jax.random.key(i)


# One jit per function, shared by the tests (keeps the file fast on small CPUs).
OPS = [jax.jit(op) for op in A.COLOR_OPS]
BLUR = jax.jit(lambda x, s: A.gaussian_blur(x, s, max_sigma=2.0))


# ---------------------------------------------------------------------------------------------
# NumPy references, written from torchvision's documented float formulas


def np_gray(x):
    return x @ np.array([0.299, 0.587, 0.114])


def np_brightness(x, f):
    return np.clip(f * x, 0, 1)


def np_contrast(x, f):
    return np.clip(f * x + (1 - f) * np_gray(x).mean(), 0, 1)


def np_saturation(x, f):
    return np.clip(f * x + (1 - f) * np_gray(x)[..., None], 0, 1)


def np_hue(x, f):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*x[idx])
        out[idx] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
    return out


NP_OPS = (np_brightness, np_contrast, np_saturation, np_hue)


# ---------------------------------------------------------------------------------------------
# Value range, rotations, flip


def test_to_float_and_normalize(photo):
    x = A.to_float(jnp.asarray(photo))
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(x), photo / 255.0, atol=1e-7)
    with pytest.raises(ValueError, match="uint8"):
        A.to_float(x)
    y = A.normalize(x, A.IMAGENET_MEAN, A.IMAGENET_STD)
    ref = (photo / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    np.testing.assert_allclose(np.array(A.CIFAR_MEAN) * 255, [125.3, 123.0, 113.9])
    np.testing.assert_allclose(np.array(A.CIFAR_STD) * 255, [63.0, 62.1, 66.7])
    with pytest.raises(ValueError, match="mean/std"):
        A.normalize(x, (0.5, 0.5), (0.5, 0.5))


def test_augment_namespace_is_the_geometric_and_photometric_ops():
    assert A.resize is geometric.resize and A.cutmix is geometric.cutmix
    assert A.photometric is photometric.photometric and A.gaussian_blur is photometric.gaussian_blur


def test_rotate4_matches_rot90_image_major():
    images = np.random.default_rng(0).integers(0, 255, (3, 5, 5, 2), dtype=np.uint8)
    rotated, labels = jax.jit(A.rotate4)(jnp.asarray(images))
    assert rotated.shape == (12, 5, 5, 2) and rotated.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(labels), [0, 1, 2, 3] * 3)
    assert labels.dtype == jnp.int32
    for b in range(3):
        for k in range(4):
            np.testing.assert_array_equal(np.asarray(rotated[4 * b + k]), np.rot90(images[b], k))
    with pytest.raises(ValueError, match="square"):
        A.rotate4(jnp.zeros((1, 4, 5, 3)))


def test_random_flip_batch(photo):
    images = jnp.asarray(np.stack([photo[:8, :8]] * 32))
    out = np.asarray(jax.jit(A.random_flip_batch)(key(1), images))
    flipped = np.array([np.array_equal(o, photo[:8, :8][:, ::-1]) for o in out])
    kept = np.array([np.array_equal(o, photo[:8, :8]) for o in out])
    assert np.all(flipped ^ kept) and 4 <= flipped.sum() <= 28


# ---------------------------------------------------------------------------------------------
# Colour


@pytest.mark.parametrize("op_id", range(4))
def test_colour_ops_match_numpy(small, op_id):
    op = OPS[op_id]
    factors = (0.0, 0.6, 1.0, 1.7) if op_id < 3 else (0.1, -0.1, 0.37, 0.5, -0.5, 0.0)
    for f in factors:
        out = np.asarray(op(jnp.asarray(small, jnp.float32), f))
        np.testing.assert_allclose(out, NP_OPS[op_id](small, f), atol=2e-6, err_msg=f"factor {f}")


def test_colour_ops_cross_check_pil(photo):
    """PIL works on uint8 and rounds (and quantises HSV), so this is a loose check (0..255)."""
    crop = photo[20:32, 20:32]
    pil = Image.fromarray(crop)
    x = jnp.asarray(crop, jnp.float32) / 255.0
    pairs = ((ImageEnhance.Brightness, OPS[A.BRIGHTNESS]), (ImageEnhance.Contrast,
             OPS[A.CONTRAST]), (ImageEnhance.Color, OPS[A.SATURATION]))
    for enhancer, op in pairs:
        for f in (0.6, 1.4):
            ref = np.asarray(enhancer(pil).enhance(f), np.float64)
            assert np.abs(np.asarray(op(x, f)) * 255 - ref).max() <= 1.0, (enhancer, f)
    gray = np.asarray(pil.convert("L"), np.float64)
    assert np.abs(np.asarray(A.rgb_to_grayscale(x))[..., 0] * 255 - gray).max() <= 0.5
    # PIL HSV stores hue in 8 bits: shift by round(0.1 * 255) = 26 levels.
    hsv = np.asarray(pil.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + 26) % 256
    ref = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float64)
    diff = np.abs(np.asarray(OPS[A.HUE](x, 26 / 255)) * 255 - ref)
    assert diff.max() <= 4.0 and diff.mean() <= 0.5


def test_contrast_mean_is_over_the_group(small):
    group = np.stack([small, small[::-1] * 0.5])
    out = np.asarray(A.adjust_contrast(jnp.asarray(group, jnp.float32), 0.5))
    np.testing.assert_allclose(out, np_contrast(group, 0.5), atol=2e-6)


def test_jitter_params_ranges_and_orders():
    keys = jax.random.split(key(2), 2400)
    params = jax.jit(jax.vmap(lambda k: A.jitter_params(k, 1.5, 0.4, 0.4, 0.1)))
    orders, factors = map(np.asarray, params(keys))
    assert {tuple(o) for o in orders} == set(itertools.permutations(range(4)))
    position_freq = np.stack([(orders == op).mean(0) for op in range(4)])  # [op, position]
    np.testing.assert_allclose(position_freq, 0.25, atol=0.04)
    b, c, s, h = factors.T
    assert b.min() >= 0 and b.max() <= 2.5 and b.min() < 0.05 and b.max() > 2.45  # max(0, 1-1.5)
    for f in (c, s):
        assert f.min() >= 0.6 and f.max() <= 1.4 and f.min() < 0.61 and f.max() > 1.39
    assert h.min() >= -0.1 and h.max() <= 0.1 and h.min() < -0.099 and h.max() > 0.099


def test_jitter_in_every_order_matches_numpy(small):
    factors = np.array([1.3, 0.7, 1.6, 0.08])
    apply = jax.jit(A.apply_color_jitter)
    x = jnp.asarray(small, jnp.float32)
    for order in itertools.permutations(range(4)):
        ref = small
        for op in order:
            ref = NP_OPS[op](ref, factors[op])
        out = apply(x, jnp.asarray(order), jnp.asarray(factors, jnp.float32))
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, err_msg=str(order))


def test_color_jitter_uses_its_params_and_skips_zero_strength(small):
    x = jnp.asarray(small, jnp.float32)
    out = A.color_jitter(key(3), x, 0.4, 0.4, 0.4, 0.1)
    order, factors = A.jitter_params(key(3), 0.4, 0.4, 0.4, 0.1)
    ref = small
    for op in np.asarray(order):
        ref = NP_OPS[op](ref, float(factors[op]))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(A.color_jitter(key(3), x, 0, 0, 0, 0)), small
                                  .astype(np.float32))
    with pytest.raises(ValueError, match="hue"):
        A.color_jitter(key(0), x, hue=0.6)
    with pytest.raises(ValueError, match="brightness"):
        A.color_jitter(key(0), x, brightness=-0.1)
    with pytest.raises(ValueError, match="float"):
        A.color_jitter(key(0), jnp.zeros((4, 4, 3), jnp.uint8))


def test_random_grayscale_and_random_apply(small):
    x = jnp.asarray(small, jnp.float32)
    gray = np.repeat(np_gray(small)[..., None], 3, axis=-1)
    np.testing.assert_allclose(np.asarray(A.random_grayscale(key(0), x, 1.0)), gray, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(A.random_grayscale(key(0), x, 0.0)), np.asarray(x))
    out = np.asarray(jax.jit(A.random_grayscale_batch, static_argnums=2)(
        key(4), jnp.stack([x] * 40), 0.5))
    is_gray = np.array([np.allclose(o, gray, atol=1e-6) for o in out])
    is_same = np.array([np.array_equal(o, small.astype(np.float32)) for o in out])
    assert np.all(is_gray ^ is_same) and 8 <= is_gray.sum() <= 32
    double = lambda y: 2 * y
    np.testing.assert_array_equal(np.asarray(A.random_apply(key(0), double, x, 1.0)), 2 * x)
    np.testing.assert_array_equal(np.asarray(A.random_apply(key(0), double, x, 0.0)), x)
    with pytest.raises(ValueError, match="probability"):
        A.random_apply(key(0), double, x, 1.5)


# ---------------------------------------------------------------------------------------------
# Gaussian blur vs PIL


def pil_box_radius_np(sigma, passes=3):
    """Pillow's _gaussian_blur_radius (BoxBlur.c), in its float32 arithmetic."""
    var = np.float32(sigma) * np.float32(sigma) / np.float32(passes)
    box_len = np.float32(np.sqrt(12.0 * np.float64(var) + 1.0))
    l = np.float32(np.floor((np.float64(box_len) - 1.0) / 2.0))
    a = np.float32((2 * l + 1) * (l * (l + 1) - 3 * var))
    return np.float32(l + a / np.float32(6 * (var - (l + 1) * (l + 1))))


def box_pass_np(x, r, fixed_point):
    """One PIL box pass along the last axis, edges replicated; optionally in PIL's fixed point."""
    l = int(r)
    n = x.shape[-1]
    idx = np.arange(n)
    inner = sum(x[..., np.clip(idx + k, 0, n - 1)] for k in range(-l, l + 1))
    outer = x[..., np.clip(idx - l - 1, 0, n - 1)] + x[..., np.clip(idx + l + 1, 0, n - 1)]
    if not fixed_point:
        return (inner + (r - l) * outer) / (2 * r + 1)
    ww = int(np.float32(1 << 24) / np.float32(np.float32(r) * 2 + 1))
    fw = ((1 << 24) - (2 * l + 1) * ww) // 2
    return (inner * ww + outer * fw + (1 << 23)) >> 24


def pil_blur_np(img, sigma, fixed_point=True):
    """Pillow's GaussianBlur: 3 horizontal box passes, then 3 vertical ones."""
    r = float(pil_box_radius_np(sigma))
    x = img.transpose(2, 0, 1).astype(np.int64 if fixed_point else np.float64)
    for _ in range(3):
        x = box_pass_np(x, r, fixed_point)
    x = x.transpose(0, 2, 1)
    for _ in range(3):
        x = box_pass_np(x, r, fixed_point)
    return x.transpose(0, 2, 1).transpose(1, 2, 0)


def test_gaussian_blur_matches_pil(photo):
    x = jnp.asarray(photo, jnp.float32) / 255.0
    report = []
    for sigma in (0.1, 0.5, 1.0, 2.0):
        pil = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(radius=sigma)))
        # 1. Our reading of Pillow's C code is right: the fixed-point model is bit-exact.
        np.testing.assert_array_equal(pil_blur_np(photo, sigma), pil)
        out = np.asarray(BLUR(x, sigma)) * 255.0
        # 2. The JAX passes are the same filter in float (no per-pass rounding).
        np.testing.assert_allclose(out, pil_blur_np(photo, sigma, fixed_point=False), atol=1e-3)
        # 3. Residual vs PIL = PIL's uint8 rounding after each of its 6 passes (< 6 x 0.5 in
        #    theory; measured max 2.6, mean <= 0.56).
        diff = np.abs(out - pil)
        report.append((sigma, diff.max(), diff.mean()))
        assert diff.max() < 3.0 and diff.mean() < 0.8, report[-1]
    print("blur vs PIL (sigma, max, mean on 0..255):", report)


def test_gaussian_blur_edge_cases_and_random_blur(photo):
    x = jnp.asarray(photo, jnp.float32) / 255.0
    np.testing.assert_allclose(np.asarray(BLUR(x, 0.0)), np.asarray(x), atol=1e-7)
    # A constant image stays constant (replicated edges, weights sum to 1).
    flat = jnp.full(x.shape, 0.3)
    np.testing.assert_allclose(np.asarray(BLUR(flat, 1.7)), 0.3, atol=1e-6)
    with pytest.raises(ValueError, match="max_sigma"):
        jax.jit(A.gaussian_blur)(x, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        A.gaussian_blur(x, -1.0)
    # random_blur with sigma ~ U[0.8, 0.8] (a narrower kernel) is the blur with sigma 0.8;
    # with p = 0 it is the identity.
    random_blur = jax.jit(lambda k, y: (A.random_blur(k, y, 1.0, 0.8, 0.8),
                                        A.random_blur(k, y, 0.0)))
    blurred, kept = random_blur(key(5), x)
    np.testing.assert_allclose(np.asarray(blurred), np.asarray(BLUR(x, 0.8)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(x))


# ---------------------------------------------------------------------------------------------
# Geometric ops


def np_rrc_params(rng, height, width, scale, ratio):
    """torchvision RandomResizedCrop.get_params, line by line."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.9, 1.0)])
def test_random_resized_crop_box_statistics(scale):
    height, width, n = 48, 64, 3000
    ratio = (3 / 4, 4 / 3)
    sample = jax.jit(jax.vmap(lambda k: A.random_resized_crop_params(k, height, width, scale)))
    top, left, h, w = map(np.asarray, sample(jax.random.split(key(6), n)))
    assert np.all((h > 0) & (w > 0) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= height) & (left + w <= width))
    frac, log_aspect = h * w / (height * width), np.log(w / h)
    # Rounding w and h to integers moves area and aspect by a little.
    assert frac.min() >= scale[0] * 0.9 and frac.max() <= 1.0
    assert np.all(np.abs(log_aspect) <= math.log(4 / 3) + 0.1)
    rng = np.random.default_rng(0)
    ref = np.array([np_rrc_params(rng, height, width, scale, ratio) for _ in range(n)])
    ref_frac = ref[:, 2] * ref[:, 3] / (height * width)
    ref_log_aspect = np.log(ref[:, 3] / ref[:, 2])
    full = (h == height) & (w == width)
    ref_full = (ref[:, 2] == height) & (ref[:, 3] == width)
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(frac, q) - np.quantile(ref_frac, q)) < 0.03, q
        assert abs(np.quantile(log_aspect, q) - np.quantile(ref_log_aspect, q)) < 0.04, q
    assert abs(full.mean() - ref_full.mean()) < 0.03
    # Offsets uniform over the free range: mean relative offset ~ 1/2.
    free = (height - h) > 0
    assert abs(np.mean(top[free] / (height - h[free])) - 0.5) < 0.03


def test_random_resized_crop_fallback():
    # 16x64 is wider than 4/3 and no box of >= 90% area fits: centre crop of height 16,
    # width round(16 * 4/3) = 21, as torchvision.
    # 64x16 is taller than 3/4: width 16, height round(16 / (3/4)) = 21, centred.
    boxes = jax.jit(lambda k: (A.random_resized_crop_params(k, 16, 64, scale=(0.9, 1.0)),
                               A.random_resized_crop_params(k, 64, 16, scale=(0.9, 1.0))))
    wide, tall = boxes(key(7))
    assert tuple(map(int, wide)) == (0, 21, 16, 21)
    assert tuple(map(int, tall)) == (21, 0, 21, 16)


def test_resized_crop_matches_pil(photo):
    """PIL resizes in two uint8 passes; `resized_box` rounds both passes too and returns uint8:
    |diff| <= 1 grey level (float32 vs PIL's fixed-point coefficients, and this Pillow runs the
    vertical pass first on some shapes, e.g. 61x37 -> 28x28)."""
    crop = jax.jit(A.resized_box, static_argnums=2)
    pil = Image.fromarray(photo)
    # Shrinking, enlarging (20 -> 28), non-square, whole image; plus torchvision-sampled boxes.
    boxes = [(3, 5, 40, 50, 28), (10, 7, 20, 13, 28), (1, 2, 61, 37, 28), (0, 0, 64, 64, 28)]
    rng = np.random.default_rng(3)
    boxes += [tuple(map(int, np_rrc_params(rng, 64, 64, (0.08, 0.6), (3 / 4, 4 / 3)))) + (28,)
              for _ in range(3)]
    # The same image in the corner of a larger zero canvas: the box reads only the true image.
    canvas = jnp.asarray(np.pad(photo, ((0, 20), (0, 36), (0, 0))))
    for top, left, h, w, size in boxes:
        ref = np.asarray(pil.crop((left, top, left + w, top + h)).resize((size, size),
                                                                         Image.BILINEAR))
        out = np.asarray(crop(jnp.asarray(photo), (top, left, h, w), size))
        diff = np.abs(out.astype(int) - ref.astype(int))
        assert out.dtype == np.uint8 and out.shape == (size, size, 3)
        assert diff.max() <= 1 and diff.mean() < 0.35, (top, left, h, w, size, diff.max())
        np.testing.assert_array_equal(np.asarray(crop(canvas, (top, left, h, w), size)), out)
    # Identity when the box is the whole image and the size is unchanged.
    np.testing.assert_array_equal(np.asarray(crop(jnp.asarray(photo), (0, 0, 64, 64), 64)), photo)
    batch = jax.jit(A.random_resized_crop_batch, static_argnums=2)
    out = batch(key(8), jnp.asarray(np.stack([photo] * 2)), 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.uint8
    assert not np.array_equal(out[0], out[1])
    # On a canvas with its true size: the same box and pixels as on the bare image (both jitted:
    # eager and jitted float sums may round a pixel differently).
    rrc = jax.jit(lambda k, x, size: A.random_resized_crop(k, x, 16, size=size))
    np.testing.assert_array_equal(np.asarray(rrc(key(9), canvas, (64, 64))),
                                  np.asarray(rrc(key(9), jnp.asarray(photo), (64, 64))))


def test_resize_and_center_crop(photo):
    img = jnp.asarray(photo[:48])  # 48 x 64
    out = jax.jit(A.resize, static_argnums=1)(img, 24)  # shorter side -> 24
    assert out.shape == (24, 32, 3) and out.dtype == jnp.uint8
    ref = np.asarray(Image.fromarray(photo[:48]).resize((32, 24), Image.BILINEAR))
    assert np.abs(np.asarray(out).astype(int) - ref.astype(int)).max() <= 1
    assert jax.eval_shape(lambda x: A.resize(x, 20), photo[:, :40]).shape == (32, 20, 3)
    # torchvision: top = round((48 - 21) / 2) = round(13.5) = 14 (half to even), left = 21.
    np.testing.assert_array_equal(np.asarray(A.center_crop(img, (21, 22))), photo[14:35, 21:43])
    with pytest.raises(ValueError, match="larger"):
        A.center_crop(img, 50)


def test_random_crop_with_padding(photo):
    img = photo[:32, :32]

    @jax.jit
    def crops(k, images):
        params = jax.vmap(lambda kk: A.random_crop_params(kk, 32, 32, 32, 4))
        return A.random_crop_with_padding_batch(k, images, 32, 4), params(
            jax.random.split(k, images.shape[0]))

    out, (tops, lefts) = crops(key(20), jnp.asarray(np.stack([img] * 200)))
    out, tops, lefts = np.asarray(out), np.asarray(tops), np.asarray(lefts)
    assert out.dtype == np.uint8
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    for i in range(200):
        np.testing.assert_array_equal(out[i], padded[tops[i]:tops[i] + 32, lefts[i]:lefts[i] + 32])
    assert set(tops) == set(lefts) == set(range(9))  # U{0..2 * padding}
    # The same image in the corner of a canvas with its true size: the same crops (what lies
    # outside the true image reads as zero padding).
    canvas = np.zeros((40, 48, 3), np.uint8)
    canvas[:32, :32] = img
    canvas[32:], canvas[:, 32:] = 255, 255  # anything outside the true image must not show
    on_canvas = jax.jit(lambda k, x: A.random_crop_with_padding_batch(k, x, 32, 4,
                                                                      true_size=(32, 32)))
    np.testing.assert_array_equal(
        np.asarray(on_canvas(key(20), jnp.asarray(np.stack([canvas] * 200)))), out)


def test_jittered_patches(photo):
    size, patch, jitter, grid, keep, n = 40, 16, 6, 3, 5, 300
    step = (size - patch - jitter) // (grid - 1)  # 9 > jitter: each cell's range is disjoint
    img = photo[:size, :size]
    kwargs = dict(patch_size=patch, jitter=jitter, keep=keep, grid=grid)

    @jax.jit
    def patches(k, images):
        params = jax.vmap(lambda kk: A.jittered_patch_params(kk, size, size, **kwargs))
        return A.jittered_patches_batch(k, images, **kwargs), params(
            jax.random.split(k, images.shape[0]))

    out, (tops, lefts) = patches(key(30), jnp.asarray(np.stack([img] * n)))
    out, tops, lefts = np.asarray(out), np.asarray(tops), np.asarray(lefts)
    assert out.shape == (n, keep, patch, patch, 3)
    assert tops.max() + patch <= size and lefts.max() + patch <= size and tops.min() >= 0
    for b in range(n):
        cells = {(t // step, l // step) for t, l in zip(tops[b], lefts[b])}
        assert len(cells) == keep, cells  # `keep` distinct grid cells
        if b < 5:
            for p in range(keep):
                np.testing.assert_array_equal(
                    out[b, p], img[tops[b, p]:tops[b, p] + patch, lefts[b, p]:lefts[b, p] + patch])
    assert set((tops % step).ravel()) == set(range(jitter + 1))  # U{0..jitter}, inclusive
    assert set((lefts // step).ravel()) == set(range(grid))
    with pytest.raises(ValueError, match="fit"):
        A.jittered_patches(key(0), jnp.asarray(img), patch_size=36, jitter=6)


# ---------------------------------------------------------------------------------------------
# CutMix


def test_cutmix_mask_and_targets():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (6, 20, 24, 3), dtype=np.uint8)
    targets = rng.dirichlet(np.ones(7), size=6).astype(np.float32)  # e.g. BoW targets
    mix = jax.jit(lambda k: (A.cutmix(k, images, targets), A.cutmix_params(k, 6, 20, 24)))
    areas = []
    for i in range(30):
        (out_images, out_targets), (partner, box) = mix(key(40 + i))
        out_images, out_targets = np.asarray(out_images), np.asarray(out_targets)
        partner, (y1, y2, x1, x2) = np.asarray(partner), [int(v) for v in box]
        assert sorted(partner) == list(range(6))
        mask = np.zeros((20, 24), bool)
        mask[y1:y2, x1:x2] = True
        np.testing.assert_array_equal(out_images[:, mask], images[partner][:, mask])
        np.testing.assert_array_equal(out_images[:, ~mask], images[:, ~mask])
        lam = 1 - mask.mean()
        np.testing.assert_allclose(out_targets, lam * targets + (1 - lam) * targets[partner],
                                   atol=1e-6)
        areas.append(mask.mean())
    areas = np.array(areas)
    assert areas.min() < 0.2 and areas.max() > 0.3  # box sizes vary (lambda ~ Beta(1, 1))
    with pytest.raises(ValueError, match="beta"):
        A.cutmix(key(0), images, targets, beta=0.0)


# ---------------------------------------------------------------------------------------------
# Composite recipes, determinism, jit + vmap


def test_photometric_recipe(small):
    x = jnp.asarray(np.stack([small] * 8), jnp.float32)
    run = jax.jit(A.photometric)
    out = np.asarray(run(key(50), x))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.asarray(run(key(50), x)))  # same key, same output
    assert not np.array_equal(out, np.asarray(run(key(51), x)))
    assert len({o.tobytes() for o in out}) == 8  # independent draws per image
    assert out.min() >= 0 and out.max() <= 1
    # Only grayscale (p=1): exactly the numpy grey image. Everything off: identity.
    variants = jax.jit(lambda k, y: (
        A.photometric(k, y, jitter_p=0.0, gray_p=1.0, blur_p=0.0, flip=False),
        A.photometric(k, y, jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip=False)))
    gray, same = variants(key(0), x)
    np.testing.assert_allclose(np.asarray(gray[0]), np.repeat(np_gray(small)[..., None], 3, -1),
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
    with pytest.raises(ValueError, match="jitter"):
        A.photometric(key(0), x, jitter=(0.4, 0.4))


def test_photometric_shared_across_views(small):
    views = jnp.asarray(np.stack([small, small[::-1], small[:, ::-1]]), jnp.float32)
    groups = jnp.stack([views] * 16)  # [B=16, V=3, H, W, 3]
    out = np.asarray(jax.jit(lambda k, g: A.photometric(k, g, jitter_p=0.0, gray_p=0.5,
                                                        blur_p=0.0))(key(60), groups))
    views_np = np.asarray(views)
    gray = np.repeat(np_gray(views_np)[..., None], 3, -1)
    states = set()
    for b in range(16):
        for flipped in (False, True):
            for grey in (False, True):
                ref = gray if grey else views_np
                ref = ref[:, :, ::-1] if flipped else ref
                if np.allclose(out[b], ref, atol=1e-6):  # the whole group at once
                    states.add((flipped, grey))
                    break
            else:
                continue
            break
        else:
            pytest.fail(f"group {b}: views did not share one draw")
    assert len(states) >= 3
    assert jax.eval_shape(A.photometric_shared, key(61), views).shape == views.shape
