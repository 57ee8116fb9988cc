"""Throughput, memory and FLOPs of bow_jax training steps, and of the input pipelines, apart.

Train step: the method's jitted, donated `train_step` on synthetic data that already lives on the
device (random uint8 images turned into the method's views once, outside the timing), so neither
the input pipeline nor TensorFlow is involved. Reported per (config, variant): images/s (source
images per second, e.g. one OBoW image = teacher view + its crops + its patches), seconds per
step, compile time, peak device memory, XLA's compiled-program footprint (arguments + outputs +
temporaries - aliasing, per device) and that footprint per image of the per-device batch, FLOPs
per image counted by XLA (`compiled.cost_analysis()` of the step) beside an analytic count (OBoW:
`obow_analytic_flops`), and what one epoch of ImageNet (1,281,167 images) would take at that speed.

Peak memory: JAX has no public way to reset the allocator's `peak_bytes_in_use`
(github.com/jax-ml/jax/issues/8096), so a second variant in the same process would report the
process peak. By default (`--isolate auto`, when more than one variant runs) every variant runs in
its own Python process: its peak is its own (`peak_scope: "process"`), and a crash or an
out-of-memory of one variant leaves the others measured. In one process (`--isolate never`) a
variant's peak is reported only when the process peak rose during it (`peak_scope: "variant"`);
otherwise it is `None` with `peak_bytes_bound` (the earlier peak, an upper bound), never a stale
number. Backends without `memory_stats` (CPU) report n/a; the compiled footprint is there always.

Variants: fp32 (the reference), bf16 (`config.model.kwargs.dtype='bfloat16'`: backbone convolutions
and BatchNorm in bfloat16, parameters / BN statistics / BoW maths / losses in float32) and remat
(`flax.linen.remat` around every residual block of a ResNet backbone: activations inside a block
are recomputed in the backward pass instead of being stored). Each variant's first losses (same
initial state, same batch; the --warmup steps', or the first timed step's with --warmup 0) are
compared with fp32's: remat must agree to --remat_rtol (default 1e-5, relative), bf16 to
--bf16_rtol (default 2e-2). The result is in the row (`loss_check.result`, e.g. "fail: rel err
3.0e-02 > 2e-02") and printed; it does not change the exit status, which is 0 when every row was
measured and 1 when a variant failed (listed under "failed"). The JSON is rewritten atomically
after every row, so a run killed by a timeout keeps the rows measured so far ("complete": false).

Input pipeline (--pipeline; alone, without --variants, it runs no train step). In-memory configs
(CIFAR, digits): the device-side gather + `make_views` that every training loop runs per step
(their images never pass through a host pipeline). Streamed TFDS configs (default with --pipeline
alone: configs/obow_resnet50.py, teacher 224, 2 crops of 160, 5 patches of 96), all on the same
JPEG files in one run, host cost in CPU-seconds per image (getrusage of this process, all its
threads: steady when other jobs share the cores, unlike wall time), medians:
- ours: the training input itself, `pipeline.tfds_canvases` (read, decode, pad into the
  config.data.canvas_size canvas; a longer side above it is first shrunk), for each
  --pipeline_cores value with tf.data on a private threadpool of that many threads and no
  intra-op parallelism (`threading_options`); --pipeline_batches batches of --pipeline_batch after
  --pipeline_warmup, the median over batches. Also images per CPU-second (= images/s per core),
  the cores 2,000 images/s would need at that rate (ceil(2000 x CPU s per image)), wall images/s
  and CPU seconds per wall second (a check that the limit held). The batches are not copied to a
  device.
- the decode floor: tf.io.decode_jpeg of the same files (tf.data, 1 thread) and Pillow's decode.
- the official OBoW ImageNet training transform (github.com/valeoai/obow), for timing only:
  imported, never copied, from --official_src (a source tree or its .tar.gz; default
  ../shared/peer/obow_official-*.tar.gz when present, unpacked into a temp dir; else the row is
  skipped with a note), in its own process (`official_transform` subcommand): its
  `get_ImageNet_data_for_obow` with the data section of its ResNet-50 config over an ImageFolder
  of the same files, and its dataset's per-image __getitem__ (Pillow decode, teacher view, 2
  crops of 160, 5 patches of 96, colour jitter / grayscale / blur, float tensors) on one torch
  thread, as in one DataLoader worker; --pipeline_passes passes, the median. official / ours is
  its CPU per image over ours at the first core count.
The files (--pipeline_files, built once as a TFDS dataset in --pipeline_data DIR and described in
the JSON): 'photos' (default), --pipeline_images crops of scikit-learn's two sample photographs
at --pipeline_image_size (ImageNet's typical 500x375; 1 in 4 portrait) at random offsets and
flips, JPEG quality 90; 'photos_mixed', half of them upscaled to 1.6x and 3.2x (800x600,
1600x1200: above a 512 canvas, so the host shrinks them); 'cifar_upsampled', CIFAR-10 (or
digits) upsampled bicubic (smoother than photographs). Then the device cost of the views
(`views_cost`, unless --skip_views_cost): XLA's FLOPs per image of the compiled `make_views` on
--views_batch canvases holding --views_image_size images (every other one portrait), of OBoW's
photometric part alone (`obow.augment_views`, inside the train step), and of the lowered train
step at each --views_step_batches global batch, as fractions; and the bytes per image copied to
the device (canvas + size + label) beside those of the views themselves.

Examples:
  python scripts/benchmark.py --config configs/obow_resnet50.py --per_device_batch 64 \
      --variants fp32,bf16,remat --steps 20 --json obow_r50.json
  python scripts/benchmark.py --config configs/obow_cifar10_cpu.py \
      --config configs/rotnet_cifar10_cpu.py --batch_size 32 --steps 3 --variants fp32 --pipeline
  python scripts/benchmark.py --pipeline --pipeline_cores 1,2 --pipeline_files photos,photos_mixed \
      --pipeline_data /tmp/bench_jpegs --json pipeline_r50.json   (OBoW ResNet-50: host CPU per
      image, ours vs the decode floor vs the official transform, and the views' device FLOPs)
  python scripts/benchmark.py --config configs/obow_resnet50.py --batch_size 64 --cost_only
      (FLOPs of the lowered step and the analytic count only: nothing compiled or run)
  (--set key=value overrides a config field in every config, e.g. --set model.kwargs.width=8)
  python scripts/benchmark.py kmeans --n 200000 --d 256 --k 2048   (our k-means vs scikit-learn;
      the options are those of scripts/benchmark_kmeans.py)
"""
import argparse
import ast
import contextlib
import glob
import importlib.util
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bow_jax.data import batches, datasets, pipeline  # noqa: E402
from bow_jax.lib import files, sharding  # noqa: E402
from bow_jax.methods import DataInfo, create_method  # noqa: E402
from bow_jax.methods import interface  # noqa: E402
from bow_jax.models import feature_dims  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
VARIANTS = ("fp32", "bf16", "remat", "bf16+remat")
DEFAULT_PIPELINE_CONFIG = "configs/obow_resnet50.py"


def load_config(path: str, overrides):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()  # as main.py: an unknown --set key fails here, naming it
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError, TypeError) as e:
            raise SystemExit(f"--set {item}: {path} has no field config.{key} ({e}).") from e
    config.unlock()  # variants add model fields (dtype, remat) below
    return config


def stored_image_size(config, override: int) -> int:
    """Side of the synthetic stored images: what make_views would see for this config."""
    if override:
        return override
    data = config.data
    if data.source in ("digits", "image_folder") and data.image_size:
        return int(data.image_size)
    if data.source == "tfds" and not data.in_memory:
        return 256  # ImageNet views are cut from images of about this size
    return 32  # CIFAR npz / jpeg_npz


def _mib(n):
    return None if n is None else n / 2**20


# ------------------------------------------------------------------------------------------------
# What XLA says about a compiled (or lowered) program.


def compiled_footprint(compiled):
    """Bytes of one device's program: arguments + outputs + temporaries - aliased (donated)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def cost_flops(cost):
    """The 'flops' of a `cost_analysis()` result, or None where XLA gave none.

    JAX returns one dict (jax >= 0.4.3x) or, in older versions, a list of dicts (one per HLO
    module); both are accepted, the list summed. XLA counts a multiply-add as 2 FLOPs.
    """
    if cost is None:
        return None
    parts = [cost] if isinstance(cost, dict) else list(cost)
    flops = [p.get("flops") for p in parts if p]
    flops = [float(f) for f in flops if f is not None and f >= 0]
    return sum(flops) if flops else None


def backbone_forward_flops(backbone, size: int) -> float:
    """FLOPs of one eval-mode backbone forward on one size x size x 3 image, as XLA counts the
    lowered (not compiled: no compile cost) program: convolutions (2 per multiply-add) plus the
    elementwise BatchNorm / ReLU / pooling work."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda k, x: backbone.init(k, x, train=False),
                               jax.random.key(0), x)
    lowered = jax.jit(lambda v, x: backbone.apply(v, x, train=False)).lower(variables, x)
    return cost_flops(lowered.cost_analysis())


# ------------------------------------------------------------------------------------------------
# The analytic count.


def obow_analytic_flops(*, forward_flops_ref: float, ref_size: int, teacher_size: int,
                        crop_groups, levels, border: int, num_words: int, pooled_dim: int,
                        hidden_dim: int, global_batch: int, monitor_dim: int = 0,
                        num_classes: int = 0) -> dict:
    """FLOPs per source image of one OBoW training step (Gidaris et al., CVPR 2021;
    github.com/valeoai/obow), by component; a multiply-add counts 2.

    Args: forward_flops_ref: FLOPs of one backbone forward at ref_size x ref_size (e.g. XLA's
      count of the forward alone, or the documented ResNet-50 figure: 4.1 GMAC = 8.2 GFLOP at
      224); crop_groups: [(crops per image, side)], e.g. [(2, 160), (5, 96)]; levels: the teacher's
      BoW maps [(h, w, C)], e.g. [(14, 14, 1024), (7, 7, 2048)]; pooled_dim: the student's pooled
      width D; hidden_dim: the weight generators' hidden width H; global_batch: images per step.
    Returns {component: FLOPs per image, ..., 'total': sum} (floats).

    Assumptions: a backbone forward costs forward_flops_ref x (side / ref_size)^2 (every
    convolution's output has side / stride^2 pixels: exact for sides divisible by the total
    stride); backward = 2 x forward (input and weight gradients), so a student crop costs 3 x its
    forward and the teacher (no gradient) 1 x. Word distances: the teacher's squared-L2 distances
    of its (h - 2 border)(w - 2 border) locations to K words of width C (the matmul; the norms are
    O(K C)). BoW logits: each crop's D-vector against K generated weights per level, x 3. Weight
    generators (Linear C->H, BN, ReLU, Linear H->D per level) run once per step on the K words
    and are shared by the batch: forward 2K(CH + HD), backward 2 x for the second layer and 1 x
    (weight gradient only: the words get none) for the first, then divided by global_batch, so
    per image they shrink as the batch grows. Monitor: a linear classifier on the detached teacher
    features, forward + weight gradient. Not counted: BatchNorm/ReLU of the student passes and
    of the generators, softmax, augmentation, the EMA and SGD updates (elementwise, small).
    """
    def forward(side):
        return forward_flops_ref * (side / ref_size) ** 2

    k, h, d = num_words, hidden_dim, pooled_dim
    crops = sum(n for n, _ in crop_groups)
    parts = {
        "student_backbone": sum(n * 3 * forward(side) for n, side in crop_groups),
        "teacher_backbone": forward(teacher_size),
        "word_distances": sum(2.0 * (lh - 2 * border) * (lw - 2 * border) * k * c
                              for lh, lw, c in levels),
        "bow_logits": crops * len(levels) * 3 * 2.0 * d * k,
        "weight_generators": sum(2.0 * k * c * h * 2 + 2.0 * k * h * d * 3
                                 for _, _, c in levels) / global_batch,
        "monitor": 2.0 * monitor_dim * num_classes * 2,
    }
    parts["total"] = sum(parts.values())
    return parts


def analytic_flops(config, global_batch: int):
    """`obow_analytic_flops` for an OBoW config (the backbone forward counted by XLA at the
    teacher's side), else None (no analytic count for the other methods yet)."""
    if config.method != "obow":
        return None
    cfg = config.obow
    backbone = interface.backbone_from_config(config)
    dims = feature_dims(backbone, (1, cfg.teacher_size, cfg.teacher_size, 3))
    groups = [(cfg.num_crops, cfg.crop_size)]
    if cfg.num_patches > 0:
        groups.append((cfg.num_patches, cfg.patch_size))
    pooled_dim = dims["pooled"][-1]
    forward_ref = backbone_forward_flops(backbone, cfg.teacher_size)
    parts = obow_analytic_flops(
        forward_flops_ref=forward_ref, ref_size=cfg.teacher_size,
        teacher_size=cfg.teacher_size, crop_groups=groups,
        levels=[dims[level][1:] for level in cfg.bow_levels], border=cfg.border,
        num_words=cfg.num_words, pooled_dim=pooled_dim,
        hidden_dim=cfg.hidden_dim or 2 * pooled_dim, global_batch=global_batch,
        monitor_dim=dims[cfg.monitor_feature][-1] if cfg.monitor else 0,
        num_classes=cfg.num_classes if cfg.monitor else 0)
    return {"backbone_forward_flops": forward_ref, "at_side": cfg.teacher_size, **parts}


def flops_fields(config, compiled, global_batch: int) -> dict:
    """Row fields: XLA's FLOPs per image of the compiled step (one device's program x devices /
    global batch), the analytic count, and the compiled footprint per image of a device's batch."""
    devices = jax.device_count()
    xla = cost_flops(compiled.cost_analysis())
    analytic = analytic_flops(config, global_batch)
    footprint = compiled_footprint(compiled)
    return {
        "xla_flops_per_image": None if xla is None else xla * devices / global_batch,
        "analytic_flops_per_image": None if analytic is None else analytic["total"],
        "analytic_flops": analytic,
        "compiled_bytes_per_image": (None if footprint is None
                                     else footprint / (global_batch / devices)),
    }


# ------------------------------------------------------------------------------------------------
# Peak memory.


def read_memory_stats(device):
    """The runtime allocator's statistics (GPU/TPU), or None (CPU). Tests replace this."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats or None


def peak_fields(before, after, isolated: bool) -> dict:
    """A variant's peak from the allocator statistics at its start and end.

    The process peak (`peak_bytes_in_use`) cannot be reset, so: alone in its process, the peak is
    the variant's; in a shared process it is the variant's only if it rose during the variant,
    else unknown (None, with the earlier peak as an upper bound).
    """
    if not after or "peak_bytes_in_use" not in after:
        return {"peak_bytes": None, "peak_scope": "n/a (no memory_stats on this backend)"}
    start = (before or {}).get("peak_bytes_in_use", 0)
    fields = {"bytes_in_use_at_start": (before or {}).get("bytes_in_use")}
    if isolated:
        return {**fields, "peak_bytes": after["peak_bytes_in_use"], "peak_scope": "process"}
    if after["peak_bytes_in_use"] > start:
        return {**fields, "peak_bytes": after["peak_bytes_in_use"], "peak_scope": "variant"}
    return {**fields, "peak_bytes": None, "peak_bytes_bound": start,
            "peak_scope": "not measured: an earlier variant's peak was not exceeded "
                          "(use --isolate always)"}


# ------------------------------------------------------------------------------------------------
# One variant's train step.


def variant_config(config, variant: str, batch_size: int):
    config = config.copy_and_resolve_references()
    if "bf16" in variant:
        config.model.kwargs.dtype = "bfloat16"
    if "remat" in variant:
        config.model.kwargs.remat = True  # ResNet's remat field: same parameter tree
    config.batch_size = batch_size
    return config


def data_info(config, image_size: int) -> DataInfo:
    """An ImageNet-sized DataInfo (the schedules' lengths) for stored images of image_size."""
    steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // config.batch_size)
    return DataInfo(image_shape=(image_size, image_size, 3),
                    num_examples=steps_per_epoch * config.batch_size,
                    steps_per_epoch=steps_per_epoch,
                    total_steps=steps_per_epoch * max(int(config.num_epochs), 1))


def make_method(config, image_size: int):
    return create_method(config, data_info(config, image_size))


def synthetic_inputs(method, mesh, batch_size: int, image_size: int, seed: int):
    """(state, batch) on the device: the initial state and one batch of views of random images,
    with labels as the training loop delivers them (read only by OBoW's monitor head)."""
    state = jax.jit(method.init_state, out_shardings=sharding.replicated(mesh))(
        jax.random.key(seed))
    images = jax.random.randint(jax.random.key(seed + 1),
                                (batch_size, image_size, image_size, 3), 0, 256,
                                jnp.int32).astype(jnp.uint8)
    sizes = np.full((batch_size, 2), image_size, np.int32)  # each image fills its canvas
    batch = jax.jit(method.make_views, out_shardings=sharding.batch_sharded(mesh))(
        jax.device_put(images, sharding.batch_sharded(mesh)),
        jax.device_put(sizes, sharding.batch_sharded(mesh)), jax.random.key(seed + 2))
    batch["label"] = jax.device_put(jnp.zeros(batch_size, jnp.int32), sharding.batch_sharded(mesh))
    return state, jax.block_until_ready(batch)


def jit_step(method, mesh):
    return jax.jit(method.train_step, donate_argnums=0,
                   out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))


def time_steps(compiled, state, batch, *, steps: int, warmup: int):
    """Runs `warmup` untimed then `steps` timed steps; returns (first losses, seconds per step).

    First losses: the warm-up steps'; with no warm-up, the first timed step's (read after the
    timing, so nothing syncs inside it)."""
    losses = []
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    jax.block_until_ready(state)
    timed = []
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
        timed.append(metrics["loss"])
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    return losses or [float(timed[0])], seconds


def bench_step(config, variant: str, *, batch_size: int, image_size: int, steps: int,
               warmup: int, seed: int = 0, isolated: bool = False) -> dict:
    """Times `steps` train steps after `warmup` untimed ones; returns a result row."""
    reference = variant_config(config, "fp32", batch_size)  # the analytic count's config
    config = variant_config(config, variant, batch_size)
    device = jax.devices()[0]
    before = read_memory_stats(device)
    mesh = sharding.make_mesh()
    method = make_method(config, image_size)
    state, batch = synthetic_inputs(method, mesh, batch_size, image_size, seed)
    start = time.perf_counter()
    compiled = jit_step(method, mesh).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    losses, seconds = time_steps(compiled, state, batch, steps=steps, warmup=warmup)
    row = {
        "method": config.method, "model": config.model.name,
        "model_kwargs": {k: str(v) for k, v in config.model.kwargs.items()},
        "variant": variant, "global_batch": batch_size, "devices": jax.device_count(),
        "device_kind": device.device_kind, "platform": device.platform,
        "image_size": image_size, "step_s": seconds, "images_per_s": batch_size / seconds,
        "compile_s": compile_s, "compiled_bytes": compiled_footprint(compiled),
        "first_losses": losses,
        "imagenet_epoch_h": IMAGENET_TRAIN_IMAGES / (batch_size / seconds) / 3600,
    }
    row.update(peak_fields(before, read_memory_stats(device), isolated))
    row.update(flops_fields(reference, compiled, batch_size))
    return row


def cost_only_row(config, variant: str, *, batch_size: int, image_size: int) -> dict:
    """FLOPs per image of the lowered (not compiled) step of abstract inputs, beside the analytic
    count: no device memory, no compile, so it works for batches that would not fit here. The
    lowered program is the whole global step (before partitioning and XLA's optimisations)."""
    analytic = analytic_flops(variant_config(config, "fp32", batch_size), batch_size)
    config = variant_config(config, variant, batch_size)
    method = make_method(config, image_size)
    key = jax.random.key(0)
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
    sizes = jax.ShapeDtypeStruct((batch_size, 2), jnp.int32)
    state = jax.eval_shape(method.init_state, key)
    batch = dict(jax.eval_shape(method.make_views, images, sizes, key),
                 label=jax.ShapeDtypeStruct((batch_size,), jnp.int32))
    lowered = jax.jit(method.train_step, donate_argnums=0).lower(state, batch)
    xla = cost_flops(lowered.cost_analysis())
    return {"method": config.method, "model": config.model.name, "variant": variant,
            "global_batch": batch_size, "image_size": image_size,
            "xla_lowered_flops_per_image": None if xla is None else xla / batch_size,
            "analytic_flops_per_image": None if analytic is None else analytic["total"],
            "analytic_flops": analytic}


# ------------------------------------------------------------------------------------------------
# Loss check, one process per variant, results.


def loss_check(row, reference, remat_rtol: float, bf16_rtol: float):
    """How far `row`'s first losses are from the fp32 reference's: a dict with the largest
    relative difference, the variant's tolerance, ok, and a printable result; None when there is
    no loss to compare."""
    n = min(len(row["first_losses"]), len(reference["first_losses"]))
    if n == 0:
        return None
    a = np.asarray(row["first_losses"][:n])
    b = np.asarray(reference["first_losses"][:n])
    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
    tol = bf16_rtol if "bf16" in row["variant"] else remat_rtol
    ok = bool(rel <= tol)  # False for NaN
    result = f"{'ok' if ok else 'fail'}: rel err {rel:.1e} {'<=' if ok else '>'} {tol:.0e}"
    return {"max_rel_diff_vs_fp32": rel, "rtol": tol, "ok": ok, "steps_compared": n,
            "result": result}


def check_losses(rows, remat_rtol: float, bf16_rtol: float):
    """Adds `loss_check` to each non-fp32 row that has an fp32 row of the same config."""
    reference = {r["config"]: r for r in rows if r["variant"] == "fp32"}
    for row in rows:
        ref = reference.get(row["config"])
        if row["variant"] != "fp32" and ref is not None:
            check = loss_check(row, ref, remat_rtol, bf16_rtol)
            if check is not None:
                row["loss_check"] = check


def run_isolated(path: str, variant: str, args) -> dict:
    """Runs one variant in a fresh Python process (this script with --child); returns its row.
    Raises RuntimeError naming the exit status when the child wrote no row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        command = [sys.executable, os.path.abspath(__file__), "--child", "--config", path,
                   "--variants", variant, "--json", out, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch_size", str(args.batch_size),
                   "--per_device_batch", str(args.per_device_batch),
                   "--image_size", str(args.image_size)]
        for item in args.set:
            command += ["--set", item]
        status = subprocess.run(command, check=False).returncode
        rows = []
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                rows = json.load(f)["train_step"]
    if status != 0 or not rows:
        raise RuntimeError(f"variant {variant} in its own process: exit status {status}")
    return rows[0]


def write_result(path: str, rows, pipeline_rows, failed, cost_rows, complete: bool):
    """The whole result as JSON, atomically (a reader sees the previous version or this one)."""
    result = {"train_step": rows, "pipeline": pipeline_rows, "failed": failed,
              "cost_only": cost_rows, "complete": complete, "jax": jax.__version__,
              # jax.default_backend() would start the backend in this process (and take GPU
              # memory from the variants' processes): the rows say where they ran.
              "backend": rows[0].get("platform") if rows else None}
    if path:
        files.atomic_write_text(path, json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------------
# Input pipelines.


def bench_device_views(config, *, batch_size: int, image_size: int, steps: int, n: int = 2048):
    """Images/s of the in-memory path: gather a batch from the on-device dataset + make_views
    (the batches of `data.batches.training_batches`, as every training loop gets them)."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    mesh = sharding.make_mesh()
    method = create_method(config, DataInfo((image_size, image_size, 3), n, n // batch_size,
                                            n // batch_size))
    data = datasets.ArrayDataset(np.random.default_rng(0).integers(
        0, 256, (n, image_size, image_size, 3), dtype=np.uint8), np.zeros(n, np.int32), 1,
        "random")
    source = batches.training_batches(data, batch_size=batch_size, seed=0, mesh=mesh,
                                      start_step=0, device_views=method.make_views)
    jax.block_until_ready(next(source))
    start = time.perf_counter()
    for _ in range(steps):
        out = next(source)
    jax.block_until_ready(out)
    return batch_size * steps / (time.perf_counter() - start)


# Streamed TFDS input (the ImageNet path of configs/obow_resnet50.py): host CPU per image of
# ours, of a decode alone and of the official OBoW transform on the same JPEG files; the device
# cost of the views.

STREAM_TARGET_IMAGES_PER_S = 2000
TARGET_HOST_MS_PER_IMAGE = 2.0  # host CPU per OBoW ResNet-50 image, real photographs
TARGET_OFFICIAL_RATIO = 5.0  # the official transform's CPU per image / ours, same files
TARGET_VIEWS_FLOPS_FRACTION = 0.03  # the views' device FLOPs / the train step's
FILE_SETS = ("photos", "photos_mixed", "cifar_upsampled")
JPEG_QUALITY = 90
OFFICIAL_TARBALLS = os.path.join(os.path.dirname(REPO), "shared", "peer",
                                 "obow_official-*.tar.gz")
OFFICIAL_CONFIG = os.path.join("config", "ImageNetFull", "ResNet50_OBoW_full.yaml")
# Keys of the official config's `data` section that are not arguments of its transform.
OFFICIAL_LOADER_KEYS = ("dataset_name", "batch_size", "epoch_size")
FILE_SET_NOTES = {
    "photos": "crops of scikit-learn's two sample photographs (china.jpg, flower.jpg, 427x640) "
              "at ImageNet's typical size, 3 in 4 landscape and 1 in 4 portrait (cut from the "
              "photograph turned by 90 degrees), at random offsets, half of them flipped "
              "left-right, stored as JPEG quality 90",
    "photos_mixed": "crops of scikit-learn's two sample photographs as 'photos', cycling through "
                    "the typical size, its portrait, 1.6x and 3.2x of it (the largest crop of "
                    "that shape, x U(0.8, 1), upscaled bicubic; from 500x375: 800x600 and "
                    "1600x1200, so half the files exceed a 512 canvas and are shrunk on the "
                    "host)",
    "cifar_upsampled": "real small images (CIFAR-10, or scikit-learn's digits) upsampled bicubic "
                       "to ImageNet's typical size and stored as JPEG quality 90: smoother than "
                       "photographs, so they compress smaller and decode a little faster",
}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all its threads (getrusage): the
    measure that stays steady when other jobs share the cores, unlike wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def file_set_sizes(file_set: str, count: int, width: int, height: int):
    """[(w, h)] of each file of `file_set` (see FILE_SET_NOTES)."""
    if file_set == "photos":
        cycle = [(width, height)] * 3 + [(height, width)]
    elif file_set == "photos_mixed":
        cycle = [(width, height), (height, width), (round(1.6 * width), round(1.6 * height)),
                 (round(3.2 * width), round(3.2 * height))]
    elif file_set == "cifar_upsampled":
        cycle = [(width, height)]
    else:
        raise ValueError(f"file set {file_set!r}: expected one of {FILE_SETS}")
    return [cycle[i % len(cycle)] for i in range(count)]


def sample_photographs():
    """scikit-learn's two sample photographs (china.jpg, flower.jpg), uint8 [427, 640, 3]."""
    from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
    return [np.asarray(image, np.uint8) for image in load_sample_images().images]


def photo_crop(photo: np.ndarray, width: int, height: int, rng):
    """A width x height PIL image cut from `photo` (uint8 [H, W, 3]): a portrait one from the
    photograph turned by 90 degrees; a crop at a random offset when it fits, else the largest
    crop of that shape scaled by U(0.8, 1), resized bicubic; flipped left-right with p = 1/2."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    if height > width:
        photo = np.rot90(photo)
    ph, pw = photo.shape[:2]
    ch, cw = height, width
    if width > pw or height > ph:
        scale = min(pw / width, ph / height) * rng.uniform(0.8, 1.0)
        ch, cw = max(1, int(height * scale)), max(1, int(width * scale))
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = photo[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(crop))
    return image if (cw, ch) == (width, height) else image.resize((width, height),
                                                                  Image.BICUBIC)


def jpeg_bytes(image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a PIL image (Pillow's defaults otherwise: 4:2:0 chroma subsampling)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def stream_source_images(count: int):
    """(uint8 [count, h, w, 3], name): real small images to upsample; CIFAR-10's training images
    from $BOW_JAX_CIFAR10 or ../shared/data/cifar10 (pretrain.npz), else scikit-learn's digits."""
    folder = os.environ.get("BOW_JAX_CIFAR10") or os.path.join(
        os.path.dirname(REPO), "shared", "data", "cifar10")
    path = os.path.join(folder, "pretrain.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            images, name = np.asarray(f["images"][:count], np.uint8), "cifar10"
    else:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
        gray = np.round(load_digits().images[:count] * (255.0 / 16.0)).astype(np.uint8)
        images, name = np.repeat(gray[..., None], 3, axis=-1), "digits"
    reps = -(-count // len(images))
    return np.concatenate([images] * reps)[:count], name


def upsampled_jpeg(image: np.ndarray, width: int, height: int,
                   quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of `image` resized bicubic (Pillow) to width x height."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return jpeg_bytes(Image.fromarray(image).resize((width, height), Image.BICUBIC), quality)


def benchmark_jpegs(file_set: str, count: int, width: int, height: int, seed: int = 0):
    """(JPEG bytes of the `count` files of `file_set`, what they are: a name)."""
    sizes = file_set_sizes(file_set, count, width, height)
    if file_set == "cifar_upsampled":
        images, source = stream_source_images(count)
        return [upsampled_jpeg(im, w, h) for im, (w, h) in zip(images, sizes)], source
    rng = np.random.default_rng(seed)
    photos = sample_photographs()
    return ([jpeg_bytes(photo_crop(photos[i % len(photos)], w, h, rng))
             for i, (w, h) in enumerate(sizes)], "sklearn sample photographs")


def stream_dataset(folder: str, file_set: str, count: int, width: int, height: int):
    """The prepared TFDS builder of the benchmark's JPEGs (built once, cached in `folder`) and a
    description of its files (set, source, count, sizes, quality, mean size, note).

    A dataset 'bow_bench_jpegs' of {'image': JPEG, 'label'} in folder/<set>_<count>_<w>x<h>/
    (tfds.dataset_builders.store_as_tfds_dataset, as tests/test_data.py prepares tiny datasets),
    the description beside it in files.json."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tf = pipeline.import_tensorflow()
    data_dir = os.path.join(folder, f"{file_set}_{count}_{width}x{height}")
    prepared = os.path.join(data_dir, "bow_bench_jpegs", "1.0.0")
    described = os.path.join(data_dir, "files.json")
    if os.path.exists(os.path.join(prepared, "dataset_info.json")) and os.path.exists(described):
        with open(described, encoding="utf-8") as f:
            return tfds.builder_from_directory(prepared), json.load(f)
    jpegs, source = benchmark_jpegs(file_set, count, width, height)
    sizes = [f"{w}x{h}" for w, h in file_set_sizes(file_set, count, width, height)]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10)})
    split = tf.data.Dataset.from_tensor_slices(
        {"image": jpegs, "label": np.arange(count) % 10})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="bow_bench_jpegs", version="1.0.0", features=features, data_dir=data_dir,
        split_datasets={"train": split})
    description = {"set": file_set, "source": source, "count": count,
                   "sizes": {s: sizes.count(s) for s in sorted(set(sizes))},
                   "jpeg_quality": JPEG_QUALITY,
                   "mean_kib": sum(map(len, jpegs)) / len(jpegs) / 1024,
                   "note": FILE_SET_NOTES[file_set]}
    files.atomic_write_text(described, json.dumps(description, indent=1))
    return tfds.builder_from_directory(prepared), description


def stored_jpegs(builder, split: str = "train"):
    """The JPEG bytes of `split` as stored (in stored order, not decoded): the very files the
    streamed pipeline reads, for the decode floors and the official transform."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    return [example["image"] for example in ds.as_numpy_iterator()]


def threading_options(cores: int):
    """tf.data Options confining the pipeline to `cores` threads: its own threadpool of that size
    and no intra-op parallelism beyond it (each op runs on one thread)."""
    tf = pipeline.import_tensorflow()
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    return options


def cores_needed(images_per_s_per_core: float, target: float = STREAM_TARGET_IMAGES_PER_S):
    """Cores a linear scaling would need for `target` images/s: ceil(target / per-core rate)."""
    if not images_per_s_per_core or images_per_s_per_core <= 0:
        return None
    return math.ceil(target / images_per_s_per_core)


def host_fields(cpu_per_image, wall_s: float, images: int) -> dict:
    """Row fields from per-window CPU seconds per image (their median is the figure) and the
    total wall time: images per CPU-second (= images/s per core) and the cores for the target."""
    cpu = statistics.median(cpu_per_image)
    rate = 1.0 / cpu if cpu > 0 else None
    return {"cpu_ms_per_image": 1e3 * cpu,
            "cpu_ms_per_image_windows": [1e3 * c for c in cpu_per_image],
            "images_per_cpu_s": rate, "cores_for_target": cores_needed(rate),
            "target_images_per_s": STREAM_TARGET_IMAGES_PER_S,
            "images_per_s": images / wall_s if wall_s > 0 else None}


def time_canvases(builder, *, canvas_size: int, cores: int, batch_size: int, batches: int,
                  warmup: int) -> dict:
    """Host cost of `pipeline.tfds_canvases` (read, decode, canvas) with tf.data confined to
    `cores` threads: CPU seconds of each of `batches` timed batches (after the first and `warmup`
    more), per image; the first batch's shapes."""
    it = pipeline.tfds_canvases(builder, "train", global_batch=batch_size, seed=0,
                                canvas_size=canvas_size, process_index=0, process_count=1,
                                options=threading_options(cores))
    first = next(it)  # builds the pipeline and fills the shuffle buffer (undecoded records)
    for _ in range(warmup):
        next(it)
    per_image, start_cpu, start = [], cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        cpu = cpu_seconds()
        next(it)
        per_image.append((cpu_seconds() - cpu) / batch_size)
    wall = time.perf_counter() - start
    fields = host_fields(per_image, wall, batch_size * batches)
    fields.update(cpu_s_per_wall_s=(cpu_seconds() - start_cpu) / wall,
                  batch=batch_size, batches=batches, warmup=warmup,
                  canvases={k: [list(v.shape), str(v.dtype)] for k, v in first.items()},
                  max_size=[int(v) for v in first["size"].max(axis=0)])
    return fields


def time_passes(run, count: int, passes: int) -> dict:
    """`run()` (one pass over `count` files) once untimed, then `passes` times: host fields of
    the per-pass CPU seconds per image."""
    run()
    per_image, start = [], time.perf_counter()
    for _ in range(passes):
        cpu = cpu_seconds()
        run()
        per_image.append((cpu_seconds() - cpu) / count)
    return {**host_fields(per_image, time.perf_counter() - start, count * passes),
            "passes": passes}


def time_tf_decode(jpegs, passes: int) -> dict:
    """tf.io.decode_jpeg (RGB) of every file, in tf.data confined to 1 thread, nothing else."""
    tf = pipeline.import_tensorflow()
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(jpegs)).map(
        lambda data: tf.shape(tf.io.decode_jpeg(data, channels=3)))
    ds = ds.batch(64).with_options(threading_options(1))

    def run():
        for _ in ds:
            pass
    return time_passes(run, len(jpegs), passes)


def time_pillow_decode(jpegs, passes: int) -> dict:
    """Pillow's decode of every file to RGB (as torchvision's ImageFolder loader: open +
    convert('RGB')), one thread."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    def run():
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("RGB")
    return time_passes(run, len(jpegs), passes)


# The official OBoW transform, run in its own process (no TensorFlow there: torchvision imported
# after TensorFlow can crash), imported from the official source tree, never copied.


def official_source(arg: str, tmp: str):
    """(tree, where from) of the official OBoW source to import: --official_src as a source tree
    (or the folder above one) or a .tar.gz, unpacked into `tmp`; '' looks for
    ../shared/peer/obow_official-*.tar.gz; 'none' or nothing found: (None, why)."""
    if arg == "none":
        return None, "skipped: --official_src none"
    path = arg
    if not path:
        found = sorted(glob.glob(OFFICIAL_TARBALLS))
        if not found:
            return None, ("skipped: the official OBoW source (github.com/valeoai/obow) was not "
                          f"found; pass --official_src DIR (looked for {OFFICIAL_TARBALLS})")
        path = found[-1]
    origin = path
    if os.path.isfile(path):
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        path = tmp
    for root in [path] + sorted(glob.glob(os.path.join(path, "*"))):
        if os.path.isfile(os.path.join(root, "obow", "datasets.py")):
            return root, origin
    return None, f"skipped: {origin} holds no obow/datasets.py (the official OBoW source)"


def write_image_folder(jpegs, folder: str):
    """The files as an ImageFolder (train/photos/*.jpg, one of them also as val/), the layout the
    official ImageNet loader reads."""
    for split, part in (("train", jpegs), ("val", jpegs[:1])):
        os.makedirs(os.path.join(folder, split, "photos"), exist_ok=True)
        for i, data in enumerate(part):
            with open(os.path.join(folder, split, "photos", f"{i:05d}.jpg"), "wb") as f:
                f.write(data)


def time_official(tree: str, jpegs, passes: int, config_file: str) -> dict:
    """The official transform's host fields on `jpegs` (scripts/benchmark.py official_transform
    in a child process). RuntimeError with the child's last lines when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder(jpegs, os.path.join(tmp, "images"))
        out = os.path.join(tmp, "official.json")
        command = [sys.executable, os.path.abspath(__file__), "official_transform", "--src",
                   tree, "--folder", os.path.join(tmp, "images"), "--passes", str(passes),
                   "--config_file", config_file, "--json", out]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"official transform: exit status {done.returncode}: "
                               f"{done.stderr[-2000:]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def _shapes(tree):
    """The nested shapes of the official transform's output (lists of tensors)."""
    if isinstance(tree, (list, tuple)):
        return [_shapes(t) for t in tree]
    return list(tree.shape) if hasattr(tree, "shape") else type(tree).__name__


def official_transform_main(argv) -> int:
    """python scripts/benchmark.py official_transform --src TREE --folder DIR [--passes N]
    [--json OUT]: CPU seconds per image of the official OBoW ImageNet training transform on an
    ImageFolder DIR (DIR/train/<class>/*.jpg, DIR/val/...), imported from the official source
    TREE (github.com/valeoai/obow): its `obow.datasets.get_ImageNet_data_for_obow` with the
    `data` section of its config (--config_file, relative to TREE), then its dataset's
    __getitem__ per image (Pillow decode + teacher view + 2 crops + 5 patches, colour jitter,
    grayscale, blur, float tensors), as each worker of its DataLoader runs it: one torch
    thread. Timed: --passes passes over the files after one untimed pass; getrusage."""
    parser = argparse.ArgumentParser(prog="benchmark.py official_transform")
    parser.add_argument("--src", required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--config_file", default=OFFICIAL_CONFIG)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    import inspect  # pylint: disable=import-outside-toplevel
    import random  # pylint: disable=import-outside-toplevel
    import yaml  # pylint: disable=import-outside-toplevel
    try:
        import torch  # pylint: disable=import-outside-toplevel
        torch.set_num_threads(1)  # as in a DataLoader worker process
        torch.manual_seed(0)
    except ImportError:
        torch = None
    random.seed(0)
    sys.path.insert(0, os.path.abspath(args.src))
    from obow import datasets as official  # pylint: disable=import-outside-toplevel,import-error
    with open(os.path.join(args.src, args.config_file), encoding="utf-8") as f:
        data = yaml.safe_load(f)["data"]
    accepted = inspect.signature(official.get_ImageNet_data_for_obow).parameters
    recipe = {k: v for k, v in data.items() if k not in OFFICIAL_LOADER_KEYS and k in accepted}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its transforms
        train, _ = official.get_ImageNet_data_for_obow(args.folder, **recipe)
    count = len(train)
    views, _ = train[0]

    def run():
        for i in range(count):
            train[i]  # pylint: disable=pointless-statement
    result = {**time_passes(run, count, args.passes), "images": count, "views": _shapes(views),
              "dtype": str(getattr(views[0], "dtype", "")), "recipe": recipe,
              "config_file": args.config_file,
              "torch_threads": torch.get_num_threads() if torch is not None else None}
    if args.json:
        files.atomic_write_text(args.json, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("cpu_ms_per_image", "views")}))
    return 0


# The views' cost on the device.


def cost_value(cost, key: str):
    """`key` of a `cost_analysis()` result (a dict, or a list of dicts summed), or None."""
    parts = [cost] if isinstance(cost, dict) else list(cost or ())
    values = [float(p[key]) for p in parts if p and p.get(key) is not None and p[key] >= 0]
    return sum(values) if values else None


def canvas_batch(batch: int, canvas: int, image_hw, seed: int = 0):
    """(uint8 canvases [batch, S, S, 3], int32 sizes [batch, 2]): random images of image_hw
    (h, w) (shrunk to fit a smaller canvas), every other one turned to portrait, in the corner
    of zero canvases."""
    rng = np.random.default_rng(seed)
    scale = min(1.0, canvas / max(image_hw))  # as the host shrinks larger images to fit
    image_hw = tuple(max(1, round(side * scale)) for side in image_hw)
    sizes = np.array([image_hw if i % 2 == 0 else image_hw[::-1] for i in range(batch)],
                     np.int32)
    images = np.zeros((batch, canvas, canvas, 3), np.uint8)
    for image, (h, w) in zip(images, sizes):
        image[:h, :w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return images, sizes


def views_cost(config, *, batch: int, image_hw, step_batches) -> dict:
    """XLA's count per image of `make_views` (compiled, on canvases of config.data.canvas_size
    holding image_hw images), of the photometric part of OBoW's step alone
    (`obow.augment_views`, compiled, on those views), and of the whole train step (lowered,
    `cost_only_row`) at each of `step_batches`; the bytes per image the host copies to the
    device (canvas + size + label) and what the views themselves would weigh (uint8)."""
    canvas = int(config.data.canvas_size)
    config = variant_config(config, "fp32", batch)
    method = make_method(config, canvas)
    images, sizes = canvas_batch(batch, canvas, tuple(image_hw))
    key = jax.random.key(0)
    start = time.perf_counter()
    lowered = jax.jit(method.make_views).lower(images, sizes, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    views = jax.block_until_ready(compiled(images, sizes, key))
    start = time.perf_counter()
    jax.block_until_ready(compiled(images, sizes, key))
    run_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    per_image = lambda value: None if value is None else value / batch
    row = {"kind": "device", "batch": batch, "canvas_size": canvas,
           "image_hw": [int(v) for v in sizes[0]],
           "views": {k: list(v.shape) for k, v in views.items()},
           "views_flops_per_image": per_image(cost_flops(cost)),
           "views_lowered_flops_per_image": per_image(cost_flops(lowered.cost_analysis())),
           "views_bytes_accessed_per_image": per_image(cost_value(cost, "bytes accessed")),
           "views_compile_s": compile_s, "views_cpu_run_s": run_s,
           "canvas_bytes_per_image": canvas * canvas * 3 + 2 * 4 + 4,  # canvas, size, label
           "views_uint8_bytes_per_image": sum(int(np.prod(v.shape[1:])) for v in
                                              views.values()) + 4}
    # What a loader that sends float32 views (the official one) copies per image.
    row["views_float32_bytes_per_image"] = 4 * (row["views_uint8_bytes_per_image"] - 4) + 4
    photometric = None
    if config.method == "obow":
        from bow_jax.methods import obow  # pylint: disable=import-outside-toplevel
        s = obow.setup(config, data_info(config, canvas))
        augment = jax.jit(lambda k, v: obow.augment_views(k, v, s.cfg, s.mean, s.std)[:2])
        photometric = cost_flops(augment.lower(key, views).compile().cost_analysis())
    row["photometric_flops_per_image"] = per_image(photometric)
    row["step"] = []
    for step_batch in step_batches:
        step = cost_only_row(config, "fp32", batch_size=step_batch, image_size=canvas)
        flops = step["xla_lowered_flops_per_image"]
        fraction = lambda part, flops=flops: (None if part is None or not flops
                                              else part / flops)
        row["step"].append({
            "batch": step_batch, "xla_lowered_flops_per_image": flops,
            "analytic_flops_per_image": step["analytic_flops_per_image"],
            "views_fraction": fraction(row["views_flops_per_image"]),
            "photometric_fraction": fraction(row["photometric_flops_per_image"])})
    return row


def stream_rows_for(name, config, args):
    """Rows of a streamed TFDS config: per file set, ours per core count, the decode floors and
    the official transform (with official / ours); then the device cost of the views."""
    rows = []
    canvas = int(config.data.canvas_size)
    batch = args.pipeline_batch
    width, height = args.pipeline_image_size
    folder = args.pipeline_data or os.path.join(tempfile.gettempdir(), "bow_jax_pipeline_data")
    epoch_steps = args.pipeline_images // batch
    if args.pipeline_warmup + args.pipeline_batches + 1 > epoch_steps:
        print(f"note: {args.pipeline_warmup + args.pipeline_batches + 1} batches of {batch} cross "
              f"an epoch of {args.pipeline_images} images: the timing includes the pipeline's "
              f"restart at the epoch boundary (raise --pipeline_images)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tree, origin = official_source(args.official_src, tmp)
        for file_set in args.pipeline_files:
            builder, described = stream_dataset(folder, file_set, args.pipeline_images, width,
                                                height)
            jpegs = stored_jpegs(builder)
            common = {"config": name, "kind": "host", "files": described}
            ours = []
            for cores in args.pipeline_cores:
                fields = time_canvases(builder, canvas_size=canvas, cores=cores,
                                       batch_size=batch, batches=args.pipeline_batches,
                                       warmup=args.pipeline_warmup)
                ours.append({**common, "pipeline": f"ours: tfds_canvases (decode + canvas "
                                                   f"{canvas})", "cores": cores, **fields})
                print(f"{name} {file_set} ours, {cores} cores: "
                      f"{fields['cpu_ms_per_image']:.2f} CPU ms/image", file=sys.stderr,
                      flush=True)
            rows += ours
            passes = args.pipeline_passes
            rows.append({**common, "pipeline": "floor: tf.io.decode_jpeg", "cores": 1,
                         **time_tf_decode(jpegs, passes)})
            rows.append({**common, "pipeline": "floor: Pillow decode", "cores": 1,
                         **time_pillow_decode(jpegs, passes)})
            official = {**common, "pipeline": "official OBoW transform (Pillow decode + "
                                              "views + photometric, float tensors)",
                        "cores": 1, "official_src": origin}
            if tree is None:
                official["note"] = origin
            else:
                try:
                    official.update(time_official(tree, jpegs, passes, args.official_config))
                except Exception as e:  # pylint: disable=broad-except
                    official["note"] = f"failed: {type(e).__name__}: {e}"
            if official.get("cpu_ms_per_image") is not None:
                official["official_over_ours"] = (official["cpu_ms_per_image"]
                                                  / ours[0]["cpu_ms_per_image"])
                official["ours_cores"] = ours[0]["cores"]
            print(f"{name} {file_set} official: "
                  f"{official.get('cpu_ms_per_image', official.get('note'))}", file=sys.stderr,
                  flush=True)
            rows.append(official)
    if not args.skip_views_cost:
        height_w = (args.views_image_size[1], args.views_image_size[0])
        rows.append({"config": name, **views_cost(config, batch=args.views_batch,
                                                  image_hw=height_w,
                                                  step_batches=args.views_step_batches)})
    return rows


def _fmt(value, scale=1.0, spec=".0f"):
    return "n/a" if value is None else format(value / scale, spec)


def pipeline_markdown(pipeline_rows):
    """The tables of the --pipeline rows: in-memory device views, host CPU per image (with the
    targets), device cost of the views."""
    lines = []
    memory = [p for p in pipeline_rows if "kind" not in p]
    host = [p for p in pipeline_rows if p.get("kind") == "host"]
    device = [p for p in pipeline_rows if p.get("kind") == "device"]
    if memory:
        lines += ["", "| config | pipeline | batch | images/s |", "|---|---|---|---|"]
        lines += [f"| {p['config']} | {p['pipeline']} | {p['batch']} | "
                  f"{_fmt(p['images_per_s'], 1, '.1f')} |" for p in memory]
    if host:
        lines += ["", f"| config | files | pipeline | cores | CPU ms/image (median) | "
                      f"images/s per core | images/s (wall) | CPU s/s | "
                      f"cores for {STREAM_TARGET_IMAGES_PER_S} images/s | official / ours |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in host:
            if p.get("cpu_ms_per_image") is None:
                lines.append(f"| {p['config']} | {p['files']['set']} | {p['pipeline']} | "
                             f"{p['cores']} | {p.get('note')} | | | | | |")
                continue
            ratio = p.get("official_over_ours")
            lines.append(
                f"| {p['config']} | {p['files']['set']} | {p['pipeline']} | {p['cores']} | "
                f"{p['cpu_ms_per_image']:.2f} | {_fmt(p['images_per_cpu_s'], 1, '.0f')} | "
                f"{_fmt(p['images_per_s'], 1, '.0f')} | {_fmt(p.get('cpu_s_per_wall_s'), 1, '.2f')}"
                f" | {p['cores_for_target']} | {'' if ratio is None else f'{ratio:.1f}x'} |")
        lines.append("")
        for described in {p["files"]["set"]: p["files"] for p in host}.values():
            sizes = ", ".join(f"{n} x {s}" for s, n in described["sizes"].items())
            lines.append(f"Files '{described['set']}': {described['count']} JPEGs ({sizes}; "
                         f"mean {described['mean_kib']:.0f} KiB): {described['note']}.")
        lines.append(f"Targets: ours <= {TARGET_HOST_MS_PER_IMAGE} CPU ms per image on real "
                     f"photographs, official / ours >= {TARGET_OFFICIAL_RATIO:g}x.")
    for p in device:
        lines += ["", f"| config | device work per image (batch {p['batch']}, canvas "
                      f"{p['canvas_size']}, images {p['image_hw'][1]}x{p['image_hw'][0]} and "
                      f"{p['image_hw'][0]}x{p['image_hw'][1]}) | GFLOP/image | "
                      + " | ".join(f"% of step (batch {s['batch']}: "
                                   f"{_fmt(s['xla_lowered_flops_per_image'], 1e9, '.1f')} "
                                   f"GFLOP/image)" for s in p["step"]) + " |",
                  "|---|---|---|" + "---|" * len(p["step"])]
        for label, flops, key in (
                ("make_views (geometric, on canvases)", p["views_flops_per_image"],
                 "views_fraction"),
                ("augment_views (photometric, in the step)", p["photometric_flops_per_image"],
                 "photometric_fraction")):
            lines.append(f"| {p['config']} | {label} | {_fmt(flops, 1e9, '.4f')} | " + " | ".join(
                _fmt(s[key], 0.01, ".3f") for s in p["step"]) + " |")
        lines += ["", f"Copied to the device per image: {p['canvas_bytes_per_image']:,} bytes "
                  f"(uint8 canvas + size + label), against "
                  f"{p['views_uint8_bytes_per_image']:,} for the uint8 views themselves and "
                  f"{p['views_float32_bytes_per_image']:,} for float32 views. XLA's bytes "
                  f"accessed by make_views: "
                  f"{_fmt(p['views_bytes_accessed_per_image'], 2**20, '.1f')} MiB per image. "
                  f"Step: XLA's count of the lowered train step (photometric part "
                  f"included). Target: the views' FLOPs < "
                  f"{100 * TARGET_VIEWS_FLOPS_FRACTION:g}% of the step's."]
    return lines


def markdown(rows, pipeline_rows, cost_rows=()):
    lines = ["| config | method | model | variant | devices | batch | images/s | s/step | "
             "compile s | peak MiB | compiled MiB | compiled MiB/img | XLA GFLOP/img | "
             "analytic GFLOP/img | ImageNet epoch h | loss vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        check = r.get("loss_check")
        check = ("reference" if r["variant"] == "fp32" else
                 f"{check['max_rel_diff_vs_fp32']:.1e} (rtol {check['rtol']:g}) "
                 f"{'ok' if check['ok'] else 'FAIL'}" if check else "not checked")
        lines.append(
            f"| {r['config']} | {r['method']} | {r['model']} "
            f"w{r['model_kwargs'].get('width', '')} | {r['variant']} | {r['devices']} "
            f"{r['platform']} | {r['global_batch']} | {r['images_per_s']:.1f} | "
            f"{r['step_s']:.3f} | {r['compile_s']:.1f} | {_fmt(r.get('peak_bytes'), 2**20)} | "
            f"{_fmt(r['compiled_bytes'], 2**20)} | "
            f"{_fmt(r.get('compiled_bytes_per_image'), 2**20, '.1f')} | "
            f"{_fmt(r.get('xla_flops_per_image'), 1e9, '.3g')} | "
            f"{_fmt(r.get('analytic_flops_per_image'), 1e9, '.3g')} | "
            f"{r['imagenet_epoch_h']:.1f} | {check} |")
    if cost_rows:
        lines += ["", "| config | variant | batch | XLA GFLOP/img (lowered) | analytic GFLOP/img |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['config']} | {c['variant']} | {c['global_batch']} | "
                  f"{_fmt(c['xla_lowered_flops_per_image'], 1e9, '.3g')} | "
                  f"{_fmt(c['analytic_flops_per_image'], 1e9, '.3g')} |" for c in cost_rows]
    lines += pipeline_markdown(pipeline_rows)
    if not rows:  # --pipeline alone: no train-step table
        lines = lines[2:]
    return "\n".join(lines).strip("\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--config", action="append", default=None,
                        help="config file (repeat for several; with --pipeline alone: "
                             f"{DEFAULT_PIPELINE_CONFIG})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field in every config")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {VARIANTS}; fp32 is added as the reference "
                             "when another variant is asked (default fp32; with --pipeline and "
                             "no --variants, no train step is run)")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: the "
                        "config's, or --per_device_batch x devices)")
    parser.add_argument("--per_device_batch", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=0,
                        help="side of the synthetic stored images (default from the config)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (>= 1)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps after compiling (their losses are compared; with 0, "
                             "the first timed step's loss is)")
    parser.add_argument("--remat_rtol", type=float, default=1e-5)
    parser.add_argument("--bf16_rtol", type=float, default=2e-2)
    parser.add_argument("--isolate", choices=("auto", "always", "never"), default="auto",
                        help="run each variant in its own process (auto: when more than one "
                             "variant runs), so that each peak memory is its own")
    parser.add_argument("--cost_only", action="store_true",
                        help="only the FLOPs of the lowered step and the analytic count")
    parser.add_argument("--pipeline", action="store_true",
                        help="time the input pipelines (streamed TFDS configs: per core count)")
    parser.add_argument("--pipeline_steps", type=int, default=5,
                        help="timed batches of the in-memory pipeline rows")
    parser.add_argument("--pipeline_data", default="", metavar="DIR",
                        help="where the streamed benchmark's TFDS JPEGs are built once and reused "
                             "(default: a folder in the temp dir)")
    parser.add_argument("--pipeline_files", type=_name_list, default=("photos",),
                        help=f"comma-separated file sets from {FILE_SETS} (default photos)")
    parser.add_argument("--pipeline_images", type=int, default=1024,
                        help="files in each set")
    parser.add_argument("--pipeline_image_size", type=_size, default=(500, 375),
                        metavar="WxH", help="their typical size (ImageNet's 500x375)")
    parser.add_argument("--pipeline_cores", type=_int_list, default=(1, 2),
                        help="comma-separated tf.data threadpool sizes, e.g. 1,2,4,8")
    parser.add_argument("--pipeline_batch", type=int, default=32,
                        help="batch of the streamed rows (one timing window)")
    parser.add_argument("--pipeline_batches", type=int, default=30,
                        help="timed batches per core count (streamed rows; the median of their "
                             "CPU seconds per image is reported)")
    parser.add_argument("--pipeline_warmup", type=int, default=1,
                        help="untimed batches per core count after the first (streamed rows)")
    parser.add_argument("--pipeline_passes", type=int, default=3,
                        help="timed passes over the files of the decode floors and of the "
                             "official transform (the median is reported)")
    parser.add_argument("--official_src", default="", metavar="DIR|TAR.GZ",
                        help="the official OBoW source (github.com/valeoai/obow) to time its "
                             "transform from: a source tree or its .tar.gz; default: "
                             "../shared/peer/obow_official-*.tar.gz if present, unpacked into "
                             "a temp dir; 'none' skips that row")
    parser.add_argument("--official_config", default=OFFICIAL_CONFIG,
                        help="the official config whose data section is the recipe (relative "
                             "to the official source)")
    parser.add_argument("--views_batch", type=int, default=8,
                        help="canvases per batch of the device cost of the views")
    parser.add_argument("--views_image_size", type=_size, default=(500, 375), metavar="WxH",
                        help="the images in those canvases (every other one portrait)")
    parser.add_argument("--views_step_batches", type=_int_list, default=(64, 256),
                        help="global batches of the train step the views are compared with "
                             "(lowered, not compiled)")
    parser.add_argument("--skip_views_cost", action="store_true",
                        help="no device cost of the views (streamed rows)")
    parser.add_argument("--json", default="", help="write the results here (after every row)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: at least 1 timed step is needed")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: expected >= 0")
    if args.config is None:
        if not args.pipeline:
            parser.error("--config is required (or --pipeline, whose default config is "
                         f"{DEFAULT_PIPELINE_CONFIG})")
        args.config = [os.path.join(REPO, DEFAULT_PIPELINE_CONFIG)]
    if args.pipeline and (args.pipeline_batches < 1 or args.pipeline_warmup < 0
                          or min(args.pipeline_cores) < 1 or args.pipeline_batch < 1
                          or args.pipeline_passes < 1 or args.views_batch < 1):
        parser.error("--pipeline_batches, --pipeline_batch, --pipeline_passes, --views_batch "
                     "and --pipeline_cores must be >= 1, --pipeline_warmup >= 0")
    for file_set in args.pipeline_files:
        if file_set not in FILE_SETS:
            parser.error(f"--pipeline_files: {file_set!r} is not one of {FILE_SETS}")
    if args.variants is None:  # --pipeline alone times the input only
        args.variants = "" if args.pipeline else "fp32"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: {v!r} is not one of {VARIANTS}")
    if not args.child and variants and variants != ["fp32"] and "fp32" not in variants:
        variants = ["fp32"] + variants
    return args, variants


def _int_list(text: str):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers, e.g. 1,2,4") from None


def _name_list(text: str):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _size(text: str):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 500x375") from None
    return width, height


def global_batch(args, config) -> int:
    """--batch_size, else --per_device_batch x devices (this starts the backend), else config's."""
    return (args.batch_size or args.per_device_batch * jax.device_count()
            or int(config.batch_size))


def measure_variant(path, name, config, variant, args, isolated: bool) -> dict:
    if isolated:
        row = run_isolated(path, variant, args)
    else:
        row = bench_step(config, variant, batch_size=global_batch(args, config),
                         image_size=stored_image_size(config, args.image_size),
                         steps=args.steps, warmup=args.warmup, isolated=args.child)
    row["config"] = name
    return row


def report_row(row, rows, args):
    """Loss check against fp32 (same config), then the lines check.sh and people read."""
    check_losses(rows, args.remat_rtol, args.bf16_rtol)
    name, variant = row["config"], row["variant"]
    print(f"{name} {variant}: {row['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    if variant != "fp32":
        check = row.get("loss_check")
        print(f"{name} {variant} loss vs fp32: "
              f"{check['result'] if check else 'not checked (no fp32 losses)'}",
              file=sys.stderr, flush=True)


def pipeline_rows_for(name, config, args):
    """Streamed TFDS configs (ImageNet): host CPU per image per core count beside the decode
    floors and the official transform, then the device cost of the views; in-memory configs:
    the device-side gather + views (their images never pass through a host pipeline)."""
    if config.data.source == "tfds" and not config.data.in_memory:
        return stream_rows_for(name, config, args)
    batch = global_batch(args, config)
    size = stored_image_size(config, args.image_size)
    return [{"config": name, "pipeline": "device make_views (in-memory)", "batch": batch,
             "images_per_s": bench_device_views(config, batch_size=batch, image_size=size,
                                                steps=args.pipeline_steps)}]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "kmeans":  # the k-means comparison lives beside this file
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import benchmark_kmeans  # pylint: disable=import-outside-toplevel
        return benchmark_kmeans.main(argv[1:])
    if argv and argv[0] == "official_transform":  # --pipeline runs it in its own process
        return official_transform_main(argv[1:])
    args, variants = parse_args(argv)
    isolated = not args.child and (args.isolate == "always" or
                                   (args.isolate == "auto" and len(variants) > 1))
    rows, pipeline_rows, failed, cost_rows = [], [], [], []
    save = lambda complete: write_result(args.json, rows, pipeline_rows, failed, cost_rows,
                                         complete)
    for path in args.config:
        config = load_config(path, args.set)
        name = os.path.basename(path)[:-3]
        for variant in variants:
            if args.cost_only:
                cost_rows.append({"config": name, **cost_only_row(
                    config, variant, batch_size=global_batch(args, config),
                    image_size=stored_image_size(config, args.image_size))})
                save(False)
                continue
            try:
                rows.append(measure_variant(path, name, config, variant, args, isolated))
            except Exception as e:  # pylint: disable=broad-except
                traceback.print_exc()
                failed.append({"config": name, "variant": variant,
                               "error": f"{type(e).__name__}: {e}"})
                print(f"{name} {variant}: FAILED ({e})", file=sys.stderr, flush=True)
            else:
                if not args.child:  # the parent prints (once) what its child measured
                    report_row(rows[-1], rows, args)
            save(False)
        if args.pipeline and not args.child:
            pipeline_rows += pipeline_rows_for(name, config, args)
            save(False)
    result = save(True)
    if not args.child:
        print(markdown(rows, pipeline_rows, cost_rows))
        print(json.dumps(result, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
