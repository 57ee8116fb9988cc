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
256 -> 224 of OBoW github.com/valeoai/obow and of the torchvision reference scripts).

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


@dataclasses.dataclass(frozen=True)
class Transform:
    """The host's evaluation transform of one decoded image; `kind` in ('none', 'shorter_crop',
    'resize_center_crop'), sizes in pixels (0 where unused)."""
    kind: str = "none"
    resize_shorter: int = 0
    crop: int = 0

    def describe(self) -> str:
        return {"none": "none", "shorter_crop": f"shorter_crop({self.crop})",
                "resize_center_crop": f"resize({self.resize_shorter})+center_crop({self.crop})"
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
        return torchvision_resize_center_crop(image, self.resize_shorter, self.crop)

    def tf(self, image):
        """The same transform on a uint8 [H,W,3] tf.Tensor (antialiased bilinear)."""
        if self.kind == "none":
            return image
        return pipeline.tf_center_crop_resize(image, self.resize_shorter or self.crop, self.crop)


def torchvision_resize_center_crop(image: np.ndarray, resize_shorter: int,
                                   crop: int) -> np.ndarray:
    """torchvision Resize(resize_shorter) + CenterCrop(crop) with Pillow bilinear: the longer side
    becomes int(resize_shorter · long / short), the crop's corner int(round((size - crop) / 2))."""
    from PIL import Image
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(resize_shorter * long / short)
    new_h, new_w = (resize_shorter, new_long) if h <= w else (new_long, resize_shorter)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                       Image.Resampling.BILINEAR))
    top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
    return resized[top:top + crop, left:left + crop]


@dataclasses.dataclass
class EvalInput:
    """A split to evaluate: `num_examples` examples (after limits) of images `image_shape`
    (uint8, after `transform`), labels in [0, num_classes). Subclasses read examples
    [start, stop) in order, `batch` at a time (`read`)."""
    name: str
    split: str
    num_examples: int
    num_classes: int
    transform: Transform

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def read(self, start: int, stop: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images uint8 [b,H,W,3], labels int32 [b]) with b <= batch; an image that cannot be
        decoded comes as zeros with label -1 (dropped by the consumer)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies the images this input yields (for the feature cache's key)."""
        return {"source": type(self).__name__, "name": self.name, "split": self.split,
                "num_examples": self.num_examples, "transform": self.transform.describe()}

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


@dataclasses.dataclass
class TfdsInput(EvalInput):
    """A `TfdsSource` split, read as `split[start:stop]` in the dataset's fixed order (no file
    shuffling), decoded and transformed by tf.data on the host."""
    source: datasets.TfdsSource = None

    @property
    def image_shape(self):
        return self.transform.output_shape(self.source.builder.info.features["image"].shape)

    def read(self, start, stop, batch):
        if stop <= start:
            return
        tf = pipeline.import_tensorflow()
        tfds = datasets.import_tfds()
        feature = self.source.builder.info.features["image"]
        ds = self.source.builder.as_dataset(split=f"{self.source.split}[{start}:{stop}]",
                                            shuffle_files=False,
                                            decoders={"image": tfds.decode.SkipDecoding()})

        def prepare(example):
            image = self.transform.tf(feature.decode_example(example["image"]))
            return image, tf.cast(example.get("label", -1), tf.int32)

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        yield from ds.batch(batch).prefetch(2).as_numpy_iterator()


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of process `process_index`'s contiguous shard; sizes differ by at most 1."""
    return process_index * n // process_count, (process_index + 1) * n // process_count


def batches_per_process(n: int, local_batch: int, process_count: int) -> int:
    """How many batches every process runs: enough for the largest shard, ceil(N/P)."""
    return math.ceil(math.ceil(n / process_count) / local_batch)


@dataclasses.dataclass
class LocalBatch:
    """One process's batch: images uint8 [local_batch,H,W,3], labels int32, and `index` int64
    [local_batch], each row's position in the split (-1: padding)."""
    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray


def _padded(images, labels, start, local_batch, shape) -> LocalBatch:
    count = len(labels)
    out = np.zeros((local_batch,) + tuple(shape), np.uint8)
    out[:count] = images
    label_out = np.full(local_batch, -1, np.int32)
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
    shape = inp.image_shape
    done, position = 0, start
    for images, labels in inp.read(start, stop, local_batch):
        yield _padded(images, labels, position, local_batch, shape)
        position += len(labels)
        done += 1
    if position != stop:
        raise InputError(f"{inp.name} split {inp.split!r}: read {position - start} examples of "
                         f"its shard [{start}, {stop}); the source holds fewer than "
                         f"{inp.num_examples} (config.data.num_examples?).")
    for _ in range(batches_per_process(inp.num_examples, local_batch, process_count) - done):
        yield _padded(np.zeros((0,) + tuple(shape), np.uint8), np.zeros(0, np.int32), stop,
                      local_batch, shape)


# ------------------------------------------------------------------------------------------------
# The evaluation input of a config's split.


def _field(section, name: str, default=None):
    value = getattr(section, name, default)
    return default if value is None else value


def eval_transform(eval_config, source_varies: bool, default: Transform) -> Transform:
    """config.eval.image_size (> 0): torchvision Resize(config.eval.resize_shorter, default
    round(image_size·256/224)) + CenterCrop(image_size). Otherwise `default`, unless the source's
    images vary in size: then ImageNet's Resize(256) + CenterCrop(224)."""
    crop = int(_field(eval_config, "image_size", 0))
    resize = int(_field(eval_config, "resize_shorter", 0))
    if crop < 0 or resize < 0:
        raise InputError(f"config.eval.image_size={crop}, config.eval.resize_shorter={resize}; "
                         f"expected sizes >= 0 (0: automatic).")
    if crop:
        resize = resize or round(crop * IMAGENET_RESIZE / IMAGENET_CROP)
        if resize < crop:
            raise InputError(f"config.eval.resize_shorter={resize} is smaller than "
                             f"config.eval.image_size={crop}; the centre crop needs it >= crop.")
        return Transform("resize_center_crop", resize, crop)
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
    data = datasets.load_dataset(data_config, split)
    varies = None in tuple(data.builder.info.features["image"].shape)
    return TfdsInput(data.name, data.split, _limited(len(data), limit), data.num_classes,
                     eval_transform(config.eval, varies, Transform()), source=data)
