"""Throughput and memory of bow_jax training steps, and of the input pipelines, measured apart.

Train step: the method's jitted, donated `train_step` on synthetic data that already lives on the
device (random uint8 images turned into the method's views once, outside the timing), so neither
the input pipeline nor TensorFlow is involved. Reported per (config, variant): images/s (source
images per second, e.g. one OBoW image = teacher view + its crops + its patches), seconds per
step, compile time, peak device memory (runtime `memory_stats` where the backend has it, i.e. GPUs,
else n/a) and XLA's compiled-program footprint (arguments + outputs + temporaries, no aliasing),
and what one epoch of ImageNet (1,281,167 images) would take at that speed.

Variants: fp32 (the reference), bf16 (`config.model.kwargs.dtype='bfloat16'`: backbone convolutions
and BatchNorm in bfloat16, parameters / BN statistics / BoW maths / losses in float32) and remat
(`flax.linen.remat` around every residual block of a ResNet backbone: activations inside a block
are recomputed in the backward pass instead of being stored). Each variant's losses over the first
steps (same initial state, same batch) are compared with fp32's: remat must agree to
--remat_rtol (default 1e-5, relative), bf16 to --bf16_rtol (default 2e-2, relative).

Input pipeline (--pipeline): (a) in-memory data: the device-side gather + `make_views` that
train.py runs per step; (b) streamed data: tf.data decoding random 500x375 JPEGs (ImageNet's
typical size) and running the method's `tf_views`, in parallel (AUTOTUNE), then batching.

Examples:
  python scripts/benchmark.py --config configs/obow_resnet50.py --per_device_batch 64 \
      --variants fp32,bf16,remat --steps 20 --json obow_r50.json
  python scripts/benchmark.py --config configs/obow_cifar10_cpu.py \
      --config configs/rotnet_cifar10_cpu.py --batch_size 32 --steps 3 --pipeline
  (--set key=value overrides a config field in every config, e.g. --set model.kwargs.width=8)
  python scripts/benchmark.py kmeans --n 200000 --d 256 --k 2048   (our k-means vs scikit-learn;
      the options are those of scripts/benchmark_kmeans.py)
"""
import argparse
import ast
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bow_jax.lib import sharding  # noqa: E402
from bow_jax.methods import DataInfo, create_method  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
VARIANTS = ("fp32", "bf16", "remat", "bf16+remat")


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


def compiled_footprint(compiled):
    try:
        m = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def runtime_peak(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def bench_step(config, variant: str, *, batch_size: int, image_size: int, steps: int,
               warmup: int, seed: int = 0) -> dict:
    """Times `steps` train steps after `warmup` untimed ones; returns a result row."""
    config = config.copy_and_resolve_references()
    if "bf16" in variant:
        config.model.kwargs.dtype = "bfloat16"
    if "remat" in variant:
        config.model.kwargs.remat = True  # ResNet's remat field: same parameter tree
    config.batch_size = batch_size
    mesh = sharding.make_mesh()
    steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // batch_size)
    info = DataInfo(image_shape=(image_size, image_size, 3),
                    num_examples=steps_per_epoch * batch_size, steps_per_epoch=steps_per_epoch,
                    total_steps=steps_per_epoch * max(int(config.num_epochs), 1))
    method = create_method(config, info)
    state = jax.jit(method.init_state, out_shardings=sharding.replicated(mesh))(
        jax.random.key(seed))
    images = jax.random.randint(jax.random.key(seed + 1),
                                (batch_size, image_size, image_size, 3), 0, 256,
                                jnp.int32).astype(jnp.uint8)
    batch = jax.jit(method.make_views, out_shardings=sharding.batch_sharded(mesh))(
        jax.device_put(images, sharding.batch_sharded(mesh)), jax.random.key(seed + 2))
    # Labels as the training loop delivers them (read only by OBoW's monitor head).
    batch["label"] = jax.device_put(jnp.zeros(batch_size, jnp.int32), sharding.batch_sharded(mesh))
    jax.block_until_ready(batch)
    step = jax.jit(method.train_step, donate_argnums=0,
                   out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    losses = []
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    device = jax.devices()[0]
    return {
        "method": config.method, "model": config.model.name,
        "model_kwargs": {k: str(v) for k, v in config.model.kwargs.items()},
        "variant": variant, "global_batch": batch_size, "devices": jax.device_count(),
        "device_kind": device.device_kind, "platform": device.platform,
        "image_size": image_size, "step_s": seconds, "images_per_s": batch_size / seconds,
        "compile_s": compile_s, "peak_bytes": runtime_peak(device),
        "compiled_bytes": compiled_footprint(compiled), "first_losses": losses,
        "imagenet_epoch_h": IMAGENET_TRAIN_IMAGES / (batch_size / seconds) / 3600,
    }


def check_losses(rows, remat_rtol: float, bf16_rtol: float):
    """Adds to each non-fp32 row how far its first losses are from fp32's, and whether that is
    within the variant's tolerance."""
    reference = {r["config"]: r for r in rows if r["variant"] == "fp32"}
    for row in rows:
        ref = reference.get(row["config"])
        if row["variant"] == "fp32" or ref is None:
            continue
        a, b = np.asarray(row["first_losses"]), np.asarray(ref["first_losses"])
        rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
        tol = bf16_rtol if "bf16" in row["variant"] else remat_rtol
        row["loss_check"] = {"max_rel_diff_vs_fp32": rel, "rtol": tol, "ok": rel <= tol}


def bench_device_views(config, *, batch_size: int, image_size: int, steps: int, n: int = 2048):
    """Images/s of the in-memory path: gather a batch from the on-device dataset + make_views."""
    from bow_jax import train  # pylint: disable=import-outside-toplevel
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    mesh = sharding.make_mesh()
    method = create_method(config, DataInfo((image_size, image_size, 3), n, n // batch_size,
                                            n // batch_size))
    images = sharding.replicate(np.random.default_rng(0).integers(
        0, 256, (n, image_size, image_size, 3), dtype=np.uint8), mesh)
    labels = sharding.replicate(np.zeros(n, np.int32), mesh)
    views = train.compile_view_fn(method, mesh, 0)
    index = lambda s: sharding.shard_batch(
        np.arange(s * batch_size, (s + 1) * batch_size) % n, mesh)
    jax.block_until_ready(views(images, labels, index(0), 0))
    start = time.perf_counter()
    for s in range(steps):
        out = views(images, labels, index(s), s)
    jax.block_until_ready(out)
    return batch_size * steps / (time.perf_counter() - start)


def bench_tf_views(config, *, batch_size: int, image_size: int, batches: int,
                   num_images: int = 64):
    """Images/s of tf.data decoding 500x375 JPEGs and making the method's views (host side)."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    method = create_method(config, DataInfo((image_size, image_size, 3), batch_size, 1, 1))
    if method.tf_views is None:
        return None
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
    rng = np.random.default_rng(0)
    jpegs = [tf.io.encode_jpeg(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).numpy()
             for _ in range(num_images)]
    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()

    def make(i, data):
        return method.tf_views(tf.io.decode_jpeg(data, channels=3),
                               tf.stack([tf.constant(0, tf.int64), i]))

    ds = ds.map(make, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)
    it = iter(ds)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch_size * batches / (time.perf_counter() - start)


def markdown(rows, pipeline_rows):
    lines = ["| config | method | model | variant | devices | batch | images/s | s/step | "
             "compile s | peak MiB | compiled MiB | ImageNet epoch h | loss vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        check = r.get("loss_check")
        check = ("reference" if r["variant"] == "fp32" else
                 f"{check['max_rel_diff_vs_fp32']:.1e} (rtol {check['rtol']:g}) "
                 f"{'ok' if check['ok'] else 'FAIL'}" if check else "")
        peak = _mib(r["peak_bytes"])
        comp = _mib(r["compiled_bytes"])
        lines.append(
            f"| {r['config']} | {r['method']} | {r['model']} "
            f"w{r['model_kwargs'].get('width', '')} | {r['variant']} | {r['devices']} "
            f"{r['platform']} | {r['global_batch']} | {r['images_per_s']:.1f} | "
            f"{r['step_s']:.3f} | {r['compile_s']:.1f} | "
            f"{'n/a' if peak is None else f'{peak:.0f}'} | "
            f"{'n/a' if comp is None else f'{comp:.0f}'} | {r['imagenet_epoch_h']:.1f} | "
            f"{check} |")
    if pipeline_rows:
        lines += ["", "| config | pipeline | batch | images/s |", "|---|---|---|---|"]
        for p in pipeline_rows:
            value = "n/a" if p["images_per_s"] is None else f"{p['images_per_s']:.1f}"
            lines.append(f"| {p['config']} | {p['pipeline']} | {p['batch']} | {value} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "kmeans":  # the k-means comparison lives beside this file
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import benchmark_kmeans  # pylint: disable=import-outside-toplevel
        return benchmark_kmeans.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True,
                        help="config file (repeat for several)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field in every config")
    parser.add_argument("--variants", default="fp32",
                        help=f"comma-separated, from {VARIANTS}; fp32 is added as the reference "
                             "when another variant is asked")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: the "
                        "config's, or --per_device_batch x devices)")
    parser.add_argument("--per_device_batch", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=0,
                        help="side of the synthetic stored images (default from the config)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps after compiling (their losses are compared)")
    parser.add_argument("--remat_rtol", type=float, default=1e-5)
    parser.add_argument("--bf16_rtol", type=float, default=2e-2)
    parser.add_argument("--pipeline", action="store_true", help="also time the input pipelines")
    parser.add_argument("--pipeline_steps", type=int, default=5)
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: {v!r} is not one of {VARIANTS}")
    if variants != ["fp32"] and "fp32" not in variants:
        variants = ["fp32"] + variants
    rows, pipeline_rows = [], []
    for path in args.config:
        config = load_config(path, args.set)
        name = os.path.basename(path)[:-3]
        batch = (args.batch_size or args.per_device_batch * jax.device_count()
                 or int(config.batch_size))
        size = stored_image_size(config, args.image_size)
        for variant in variants:
            row = bench_step(config, variant, batch_size=batch, image_size=size,
                             steps=args.steps, warmup=args.warmup)
            row["config"] = name
            rows.append(row)
            print(f"{name} {variant}: {row['images_per_s']:.1f} images/s", file=sys.stderr,
                  flush=True)
        if args.pipeline:
            pipeline_rows.append({"config": name, "pipeline": "device make_views (in-memory)",
                                  "batch": batch, "images_per_s": bench_device_views(
                                      config, batch_size=batch, image_size=size,
                                      steps=args.pipeline_steps)})
            pipeline_rows.append({"config": name, "pipeline": "tf.data JPEG 500x375 + tf_views",
                                  "batch": batch, "images_per_s": bench_tf_views(
                                      config, batch_size=batch, image_size=size,
                                      batches=args.pipeline_steps)})
    check_losses(rows, args.remat_rtol, args.bf16_rtol)
    print(markdown(rows, pipeline_rows))
    result = {"train_step": rows, "pipeline": pipeline_rows,
              "jax": jax.__version__, "backend": jax.default_backend()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    failed = [r for r in rows if not r.get("loss_check", {}).get("ok", True)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
