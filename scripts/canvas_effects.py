"""What the canvas bound changes: device views of host-shrunk images against torchvision's views
of the original images.

    python scripts/canvas_effects.py [--canvas=512] [--crops=24] [--sources=8] [--out=FILE.md]

Streamed images are padded into an S x S canvas (config.data.canvas_size, default 512); an image
whose longer side exceeds S is first shrunk on the host to fit (`pipeline.tf_encoded_canvas`: a
JPEG at least twice S decoded at 1/2, 1/4 or 1/8 scale by libjpeg, then area averaging to S,
aspect kept, sides rounded), and every view is cut on the device from the shrunk image
(`data/geometric.py`). Each test image is stored as a JPEG (quality 90), decoded by TensorFlow
on our side and by Pillow on torchvision's. torchvision, as the official code used it, cut the views
from the original image. For each original size this measures, per view type, the absolute
difference per pixel (0..255) between our view (tf_canvas + the device op) and torchvision's
view of the original (PIL path):

* teacher: Resize(256) + CenterCrop(224) (OBoW's teacher view, also the evaluation view);
  deterministic, so the same view on both sides.
* rrc160: RandomResizedCrop(160, scale (0.08, 0.6)) (OBoW's crops); rrc256: RandomResizedCrop(256,
  scale (0.6, 1)) (OBoW's patch source). Boxes (top, left, h, w) are drawn by torchvision's own
  get_params on the original (H, W); our code draws its boxes on the shrunk (h', w') image from
  the same distribution in relative coordinates (area fraction, log aspect and relative offsets
  do not depend on the pixel grid, up to rounding), so the box compared is the same *relative*
  box: its edges scaled by (h'/H, w'/W) and rounded to the shrunk grid (top' = round(top h'/H),
  bottom' = round((top + h) h'/H), likewise for left/right; at least 1 pixel). The difference
  therefore mixes the lost resolution with the edge rounding (up to half a shrunk pixel, i.e.
  H / (2 h') original pixels). Column "exact box" resamples the fractional box instead (the
  resampling taps of `geometric.axis_taps` at the exact scaled position), so it shows the lost
  resolution alone; "PIL shrunk" is torchvision's own view of the TF-shrunk image with the
  rounded box: the same bound, with no bow_jax op involved. For scale, "1-px shift" is
  torchvision's view of the original with the box (or the centre crop) moved by one original
  pixel down and right: what a one-pixel difference in the box alone does to these photographs.

Images: (1) "up": china.jpg (427x640, scikit-learn) enlarged to each size with PIL LANCZOS: smooth
content whose detail is that of a 640-pixel photo, so the bound costs little above 640; (2)
"mosaic": tiles of china.jpg and flower.jpg (and their mirror images) at native resolution,
cropped to the size: full-resolution detail everywhere, closer to a real large photograph (and
with hard seams). 500x375 fits the canvas: no shrink, the Task-1 figures (bow_jax against
torchvision, no bound). Sizes are W x H.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# torchvision before TensorFlow (importing it after TensorFlow can segfault).
import torch  # noqa: E402
from torchvision.transforms import (  # noqa: E402
    CenterCrop, InterpolationMode, RandomResizedCrop, Resize)
from torchvision.transforms import functional as TF  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from bow_jax.data import geometric as G  # noqa: E402
from bow_jax.data import pipeline  # noqa: E402

SIZES_WH = [(500, 375), (640, 480), (800, 600), (1024, 768), (1600, 1200), (2048, 1536)]
RATIO = (3.0 / 4.0, 4.0 / 3.0)
VIEWS = {"rrc160": (160, (0.08, 0.6)), "rrc256": (256, (0.6, 1.0))}


def upscaled(china, width, height):
    return np.asarray(Image.fromarray(china).resize((width, height), Image.LANCZOS))


def mosaic(photos, width, height):
    tiles = [photos[0], photos[1], photos[1][:, ::-1], photos[0][:, ::-1]]
    th, tw = photos[0].shape[:2]
    out = np.zeros((height, width, 3), np.uint8)
    for r in range(math.ceil(height / th)):
        for c in range(math.ceil(width / tw)):
            tile = tiles[(r * 3 + c) % len(tiles)]
            block = out[r * th:(r + 1) * th, c * tw:(c + 1) * tw]
            block[...] = tile[:block.shape[0], :block.shape[1]]
    return out


def as_jpeg(image, quality=90):
    """(JPEG bytes of `image`, the image Pillow decodes from them): what a dataset stores, and
    what torchvision's transforms see in the official code."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def to_canvas(jpeg, canvas_size):
    """What the host does per image (`pipeline.tf_encoded_canvas`: libjpeg's reduced-size
    decoding of a JPEG at least twice the canvas, then `tf_canvas`): the canvas and the true
    (h', w') on it."""
    tf = pipeline.import_tensorflow()
    decode = lambda e: tf.io.decode_image(e, channels=3, expand_animations=False)
    out = pipeline.tf_encoded_canvas(tf.constant(jpeg), canvas_size, decode)
    return out["image"].numpy(), tuple(int(v) for v in out["size"].numpy())


def mapped_box(box, full, shrunk):
    """The same relative box on the shrunk grid: edges scaled and rounded (at least 1 pixel)."""
    (top, left, h, w), (H, W), (h2, w2) = box, full, shrunk
    t, b = round(top * h2 / H), round((top + h) * h2 / H)
    l, r = round(left * w2 / W), round((left + w) * w2 / W)
    t, l = min(t, h2 - 1), min(l, w2 - 1)
    return t, l, max(b - t, 1), max(r - l, 1)


def make_ops(canvas_size):
    def exact_box(canvas, box, out):
        # The fractional box (top, left, h, w) in shrunk pixels, resampled as PIL would resample
        # that box of the shrunk image (only pixels it overlaps count).
        top, left, h, w = box
        rows = G.axis_taps(out, top, h / out, jnp.floor(top), jnp.ceil(top + h),
                           G.num_taps(canvas.shape[0] / out))
        cols = G.axis_taps(out, left, w / out, jnp.floor(left), jnp.ceil(left + w),
                           G.num_taps(canvas.shape[1] / out))
        return G.resample(canvas, rows, cols)

    ops = {"teacher": jax.jit(lambda c, s: G.resize_center_crop(c, s, 256, 224))}
    for name, (out, _) in VIEWS.items():
        ops[name] = jax.jit(jax.vmap(
            lambda c, b, out=out: G.resized_box(c, (b[0], b[1], b[2], b[3]), out),
            in_axes=(None, 0)))
        ops[name + "_exact"] = jax.jit(jax.vmap(
            lambda c, b, out=out: exact_box(c, (b[0], b[1], b[2], b[3]), out),
            in_axes=(None, 0)))
    return ops


def diff(a, b):
    return np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).ravel()


def measure(image, canvas_size, ops, counts, seed):
    """{view: {'ours': diffs, 'exact': diffs, 'pil_shrunk': diffs}} and the shrunk size, for
    `image` stored as a JPEG (quality 90) and decoded by each side."""
    jpeg, image = as_jpeg(image)
    H, W = image.shape[:2]
    canvas, (h2, w2) = to_canvas(jpeg, canvas_size)
    pil = Image.fromarray(image)
    pil_shrunk = Image.fromarray(np.ascontiguousarray(canvas[:h2, :w2]))
    jcanvas, jsize = jnp.asarray(canvas), jnp.array([h2, w2], jnp.int32)
    res = {}
    resized = np.asarray(Resize(256)(pil))
    t, l = (round((n - 224) / 2.0) for n in resized.shape[:2])
    ref = resized[t:t + 224, l:l + 224]
    res["teacher"] = {"ours": diff(ops["teacher"](jcanvas, jsize), ref),
                      "pil_shrunk": diff(CenterCrop(224)(Resize(256)(pil_shrunk)), ref),
                      "shift": diff(resized[t + 1:t + 225, l + 1:l + 225], ref)}
    torch.manual_seed(seed)
    img_stub = torch.empty((1, H, W), dtype=torch.uint8)
    for name, (out, scale) in VIEWS.items():
        boxes = [RandomResizedCrop.get_params(img_stub, list(scale), list(RATIO))
                 for _ in range(counts[name])]
        small = [mapped_box(b, (H, W), (h2, w2)) for b in boxes]
        exact = [(t * h2 / H, l * w2 / W, h * h2 / H, w * w2 / W) for t, l, h, w in boxes]
        ours = np.asarray(ops[name](jcanvas, jnp.asarray(small, jnp.int32)))
        ours_exact = np.asarray(ops[name + "_exact"](jcanvas, jnp.asarray(exact, jnp.float32)))
        d_ours, d_exact, d_pil, d_shift = [], [], [], []
        for box, sbox, view, view_exact in zip(boxes, small, ours, ours_exact):
            ref = np.asarray(TF.resized_crop(pil, *box, [out, out], InterpolationMode.BILINEAR))
            d_ours.append(diff(view, ref))
            d_exact.append(diff(view_exact, ref))
            d_pil.append(diff(TF.resized_crop(pil_shrunk, *sbox, [out, out],
                                              InterpolationMode.BILINEAR), ref))
            top, left, h, w = box
            shifted = (top + 1 if top + h < H else top - 1, left + 1 if left + w < W else left - 1)
            d_shift.append(diff(TF.resized_crop(pil, *shifted, h, w, [out, out],
                                                InterpolationMode.BILINEAR), ref))
        res[name] = {"ours": np.concatenate(d_ours), "exact": np.concatenate(d_exact),
                     "pil_shrunk": np.concatenate(d_pil), "shift": np.concatenate(d_shift)}
    return res, (w2, h2)


def fmt(d):
    return f"{d.mean():.2f} / {np.percentile(d, 99):.0f} / {d.max()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--crops", type=int, default=24, help="rrc160 boxes per image")
    parser.add_argument("--sources", type=int, default=8, help="rrc256 boxes per image")
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args(argv)
    start = time.time()
    photos = load_sample_images().images
    ops = make_ops(args.canvas)
    counts = {"rrc160": args.crops, "rrc256": args.sources}
    lines = [f"Canvas S = {args.canvas}; per cell: mean / 99th percentile / max absolute "
             "difference per pixel (0..255) against torchvision on the original image; "
             f"{args.crops} rrc160 and {args.sources} rrc256 boxes per image (torchvision "
             "get_params, seeded), teacher = Resize(256) + CenterCrop(224).", "",
             "| image | W x H | on canvas | view | ours (tf_canvas + device op) | exact box | "
             "PIL on shrunk | scale: 1-px shift |", "|---|---|---|---|---|---|---|---|"]
    for kind in ("up", "mosaic"):
        for i, (width, height) in enumerate(SIZES_WH):
            if kind == "up":
                image = upscaled(photos[0], width, height)
            else:
                image = mosaic(photos, width, height)
            res, (w2, h2) = measure(image, args.canvas, ops, counts, seed=i)
            for view, d in res.items():
                exact = fmt(d["exact"]) if "exact" in d else "-"
                lines.append(f"| {kind} | {width} x {height} | {w2} x {h2} | {view} | "
                             f"{fmt(d['ours'])} | {exact} | {fmt(d['pil_shrunk'])} | "
                             f"{fmt(d['shift'])} |")
    lines += ["", f"({time.time() - start:.0f} s; JAX {jax.__version__}, "
              f"torch {torch.__version__}, Pillow {Image.__version__})"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
