"""Host-side input: which examples each process loads at each step, and the tf.data path for TFDS.

Data order is a pure function of (seed, step): epoch e visits a permutation drawn from
SeedSequence([seed, e]), and global step s takes the s-th contiguous window of it. Each process
loads its contiguous slice of that global batch. So multi-host sharding is index slicing, and a run
resumed at any step sees exactly the batches an uninterrupted run would have seen.

For in-memory datasets the host produces only indices (`IndexLoader`); the device gathers and
augments. For TFDS datasets `tfds_canvases` reads and decodes each image once with tf.data and
pads it into a fixed uint8 canvas with its true size (`tf_canvas`): nothing else per image on the
host; every view is cut on the device (`data/batches.py`). For a labelled subset of a TFDS split
(semi-supervised fine-tuning) `tfds_subset_canvases` streams only the subset. TensorFlow is
imported only inside the TFDS functions.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Iterator

import numpy as np

from bow_jax.data.datasets import UnreadableImageError, UnreadableImagesWarning
from bow_jax.lib.errors import InputError
from bow_jax.lib.sharding import check_divisible

# ------------------------------------------------------------------------------------------------
# Data order for in-memory datasets (and the bookkeeping both paths share).


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the `n` examples; depends on (seed, epoch) only."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches in one pass over `n` examples (the last partial batch is dropped)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}.")
    steps = n // global_batch
    if steps == 0:
        raise InputError(f"The dataset has {n} examples, fewer than one global batch "
                         f"(config.batch_size={global_batch}).")
    return steps


def process_info(process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to this JAX process's."""
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
    return int(process_index), int(process_count)


def local_batch_size(global_batch: int, process_count: int) -> int:
    """The part of the global batch one process loads."""
    check_divisible(global_batch, process_count, "config.batch_size", "the number of processes")
    return global_batch // process_count


def _global_window(permutation: np.ndarray, step_in_epoch: int, global_batch: int,
                   process_index: int, process_count: int) -> np.ndarray:
    local = local_batch_size(global_batch, process_count)
    start = step_in_epoch * global_batch + process_index * local
    return permutation[start:start + local].astype(np.int32)


def batch_indices(seed: int, step: int, n: int, global_batch: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
    """int32 [global_batch // process_count]: the example indices this process loads at `step`.

    The global batch of step s is window s mod steps_per_epoch of epoch (s // steps_per_epoch)'s
    permutation; process p takes the p-th contiguous slice of it.
    """
    if n >= 2**31:
        raise ValueError(f"n={n} examples do not fit int32 indices.")
    epoch, step_in_epoch = divmod(int(step), steps_per_epoch(n, global_batch))
    return _global_window(epoch_permutation(seed, epoch, n), step_in_epoch, global_batch,
                          process_index, process_count)


class IndexLoader:
    """Iterator over this process's batches of indices into an in-memory dataset.

    Yields {'index': int32 [local_batch]} (plus 'label' when `labels` is given) for steps
    start_step, start_step + 1, ...; `step` is the step of the next batch. Each epoch's
    permutation is computed once; the work per step is a slice, so no prefetch thread is needed.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int = 0,
                 process_index: int | None = None, process_count: int | None = None,
                 labels: np.ndarray | None = None):
        if n >= 2**31:
            raise ValueError(f"n={n} examples do not fit int32 indices.")
        if labels is not None and len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries, expected n={n}.")
        self.n, self.global_batch, self.seed = int(n), int(global_batch), int(seed)
        self.process_index, self.process_count = process_info(process_index, process_count)
        self.local_batch = local_batch_size(self.global_batch, self.process_count)
        self.steps_per_epoch = steps_per_epoch(self.n, self.global_batch)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.step = int(start_step)
        self._epoch, self._permutation = None, None

    def __iter__(self) -> "IndexLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._permutation = epoch, epoch_permutation(self.seed, epoch, self.n)
        index = _global_window(self._permutation, step_in_epoch, self.global_batch,
                               self.process_index, self.process_count)
        self.step += 1
        batch = {"index": index}
        if self.labels is not None:
            batch["label"] = self.labels[index]
        return batch


# ------------------------------------------------------------------------------------------------
# TFDS: tf.data decodes each image once into a canvas. The file order and shuffle are seeded by
# (seed, epoch, process), so a resumed pipeline repeats itself exactly; no randomness per image.


def import_tensorflow():
    """The tensorflow module (the optional `tfds` extra), kept off the accelerators."""
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")  # JAX owns the accelerators
    return tf


def _to_uint8(tf, image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def tf_resize(image, height, width):
    """Bilinear resize with antialiasing (PIL / torchvision-antialias semantics) -> uint8."""
    tf = import_tensorflow()
    return _to_uint8(tf, tf.image.resize(image, tf.stack([height, width]), method="bilinear",
                                         antialias=True))


def tf_center_crop_resize(image, resize_shorter: int, crop: int):
    """torchvision Resize(resize_shorter) + CenterCrop(crop) on a uint8 [H,W,3] tensor."""
    tf = import_tensorflow()
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    # torchvision: the longer side becomes int(size * long / short) (truncated).
    new_long = tf.cast(tf.cast(resize_shorter * long, tf.float64) / tf.cast(short, tf.float64),
                       tf.int32)
    new_h = tf.where(h <= w, resize_shorter, new_long)
    new_w = tf.where(h <= w, new_long, resize_shorter)
    resized = tf_resize(image, new_h, new_w)
    # torchvision: top = int(round((H - crop) / 2)), Python rounding (half to even).
    top = tf.cast(tf.round(tf.cast(new_h - crop, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - crop, tf.float32) / 2.0), tf.int32)
    return resized[top:top + crop, left:left + crop]


def tf_decode(encoded, decode, canvas_size: int = 0):
    """Decode one encoded image -> uint8 [h, w, 3].

    A JPEG is decoded by libjpeg with the accurate integer IDCT, the one Pillow (hence the
    official PyTorch code) uses: the same pixels, where TensorFlow's default fast IDCT is about
    one grey level off on average. With a `canvas_size`, a JPEG whose longer side is at least
    twice the canvas is decoded at 1/2, 1/4 or 1/8 scale (the smallest that keeps the longer
    side >= canvas_size): much cheaper than decoding every pixel to shrink them. Other formats:
    `decode(encoded)` (the dataset's own decoder)."""
    tf = import_tensorflow()

    def jpeg():
        if not canvas_size:
            return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
        shape = tf.io.extract_jpeg_shape(encoded)
        longer = tf.maximum(shape[0], shape[1])
        branch = sum(tf.cast(longer >= r * canvas_size, tf.int32) for r in (2, 4, 8))
        return tf.switch_case(branch, [
            lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r,
                                          dct_method="INTEGER_ACCURATE")
            for r in (1, 2, 4, 8)])

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: decode(encoded))


def tf_canvas(image, canvas_size: int) -> dict:
    """One decoded uint8 image [h, w, 3] -> {'image': uint8 [S, S, 3], 'size': int32 [2]}: the
    image in the top-left corner of a zero canvas of side S = canvas_size, and its (h, w) there.

    An image whose longer side exceeds S is first shrunk to fit (aspect kept, the shorter side
    rounded) by area averaging (antialiased; half the CPU of TensorFlow's antialiased bilinear):
    the one resize the host may make, for the photographs above S (ImageNet's are mostly <= 500
    pixels); every view is cut on the device from what this returns."""
    tf = import_tensorflow()
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    longer = tf.maximum(h, w)

    def shrunk():
        scale = canvas_size / tf.cast(longer, tf.float64)
        new_h = tf.maximum(1, tf.cast(tf.round(tf.cast(h, tf.float64) * scale), tf.int32))
        new_w = tf.maximum(1, tf.cast(tf.round(tf.cast(w, tf.float64) * scale), tf.int32))
        size = tf.stack([tf.minimum(new_h, canvas_size), tf.minimum(new_w, canvas_size)])
        return _to_uint8(tf, tf.image.resize(image, size, method="area"))

    image = tf.cond(longer > canvas_size, shrunk, lambda: image)
    shape = tf.shape(image)
    canvas = tf.pad(image, [[0, canvas_size - shape[0]], [0, canvas_size - shape[1]], [0, 0]])
    return {"image": tf.ensure_shape(canvas, (canvas_size, canvas_size, 3)),
            "size": tf.cast(shape[:2], tf.int32)}


def tf_encoded_canvas(encoded, canvas_size: int, decode) -> dict:
    """`tf_canvas` of an encoded image (`tf_decode`): what the host does per image."""
    return tf_canvas(tf_decode(encoded, decode, canvas_size), canvas_size)


def _epoch_key(seed: int, epoch: int, process_index: int) -> int:
    """A 31-bit seed for one process's epoch (file order, shuffle buffer, view randomness)."""
    state = np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF)


# Features that name an image in TFDS datasets (imagenet2012: 'file_name'), for the warnings.
NAME_KEYS = ("file_name", "filename", "image/filename", "id")


def record_canvases(ds, features, canvas_size: int, image_key: str, label_key: str):
    """TFDS records (image undecoded) -> one canvas dict per record, in order (`tf_canvas` +
    'label' + 'readable' bool + 'name' string). A record whose image cannot be decoded (a
    truncated or corrupt file) becomes a zero canvas of true size 1x1 with 'readable' False
    and its name, instead of stopping tf.data: the batches keep their boundaries, so a resumed
    run is the same run, and the host replaces it (`UnreadableImages`)."""
    tf = import_tensorflow()
    image_feature = features[image_key]
    name_key = next((k for k in NAME_KEYS if k in features), None)

    def fields(example, readable):
        out = {"readable": tf.constant(readable),
               "name": tf.strings.as_string(example[name_key]) if name_key else tf.constant("")}
        if label_key in example:
            out["label"] = tf.cast(example[label_key], tf.int32)
        return out

    def decoded(example):
        out = tf_encoded_canvas(example[image_key], canvas_size, image_feature.decode_example)
        return {**out, **fields(example, True)}

    def unreadable(example):
        return {"image": tf.zeros((canvas_size, canvas_size, 3), tf.uint8),
                "size": tf.ones((2,), tf.int32), **fields(example, False)}

    return guarded_records(ds, decoded, unreadable)


def guarded_records(ds, decoded, stand_in):
    """One element per record of `ds`, in order: `decoded(record)`, or `stand_in(record)` where
    decoding fails (a truncated or corrupt image: TensorFlow's error is dropped with that one
    record's dataset), instead of stopping tf.data. Each record is tried in a one-element
    dataset (~0.3 ms of host CPU per image), so an error is never taken for the next record's."""
    tf = import_tensorflow()

    def one(example):
        single = tf.data.Dataset.from_tensors(example)
        return single.map(decoded).ignore_errors().concatenate(single.map(stand_in)).take(1)

    return ds.interleave(one, cycle_length=16, block_length=1,
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def numpy_batches(ds, what: str, data_dir: str) -> Iterator:
    """`ds.as_numpy_iterator()`, with a damaged record file of a prepared TFDS dataset
    (TensorFlow's DataLossError: a record's length or checksum is wrong, e.g. a file cut short
    by a full disk or altered on copy) raised as InputError naming the dataset `what` and its
    directory `data_dir`, instead of a TensorFlow traceback. Nothing of it can be skipped: the
    bytes of the following records are unknown."""
    tf = import_tensorflow()
    try:
        yield from ds.as_numpy_iterator()
    except tf.errors.DataLossError as e:
        # "{{function_node ...}} corrupted record at 4659 [Op:IteratorGetNext] name: "
        detail = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\]|\bname:\s*$", "",
                        e.message).strip()
        raise InputError(f"{what}: a record file of the prepared dataset is damaged ({detail}); "
                         f"its files in {data_dir} were cut short or altered. Prepare the "
                         "dataset again (tfds build) or restore its files from a copy.") from None


class UnreadableImages:
    """Host check of streamed batches (`record_canvases`): each image that could not be decoded
    is named in one warning (once per name) and replaced in its batch by a copy of the nearest
    readable example of the same batch (image, size, label), so a few broken files in a large
    dataset cost nothing; InputError naming config.data.max_unreadable_fraction when more than
    that share of the images read so far were unreadable (checked once 1,000 were read, or at
    once when a whole batch is).

    counts: {'read': int, 'unreadable': int}, the images read and found unreadable so far, kept
    up to date in place: a training run saves it with each checkpoint and hands it back on
    resume, so that restarting does not reset the share (and a run cannot train past the limit
    by being restarted). None: a count of its own, from zero."""

    def __init__(self, what: str, max_fraction: float, counts: dict | None = None):
        self.what, self.max_fraction, self.named = what, float(max_fraction), set()
        self.counts = {"read": 0, "unreadable": 0} if counts is None else counts
        self.counts.setdefault("read", 0)
        self.counts.setdefault("unreadable", 0)

    def __call__(self, batch: dict) -> dict:
        readable, names = batch.pop("readable"), batch.pop("name")
        self.counts["read"] += len(readable)
        broken = np.flatnonzero(~readable)
        if not len(broken):
            return batch
        self.counts["unreadable"] += len(broken)
        seen, bad = self.counts["read"], self.counts["unreadable"]
        new = [n.decode("utf-8", "replace") or "an image (the dataset names none)"
               for n in names[broken]]
        new = [n for n in new if n not in self.named or n.startswith("an image")]
        self.named.update(new)
        share = (f"{bad} of the {seen} images read so far (at most "
                 f"{self.max_fraction:.1%} may be skipped, config.data.max_unreadable_fraction)")
        if len(broken) == len(readable) or (bad > self.max_fraction * seen and seen >= 1000):
            raise UnreadableImageError(f"{self.what}: images cannot be decoded: {share}; e.g. "
                                       f"{', '.join(new[:5]) or 'see the warnings above'}.")
        if new:
            warnings.warn(f"{self.what}: cannot decode {', '.join(new)} ({share}); replaced in "
                          "its batch by another image of the batch.", UnreadableImagesWarning,
                          stacklevel=2)
        good = np.flatnonzero(readable)
        batch = {key: value.copy() for key, value in batch.items()}  # tf.data's are read-only
        for i in broken:  # the nearest readable row before it, else after it
            before = good[good < i]
            source = before[-1] if len(before) else good[0]
            for key in ("image", "size", "label"):
                if key in batch:
                    batch[key][i] = batch[key][source]
        return batch


def _epoch_canvases(builder, split, *, epoch_key, take, skip, local_batch, canvas_size,
                    shuffle_buffer, image_key, label_key, prefetch, options=None):
    """One process's batches of one epoch, from example `skip` on."""
    import_tensorflow()
    import tensorflow_datasets as tfds
    features = builder.info.features
    # Decode after skip/shuffle: resuming mid-epoch then reads records without decoding them.
    ds = builder.as_dataset(split=split, shuffle_files=True,
                            decoders={image_key: tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(shuffle_seed=epoch_key))
    ds = ds.shuffle(shuffle_buffer, seed=epoch_key, reshuffle_each_iteration=False)
    ds = ds.take(take).skip(skip)
    ds = record_canvases(ds, features, canvas_size, image_key, label_key)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(prefetch)
    # Options (e.g. a private threadpool) apply to the whole pipeline, file reads included.
    return ds if options is None else ds.with_options(options)


def tfds_canvases(builder, split: str, *, global_batch: int, seed: int, canvas_size: int,
                  start_step: int = 0, process_index: int | None = None,
                     process_count: int | None = None, num_examples: int | None = None,
                     shuffle_buffer: int = 16_384, image_key: str = "image",
                     label_key: str = "label", prefetch: int = 2, options=None,
                  max_unreadable_fraction: float = 0.05, unreadable_counts: dict | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless numpy batches of canvases for this process, from global step `start_step` on:
    {'image': uint8 [L, S, S, 3], 'size': int32 [L, 2]} (`tf_canvas`, S = canvas_size), plus
    'label' int32 [L] when the dataset has labels; L = global_batch // process_count.

    Process p reads shard p of `tfds.even_splits(split, process_count)`; epoch e is shuffled with
    a seed from (seed, e, p); every process takes num_examples // global_batch steps per epoch;
    resuming skips the first (start_step mod steps_per_epoch) batches of the current epoch.
    `num_examples` (the whole split) is used only when the builder knows no split sizes
    (tfds.testing.mock_data, where every process also sees the same mock examples).
    `options`: a `tf.data.Options` applied to each epoch's pipeline (e.g. threading limits for
    scripts/benchmark.py --pipeline); None leaves tf.data's defaults. An image that cannot be
    decoded is named in a warning and replaced by another image of its batch, up to
    `max_unreadable_fraction` of the images (`UnreadableImages`; `unreadable_counts`: its
    counts, carried over from a checkpoint and kept up to date in place).
    """
    import tensorflow_datasets as tfds
    process_index, process_count = process_info(process_index, process_count)
    local = local_batch_size(global_batch, process_count)
    if builder.info.splits:  # the prepared dataset's own count is authoritative
        num_examples = builder.info.splits[split].num_examples
    elif num_examples is None:
        raise InputError(f"num_examples: {builder.name} reports no split sizes (mock data?); "
                         f"pass config.data.num_examples.")
    epoch_steps = steps_per_epoch(num_examples, global_batch)
    # drop_remainder: equal shards, so each holds >= epoch_steps * local examples.
    shard = tfds.even_splits(split, process_count, drop_remainder=True)[process_index]
    check = UnreadableImages(f"{builder.name} split {split!r}", max_unreadable_fraction,
                             unreadable_counts)
    step = int(start_step)
    while True:
        epoch, step_in_epoch = divmod(step, epoch_steps)
        batches = _epoch_canvases(
            builder, shard, epoch_key=_epoch_key(seed, epoch, process_index),
            take=epoch_steps * local, skip=step_in_epoch * local, local_batch=local,
            canvas_size=canvas_size, shuffle_buffer=shuffle_buffer, image_key=image_key,
            label_key=label_key, prefetch=prefetch, options=options)
        yield from map(check, numpy_batches(batches, f"{builder.name} split {split!r}",
                                            builder.data_dir))
        step = (epoch + 1) * epoch_steps


# ------------------------------------------------------------------------------------------------
# TFDS: a labelled subset of a split (semi-supervised fine-tuning on 1% / 10% of ImageNet),
# selected by position in the split's stored order and streamed, never held in memory.


def tfds_feature_values(builder, split: str, key: str) -> np.ndarray:
    """Every example's `key` feature (e.g. 'file_name', 'label') of `split`, in the split's stored
    order (no file shuffling), read without decoding any other feature (tfds PartialDecoding).
    Strings come back as str (numpy object array). One pass over the split's records."""
    tf = import_tensorflow()
    import tensorflow_datasets as tfds
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders=tfds.decode.PartialDecoding({key: True}))
    ds = ds.map(lambda example: example[key], num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).batch(4096).prefetch(2)
    values = [np.asarray(batch) for batch in numpy_batches(ds, f"{builder.name} split {split!r}",
                                                               builder.data_dir)]
    values = np.concatenate(values) if values else np.zeros(0)
    if values.dtype.kind in "SO":  # tf.string -> bytes
        values = np.asarray([v.decode("utf-8") for v in values], dtype=object)
    return values


def subset_records(builder, split, keep, image_key: str = "image", cache_file=None):
    """The records of `split` at the positions where `keep` (bool [N], stored order) is True,
    image undecoded, in stored order; with `cache_file`, read from that tf.data cache, which is
    filled here by one whole pass the first time."""
    tf = import_tensorflow()
    import tensorflow_datasets as tfds
    keep = tf.constant(keep)
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.enumerate().filter(lambda i, example: tf.gather(keep, i))
    ds = ds.map(lambda i, example: example)
    if not cache_file:
        return ds
    ds = ds.cache(cache_file)
    if not tf.io.gfile.exists(cache_file + ".index"):
        if tf.io.gfile.exists(cache_file + ".lockfile"):  # left by a killed run of this workdir
            tf.io.gfile.remove(cache_file + ".lockfile")
        for _ in ds:  # a whole pass: tf.data finalises a cache only at the end of its input
            pass
    return ds


def _subset_epoch_canvases(builder, split, keep, *, epoch_key, count, local_batch, skip,
                           process_index, process_count, canvas_size, shuffle_buffer, image_key,
                           label_key, prefetch, options, cache_file):
    """One process's batches of one epoch of the subset `keep` (bool [N] by stored position)."""
    ds = subset_records(builder, split, keep, image_key, cache_file)
    # The same shuffle on every process (the key has no process in it), then every P-th example:
    # the processes' shards of an epoch are disjoint and together the whole subset.
    ds = ds.shuffle(max(1, min(shuffle_buffer, count)), seed=epoch_key,
                    reshuffle_each_iteration=False)
    ds = ds.shard(process_count, process_index).take(count // process_count).skip(skip)
    ds = record_canvases(ds, builder.info.features, canvas_size, image_key, label_key)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(prefetch)
    return ds if options is None else ds.with_options(options)


def tfds_subset_canvases(builder, split: str, positions, *, global_batch: int, seed: int,
                         canvas_size: int, start_step: int = 0, num_examples: int | None = None,
                         process_index: int | None = None, process_count: int | None = None,
                         shuffle_buffer: int = 16_384, image_key: str = "image",
                         label_key: str = "label", prefetch: int = 2, options=None,
                         cache_dir: str | None = None, max_unreadable_fraction: float = 0.05,
                         unreadable_counts: dict | None = None
                         ) -> Iterator[dict[str, np.ndarray]]:
    """Endless numpy batches of canvases (`tfds_canvases`' batches) of the examples at
    `positions` (int, into `split`'s stored order, e.g. from `tfds_feature_values` + a subset
    file) for this process, from `start_step`.

    Each epoch streams the split's records once, keeps the subset (undecoded), shuffles it with a
    seed from (seed, epoch) (a buffer of min(shuffle_buffer, subset) records), gives process p
    every P-th example, and decodes the kept ones only into canvases: each batch is a function
    of (seed, step). Batches as `tfds_canvases`' with 'label'; subset // global_batch steps per
    epoch (the remainder is dropped). ValueError for a position outside the split or a subset
    smaller than one global batch. Only the subset's shuffle buffer is held in memory.

    `cache_dir`: the subset's records (encoded images, as stored) are written once to a tf.data
    cache file there, named by the dataset, split, subset and process, and every epoch reads
    that file instead of the whole split (1% of ImageNet: ~1.4 GB of JPEGs; 10%: ~14 GB).
    `unreadable_counts`: as `tfds_canvases`'.
    """
    process_index, process_count = process_info(process_index, process_count)
    local = local_batch_size(global_batch, process_count)
    if builder.info.splits:
        num_examples = builder.info.splits[split].num_examples
    positions = np.unique(np.asarray(positions, np.int64))
    if num_examples is None or (positions.size and not
                                0 <= positions[0] <= positions[-1] < num_examples):
        raise ValueError(f"positions must lie in [0, {num_examples}) (the examples of {split}).")
    keep = np.zeros(num_examples, bool)
    keep[positions] = True
    epoch_steps = steps_per_epoch(len(positions), global_batch)
    cache_file = None
    if cache_dir:
        digest = hashlib.sha1(positions.tobytes() + str(num_examples).encode()).hexdigest()[:16]
        name = f"{builder.name}-{builder.info.version}-{split}"
        cache_file = os.path.join(cache_dir, f"subset-{name}-{digest}-p{process_index}")
        import_tensorflow().io.gfile.makedirs(cache_dir)
    check = UnreadableImages(f"{builder.name} split {split!r}", max_unreadable_fraction,
                             unreadable_counts)
    step = int(start_step)
    while True:
        epoch, step_in_epoch = divmod(step, epoch_steps)
        batches = _subset_epoch_canvases(
            builder, split, keep, epoch_key=_epoch_key(seed, epoch, 0),
            count=epoch_steps * global_batch, local_batch=local, skip=step_in_epoch * local,
            process_index=process_index, process_count=process_count, canvas_size=canvas_size,
            shuffle_buffer=shuffle_buffer, image_key=image_key, label_key=label_key,
            prefetch=prefetch, options=options, cache_file=cache_file)
        yield from map(check, numpy_batches(batches, f"{builder.name} split {split!r}",
                                            builder.data_dir))
        step = (epoch + 1) * epoch_steps
