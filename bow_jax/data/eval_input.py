"""Host-side evaluation input: any split of any source, read once in fixed-size batches, each
process its own contiguous shard, with the evaluation transform applied on the host.

Sources: in-memory arrays (`ArraysInput`: npz, JPEG npz, digits, already of the network's size,
no transform), image folders (`ImageFolderInput`: files decoded one batch at a time with Pillow)
and TFDS (`TfdsInput`: tf.data over the slice `split[start:stop]`, decoded and transformed in
tf.data). Only one batch of images per process is alive at a time, so a split never has to fit in
host memory.

Transforms (`Transform`): 'none'; 'shorter_crop' (`datasets.resize_shorter_center_crop`, what
`load_image_folder` applies, so streamed and in-memory image folders agree); 'resize_center_crop'
(torchvision `Resize(resize_shorter)` + `CenterCrop(crop)`, the ImageNet evaluation transform
256 -> 224 of OBoW github.com/valeoai/obow and of the torchvision reference scripts);
'resize_whole' (`Resize(resize_shorter)` then the whole image resized to crop x crop, no crop: the
VOC07 SVM benchmark's 256 -> 224x224 of Goyal et al. 2019, fair_self_supervision_benchmark).

Labels: one int32 class per image, or, for a multi-label TFDS dataset (features 'labels' and
'labels_no_difficult', sequences of class ids, as TFDS `voc/2007`), int8 targets [C] per image:
1 = a non-difficult instance of the class, -1 = only difficult instances, 0 = absent
(`multilabel_targets`). Rows of padding or undecodable images carry -1 (single label) or
`MISSING_TARGET` in every column (multi-label); `valid_rows` tells them apart.

Sharding (`local_batches`): process p of P reads examples [p·N//P, (p+1)·N//P) and every process
yields the same number of batches, ceil(ceil(N/P) / local_batch), padding with zero images whose
index is -1, so a multi-host pass never waits on a process that has run out of data.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import warnings
from typing import Iterator

import numpy as np

from bow_jax.data import datasets, pipeline
from bow_jax.lib.errors import InputError

# torchvision's ImageNet evaluation: Resize(256) then CenterCrop(224).
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224
TRANSFORMS = ("none", "shorter_crop", "resize_center_crop", "resize_whole")
# The int8 target of every class of a padding row or an undecodable image (multi-label data).
MISSING_TARGET = -128


@dataclasses.dataclass(frozen=True)
class Transform:
    """The host's evaluation transform of one decoded image; `kind` in `TRANSFORMS`, sizes in
    pixels (0 where unused)."""
    kind: str = "none"
    resize_shorter: int = 0
    crop: int = 0

    def describe(self) -> str:
        return {"none": "none", "shorter_crop": f"shorter_crop({self.crop})",
                "resize_center_crop": f"resize({self.resize_shorter})+center_crop({self.crop})",
                "resize_whole": f"resize({self.resize_shorter})+resize({self.crop}x{self.crop})"
                }[self.kind]

    def output_shape(self, source_shape) -> tuple[int, int, int]:
        """[H, W, 3] of transformed images; ValueError when it varies (no transform and images of
        several sizes)."""
        if self.kind != "none":
            return (self.crop, self.crop, 3)
        shape = tuple(source_shape)
        if None in shape or len(shape) != 3:
            raise InputError(f"images of several sizes ({shape}) need an evaluation transform: "
                             f"set config.eval.image_size (e.g. {IMAGENET_CROP}).")
        return shape

    def pil(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H,W,3] -> uint8 [crop,crop,3] with Pillow (bilinear)."""
        if self.kind == "none":
            return image
        if self.kind == "shorter_crop":
            return datasets.resize_shorter_center_crop(image, self.crop)
        if self.kind == "resize_whole":
            return pil_resize_whole(image, self.resize_shorter, self.crop)
        return torchvision_resize_center_crop(image, self.resize_shorter, self.crop)

    def tf(self, image):
        """The same transform on a uint8 [H,W,3] tf.Tensor (antialiased bilinear)."""
        if self.kind == "none":
            return image
        if self.kind == "resize_whole":
            return tf_resize_whole(image, self.resize_shorter, self.crop)
        return pipeline.tf_center_crop_resize(image, self.resize_shorter or self.crop, self.crop)


def _shorter_to(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision Resize(size)'s output (height, width): the shorter side `size`, the longer
    int(size · long / short)."""
    new_long = int(size * max(h, w) / min(h, w))
    return (size, new_long) if h <= w else (new_long, size)


def pil_resize_whole(image: np.ndarray, resize_shorter: int, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [size,size,3]: torchvision Resize(resize_shorter), then the whole
    image resized to size x size (aspect not kept, nothing cut), Pillow bilinear both times."""
    from PIL import Image
    new_h, new_w = _shorter_to(*image.shape[:2], resize_shorter)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized.resize((size, size), Image.Resampling.BILINEAR))


def tf_resize_whole(image, resize_shorter: int, size: int):
    """`pil_resize_whole` on a uint8 [H,W,3] tf.Tensor (antialiased bilinear, `tf_resize`)."""
    tf = pipeline.import_tensorflow()
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    new_long = tf.cast(tf.cast(resize_shorter * tf.maximum(h, w), tf.float64)
                       / tf.cast(tf.minimum(h, w), tf.float64), tf.int32)
    resized = pipeline.tf_resize(image, tf.where(h <= w, resize_shorter, new_long),
                                 tf.where(h <= w, new_long, resize_shorter))
    return pipeline.tf_resize(resized, size, size)


def torchvision_resize_center_crop(image: np.ndarray, resize_shorter: int,
                                   crop: int) -> np.ndarray:
    """torchvision Resize(resize_shorter) + CenterCrop(crop) with Pillow bilinear: the longer side
    becomes int(resize_shorter · long / short), the crop's corner int(round((size - crop) / 2))."""
    from PIL import Image
    h, w = image.shape[:2]
    new_h, new_w = _shorter_to(h, w, resize_shorter)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                       Image.Resampling.BILINEAR))
    top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
    return resized[top:top + crop, left:left + crop]


@dataclasses.dataclass
class EvalInput:
    """A split to evaluate: `num_examples` examples (after limits) of images `image_shape`
    (uint8, after `transform`), labels in [0, num_classes) (or multi-label targets, see
    `label_shape`). Subclasses read examples [start, stop) in order, `batch` at a time (`read`)."""
    name: str
    split: str
    num_examples: int
    num_classes: int
    transform: Transform

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def label_shape(self) -> tuple:
        """() for one int32 class id per image; (num_classes,) for multi-label int8 targets in
        {-1, 0, 1} (see the module docstring)."""
        return ()

    def read(self, start: int, stop: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images uint8 [b,H,W,3], labels int32 [b] or int8 [b, C]) with b <= batch; an image
        that cannot be decoded comes as zeros with label -1 (dropped by the consumer)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies the images this input yields (for the feature cache's key)."""
        out = {"source": type(self).__name__, "name": self.name, "split": self.split,
               "num_examples": self.num_examples, "transform": self.transform.describe()}
        if self.label_shape:  # single-label keys stay as they were
            out["labels"] = f"multilabel{list(self.label_shape)}"
        return out

    def __len__(self) -> int:
        return self.num_examples


@dataclasses.dataclass
class ArraysInput(EvalInput):
    """An `ArrayDataset` (first `num_examples` examples), sliced by index; no transform."""
    data: datasets.ArrayDataset = None

    @property
    def image_shape(self):
        return self.data.image_shape

    def read(self, start, stop, batch):
        for i in range(start, stop, batch):
            j = min(i + batch, stop)
            yield self.data.images[i:j], self.data.labels[i:j]


@dataclasses.dataclass
class ImageFolderInput(EvalInput):
    """The files of an `ImageFolderListing`, decoded by Pillow (`datasets.decode_image`) a batch
    at a time on `workers` threads (Pillow releases the GIL while decoding)."""
    listing: datasets.ImageFolderListing = None
    workers: int = 8

    @property
    def image_shape(self):
        return (self.transform.crop, self.transform.crop, 3)

    def _load(self, i: int):
        path = self.listing.paths[i]
        try:
            return self.transform.pil(datasets.decode_image(path.read_bytes(), str(path))), None
        except datasets.UnreadableImageError as e:
            return np.zeros(self.image_shape, np.uint8), str(e)

    def read(self, start, stop, batch):
        failed = []
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            for i in range(start, stop, batch):
                indices = range(i, min(i + batch, stop))
                loaded = list(pool.map(self._load, indices))
                labels = self.listing.labels[indices.start:indices.stop].copy()
                for row, (_, error) in enumerate(loaded):
                    if error is not None:
                        labels[row] = -1
                        failed.append(error)
                yield np.stack([image for image, _ in loaded]), labels
        if failed:
            warnings.warn(f"{self.listing.root}: {len(failed)} images cannot be decoded and are "
                          f"left out of the evaluation:\n  " + "\n  ".join(failed[:10]),
                          datasets.UnreadableImagesWarning, stacklevel=2)


def multilabel_classes(features) -> int:
    """The class count of a multi-label TFDS dataset (a 'labels' sequence of ClassLabel and no
    'label' feature, as `voc/2007`), else 0 (single label)."""
    if "label" in features or "labels" not in features:
        return 0
    return int(getattr(getattr(features["labels"], "feature", None), "num_classes", 0) or 0)


def tf_multilabel_targets(example, num_classes: int):
    """int8 [num_classes] targets of one TFDS example: 1 where a class id is in
    'labels_no_difficult' (all of 'labels' when that feature is absent), -1 where it is only in
    'labels' (difficult instances only), 0 elsewhere."""
    tf = pipeline.import_tensorflow()

    def present(ids):
        return tf.math.bincount(tf.cast(ids, tf.int32), minlength=num_classes,
                                maxlength=num_classes) > 0
    any_ = present(example["labels"])
    clean = present(example["labels_no_difficult"]) if "labels_no_difficult" in example else any_
    return tf.where(clean, tf.constant(1, tf.int8), tf.where(any_, tf.constant(-1, tf.int8),
                                                             tf.constant(0, tf.int8)))


def tfds_slice(split: str, start: int, stop: int, sizes=None) -> str:
    """The TFDS split string of examples [start, stop) of `split`; a concatenation 'a+b' (read
    a, then b) is cut part by part, `sizes` giving {part: number of examples}."""
    if "+" not in split:
        return f"{split}[{start}:{stop}]"
    out, offset = [], 0
    for part in split.split("+"):
        lo, hi = max(start - offset, 0), min(stop - offset, sizes[part])
        if lo < hi:
            out.append(f"{part}[{lo}:{hi}]")
        offset += sizes[part]
    return "+".join(out)


@dataclasses.dataclass
class TfdsInput(EvalInput):
    """A `TfdsSource` split, read as `split[start:stop]` in the dataset's fixed order (no file
    shuffling), decoded and transformed by tf.data on the host. A split 'a+b' (e.g. VOC07's
    'train+validation' = trainval) reads a's examples, then b's. Multi-label datasets
    (`multilabel_classes`) yield int8 targets [C] per image (`tf_multilabel_targets`)."""
    source: datasets.TfdsSource = None

    @property
    def image_shape(self):
        return self.transform.output_shape(self.source.builder.info.features["image"].shape)

    @property
    def label_shape(self):
        classes = multilabel_classes(self.source.builder.info.features)
        return (classes,) if classes else ()

    def _labels(self, example):
        tf = pipeline.import_tensorflow()
        if self.label_shape:
            return tf_multilabel_targets(example, self.label_shape[0])
        return tf.cast(example.get("label", -1), tf.int32)

    def read(self, start, stop, batch):
        """Batches of `EvalInput.read`: an image that cannot be decoded comes as zeros with a
        missing label (dropped by the consumer, up to max_unreadable_fraction) and is named in
        one warning at the end, as image folders' are."""
        if stop <= start:
            return
        tf = pipeline.import_tensorflow()
        tfds = datasets.import_tfds()
        builder = self.source.builder
        feature = builder.info.features["image"]
        name_key = next((k for k in pipeline.NAME_KEYS if k in builder.info.features), None)
        sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
        ds = builder.as_dataset(split=tfds_slice(self.source.split, start, stop, sizes),
                                shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
        missing = (tf.fill(self.label_shape, tf.constant(MISSING_TARGET, tf.int8))
                   if self.label_shape else tf.constant(-1, tf.int32))

        def name(example):
            return tf.strings.as_string(example[name_key]) if name_key else tf.constant("")

        def decoded(example):
            image = self.transform.tf(pipeline.tf_decode(example["image"],
                                                         feature.decode_example))
            return image, self._labels(example), tf.constant(True), name(example)

        def stand_in(example):
            return tf.zeros(self.image_shape, tf.uint8), missing, tf.constant(False), name(example)

        ds = pipeline.guarded_records(ds, decoded, stand_in).batch(batch).prefetch(2)
        failed, offset = [], start
        where = f"{self.name} split {self.source.split!r}"
        for images, labels, readable, names in pipeline.numpy_batches(ds, where,
                                                                      builder.data_dir):
            for row in np.flatnonzero(~readable):
                failed.append(names[row].decode("utf-8", "replace") or f"image {offset + row}")
            offset += len(labels)
            yield images, labels
        if failed:
            warnings.warn(f"{where}: {len(failed)} images cannot be decoded and are left out of "
                          "the evaluation:\n  " + "\n  ".join(failed[:10]),
                          datasets.UnreadableImagesWarning, stacklevel=2)


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of process `process_index`'s contiguous shard; sizes differ by at most 1."""
    return process_index * n // process_count, (process_index + 1) * n // process_count


def batches_per_process(n: int, local_batch: int, process_count: int) -> int:
    """How many batches every process runs: enough for the largest shard, ceil(N/P)."""
    return math.ceil(math.ceil(n / process_count) / local_batch)


@dataclasses.dataclass
class LocalBatch:
    """One process's batch: images uint8 [local_batch,H,W,3], labels int32 [local_batch] (or
    int8 [local_batch, C] multi-label targets), and `index` int64 [local_batch], each row's
    position in the split (-1: padding)."""
    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray


def missing_labels(count: int, label_shape: tuple = ()) -> np.ndarray:
    """Labels of `count` padding rows: int32 -1 [count], or int8 `MISSING_TARGET`
    [count, *label_shape] for multi-label targets."""
    if label_shape:
        return np.full((count,) + tuple(label_shape), MISSING_TARGET, np.int8)
    return np.full(count, -1, np.int32)


def valid_rows(labels: np.ndarray) -> np.ndarray:
    """bool [N]: the rows of real, decoded images (not padding nor undecodable), by their
    labels (int32 [N] >= 0, or int8 [N, C] without `MISSING_TARGET`)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels >= 0
    return (labels != MISSING_TARGET).all(axis=1)


def _padded(images, labels, start, local_batch, shape, label_shape=()) -> LocalBatch:
    count = len(labels)
    out = np.zeros((local_batch,) + tuple(shape), np.uint8)
    out[:count] = images
    label_out = missing_labels(local_batch, label_shape)
    label_out[:count] = labels
    index = np.full(local_batch, -1, np.int64)
    index[:count] = np.arange(start, start + count)
    return LocalBatch(out, label_out, index)


def local_batches(inp: EvalInput, local_batch: int, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[LocalBatch]:
    """This process's `batches_per_process` batches of its shard of `inp`, the last ones padded
    (and wholly empty where this shard is shorter than the longest)."""
    process_index, process_count = pipeline.process_info(process_index, process_count)
    start, stop = shard_bounds(inp.num_examples, process_index, process_count)
    shape, label_shape = inp.image_shape, inp.label_shape
    done, position = 0, start
    for images, labels in inp.read(start, stop, local_batch):
        yield _padded(images, labels, position, local_batch, shape, label_shape)
        position += len(labels)
        done += 1
    if position != stop:
        raise InputError(f"{inp.name} split {inp.split!r}: read {position - start} examples of "
                         f"its shard [{start}, {stop}); the source holds fewer than "
                         f"{inp.num_examples} (config.data.num_examples?).")
    for _ in range(batches_per_process(inp.num_examples, local_batch, process_count) - done):
        yield _padded(np.zeros((0,) + tuple(shape), np.uint8), missing_labels(0, label_shape),
                      stop, local_batch, shape, label_shape)


# ------------------------------------------------------------------------------------------------
# The evaluation input of a config's split.


def _field(section, name: str, default=None):
    value = getattr(section, name, default)
    return default if value is None else value


# config.eval.transform's values with config.eval.image_size > 0 ('' = 'resize_center_crop').
SIZED_TRANSFORMS = ("resize_center_crop", "resize_whole")


def _transform_kind(eval_config, crop: int) -> str:
    """config.eval.transform checked: '' or one of `SIZED_TRANSFORMS` (which need image_size)."""
    kind = str(_field(eval_config, "transform", ""))
    if kind and kind not in SIZED_TRANSFORMS:
        raise InputError(f"config.eval.transform={kind!r}; expected '' (automatic) or one of "
                         f"{SIZED_TRANSFORMS}.")
    if kind and not crop:
        raise InputError(f"config.eval.transform={kind!r} needs config.eval.image_size > 0 "
                         f"(e.g. {IMAGENET_CROP}).")
    return kind or "resize_center_crop"


def eval_transform(eval_config, source_varies: bool, default: Transform) -> Transform:
    """config.eval.image_size (> 0): torchvision Resize(config.eval.resize_shorter, default
    round(image_size·256/224)) then, by config.eval.transform, CenterCrop(image_size)
    ('resize_center_crop', the default) or the whole image resized to image_size² ('resize_whole',
    VOC07's SVM benchmark). Otherwise `default`, unless the source's images vary in size: then
    ImageNet's Resize(256) + CenterCrop(224). InputError naming the field on a bad value."""
    crop = int(_field(eval_config, "image_size", 0))
    resize = int(_field(eval_config, "resize_shorter", 0))
    if crop < 0 or resize < 0:
        raise InputError(f"config.eval.image_size={crop}, config.eval.resize_shorter={resize}; "
                         f"expected sizes >= 0 (0: automatic).")
    kind = _transform_kind(eval_config, crop)
    if crop:
        resize = resize or round(crop * IMAGENET_RESIZE / IMAGENET_CROP)
        if resize < crop:
            raise InputError(f"config.eval.resize_shorter={resize} is smaller than "
                             f"config.eval.image_size={crop}; the centre crop needs it >= crop.")
        return Transform(kind, resize, crop)
    if source_varies:
        return Transform("resize_center_crop", IMAGENET_RESIZE, IMAGENET_CROP)
    return default


def _limited(count: int, limit: int) -> int:
    return min(int(limit), count) if limit else count


def evaluation_data(config):
    """The data section the evaluation reads (features of both splits, the checks before
    training): config.eval.data when its `source` is set (e.g. Places205 for an ImageNet-trained
    network), else config.data. The one place that decides."""
    other = getattr(config.eval, "data", None)
    return other if other is not None and _field(other, "source", "") else config.data


def evaluation_data_field(config) -> str:
    """'config.eval.data' or 'config.data': the name of `evaluation_data(config)`, for messages."""
    return "config.data" if evaluation_data(config) is config.data else "config.eval.data"


def split_limit(config, split: str) -> int:
    """How many first examples of `split` the evaluation reads (0 = all): the evaluation data's
    `limit` (`evaluation_data`) then config.eval.train_limit for 'train' (the smaller that is
    set), config.eval.test_limit for 'test'."""
    if split != "train":
        return int(_field(config.eval, "test_limit", 0))
    limits = [int(_field(evaluation_data(config), "limit", 0)),
              int(_field(config.eval, "train_limit", 0))]
    limits = [x for x in limits if x]
    return min(limits) if limits else 0


def evaluation_input(config, split: str, in_memory_data=None) -> EvalInput:
    """`split` ('train' | 'test') of the evaluation data (`evaluation_data`: config.eval.data
    when set, else config.data) as the evaluation reads it, cut to `split_limit`.
    `in_memory_data`: an `ArrayDataset` of that split already loaded (used as is, then cut).
    TFDS splits are always streamed, whatever `in_memory` says; image folders are listed, not
    decoded; other sources are loaded into memory (they are small)."""
    data_config = evaluation_data(config)
    source, limit = _field(data_config, "source"), split_limit(config, split)
    if in_memory_data is not None or source not in ("tfds", "image_folder"):
        data = in_memory_data if in_memory_data is not None else datasets.load_dataset(
            data_config, split)
        count = _limited(len(data), limit)
        return ArraysInput(data.name, split, count, data.num_classes, Transform(), data=data)
    if source == "image_folder":
        listing = datasets.image_folder_split(data_config, split)
        size = int(_field(data_config, "image_size", 0))
        if not size:
            raise InputError("config.data.image_size must be set for source 'image_folder'.")
        transform = eval_transform(config.eval, False, Transform("shorter_crop", size, size))
        return ImageFolderInput(str(listing.root), split, _limited(len(listing), limit),
                                len(listing.classes), transform, listing=listing,
                                workers=min(8, os.cpu_count() or 1))
    data = tfds_eval_source(config, split)
    features = data.builder.info.features
    varies = None in tuple(features["image"].shape)
    return TfdsInput(data.name, data.split, _limited(len(data), limit),
                     data.num_classes or multilabel_classes(features),
                     eval_transform(config.eval, varies, Transform()), source=data)


def tfds_eval_source(config, split: str) -> datasets.TfdsSource:
    """The TFDS source of the evaluation's `split` ('train' | 'test'): config.eval.train_split /
    test_split when set (TFDS split names; 'a+b' reads a then b, e.g. VOC07's trainval
    'train+validation'), else `datasets.load_dataset`'s ('test': the dataset's evaluation split).
    InputError naming the field when a part is not a split of the dataset."""
    data_config = evaluation_data(config)
    field, tfds_split = f"config.eval.{split}_split", str(_field(config.eval, f"{split}_split", ""))
    if not tfds_split:
        return datasets.load_dataset(data_config, split)
    name = _field(data_config, "name", "")
    if not name:
        raise InputError(f"{evaluation_data_field(config)}.name must name a TFDS dataset.")
    builder = datasets.tfds_builder(name, _field(data_config, "data_dir", ""),
                                    _field(data_config, "manual_dir", None))
    splits, parts = builder.info.splits, tfds_split.split("+")
    missing = [p for p in parts if p not in splits]
    if missing:
        raise InputError(f"{field}={tfds_split!r}: {name} has no split {missing}; its splits: "
                         f"{sorted(splits)}.")
    count = sum(splits[p].num_examples for p in parts)
    label = builder.info.features["label"] if "label" in builder.info.features else None
    return datasets.with_canvas(datasets.TfdsSource(
        builder, tfds_split, int(count), int(getattr(label, "num_classes", 0) or 0), name),
        data_config)
