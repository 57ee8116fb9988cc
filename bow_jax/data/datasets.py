"""Data sources: whole datasets in memory (npz, JPEG bytes, scikit-learn digits, image folders)
and TFDS datasets by name.

In-memory sources return an `ArrayDataset` (uint8 [N,H,W,3] + int32 labels) that the training loop
puts on the device once; per step only indices travel. They never import TensorFlow, so training
from memory works on machines without it. TFDS sources return a `TfdsSource` handle that
`pipeline.tfds_train_views` turns into batches; TensorFlow is imported only there.
"""
from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

SOURCES = ("npz", "jpeg_npz", "digits", "image_folder", "tfds")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
CIFAR_NPZ_LAYOUT = ("CIFAR-10 npz files as in ../shared/data/cifar10 "
                    "(train.npz / test.npz with images uint8 [N,32,32,3] and labels [N])")
JPEG_NPZ_LAYOUT = ("a JPEG-bytes npz as ../shared/data/cifar10/jpeg.npz ({split}_jpeg bytes, "
                   "{split}_offsets [N+1], {split}_labels [N])")
# TFDS names some evaluation splits differently from 'test'.
TFDS_SPLIT_NAMES = {"imagenet2012": {"test": "validation"}}


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image dataset held whole in host memory.

    images: uint8 [N,H,W,3] RGB (NHWC); labels: int32 [N] in [0, num_classes).
    """
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ArrayDataset {self.name!r}: images must be uint8 [N,H,W,3], "
                             f"got {images.dtype} {images.shape}.")
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise ValueError(f"ArrayDataset {self.name!r}: labels must be int32 [{len(images)}], "
                             f"got {labels.dtype} {labels.shape}.")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"ArrayDataset {self.name!r}: labels must lie in "
                             f"[0, {self.num_classes}), got [{labels.min()}, {labels.max()}].")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ArrayDataset":
        """The examples at `indices` (in that order), same classes and name."""
        indices = np.asarray(indices)
        return ArrayDataset(self.images[indices], self.labels[indices], self.num_classes,
                            self.name)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A prepared TFDS dataset and one of its splits, ready for `pipeline.tfds_train_views`."""
    builder: Any
    split: str
    num_examples: int
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.num_examples


# ------------------------------------------------------------------------------------------------
# In-memory sources.


def _as_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got {labels.dtype}.")
    return labels.astype(np.int32)


def _num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    return int(num_classes) if num_classes is not None else int(labels.max(initial=-1)) + 1


def load_npz(path, num_classes: int | None = None, name: str | None = None) -> ArrayDataset:
    """An npz with `images` uint8 [N,H,W,3] and `labels` [N] (layout of ../shared/data/cifar10)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected {CIFAR_NPZ_LAYOUT}.")
    with np.load(path) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; "
                             f"expected {CIFAR_NPZ_LAYOUT}.")
        images, labels = data["images"], _as_labels(data["labels"], str(path))
    if images.ndim == 3:  # grayscale [N,H,W]: repeat to RGB so every model sees 3 channels
        images = np.repeat(images[..., None], 3, axis=-1)
    return ArrayDataset(images, labels, _num_classes(labels, num_classes), name or path.stem)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 [H,W,3] RGB, via Pillow `.convert('RGB')`."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_jpeg_npz(path, split: str = "train", limit: int | None = None,
                  num_classes: int | None = None, name: str | None = None) -> ArrayDataset:
    """JPEG bytes stored in one npz (`{split}_jpeg`, `{split}_offsets`, `{split}_labels`), decoded.

    Image i is the bytes [offsets[i], offsets[i+1]). `limit` decodes only the first `limit` images.
    With Pillow 13 this reproduces ../shared/data/cifar10/{split}.npz exactly (see its README).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected {JPEG_NPZ_LAYOUT}.")
    keys = [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"]
    with np.load(path) as data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(f"{path}: split {split!r} needs arrays {missing}; has {data.files}.")
        blob, offsets, labels = (data[k] for k in keys)
    count = len(labels) if limit is None else min(int(limit), len(labels))
    if len(offsets) != len(labels) + 1:
        raise ValueError(f"{path}: {split}_offsets must have N+1={len(labels) + 1} entries, "
                         f"got {len(offsets)}.")
    images = np.stack([decode_image(blob[offsets[i]:offsets[i + 1]].tobytes())
                       for i in range(count)])
    labels = _as_labels(labels[:count], str(path))
    return ArrayDataset(images, labels, _num_classes(labels, num_classes), name or split)


def _resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a uint8 [H,W,3] image to [size,size,3] with Pillow."""
    from PIL import Image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def digits_split(labels: np.ndarray, split: str, test_every: int = 5) -> np.ndarray:
    """Indices of a fixed stratified split: within each class, every `test_every`-th image
    (positions test_every-1, 2*test_every-1, ... in dataset order) is test, the rest train."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    position = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        position[members] = np.arange(len(members))
    is_test = position % test_every == test_every - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def load_digits(split: str = "train", image_size: int = 8) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16) as uint8 RGB.

    Values map to 0..255 by round(v * 255 / 16); `image_size` > 8 upsamples bilinearly (Pillow).
    The split is `digits_split` (stratified, deterministic: 1/5 of each class is test).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    if image_size != images.shape[1]:
        images = np.stack([_resize_rgb(im, image_size) for im in images])
    labels = digits.target.astype(np.int32)
    keep = digits_split(labels, split)
    return ArrayDataset(images[keep], labels[keep], 10, f"digits_{split}")


def resize_shorter_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is `size` (bilinear, Pillow), then take the centre size x size."""
    from PIL import Image
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def load_image_folder(root, image_size: int, name: str | None = None) -> ArrayDataset:
    """`root/<class>/<image>` files; labels are the sorted class-folder names' positions.

    Every image is decoded to RGB, resized (shorter side to `image_size`) and centre-cropped.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected root/<class>/<image files>.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found under "
                                f"root/<class>/; class folders seen: {classes}.")
    images = np.stack([resize_shorter_center_crop(decode_image(f.read_bytes()), image_size)
                       for f in files])
    return ArrayDataset(images, np.asarray(labels, np.int32), len(classes), name or root.name)


# ------------------------------------------------------------------------------------------------
# TFDS.


def import_tfds():
    """Import tensorflow_datasets lazily, keeping TensorFlow off any GPU (JAX owns it)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    tf.config.set_visible_devices([], "GPU")
    return tfds


def _tfds_howto(name: str, data_dir: str, manual_dir: str | None) -> str:
    if name.split(":")[0] == "imagenet2012":
        manual = manual_dir or f"{data_dir}/downloads/manual"
        return (f"ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar in {manual}/ and run "
                f"`tfds build imagenet2012 --data_dir={data_dir}"
                + (f" --manual_dir={manual_dir}" if manual_dir else "") + "` (takes hours).")
    return (f"On a machine with internet run `tfds build {name} --data_dir={data_dir}` "
            f"(or copy an already prepared {data_dir}/{name.split(':')[0]}/ folder there).")


def tfds_builder(name: str, data_dir: str | None = None, manual_dir: str | None = None):
    """The prepared TFDS builder for `name` in `data_dir`; never downloads.

    Raises FileNotFoundError within a second, saying how to prepare the data, when `name` has not
    been built into `data_dir` (tfds.load without download=False would hang for minutes offline).
    Under `tfds.testing.mock_data` the builder is returned as is.
    """
    tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        # The library's message lists every catalog dataset: too long to be useful here.
        del e
        raise ValueError(f"config.data.name: TFDS has no dataset {name!r} (neither in its "
                         f"catalog nor prepared in config.data.data_dir={data_dir}).") from None
    if builder.is_prepared():
        return builder
    # is_prepared() is False under tfds.testing.mock_data too; there opening a split works, while
    # for an unprepared dataset it fails at once (AssertionError "could not find data").
    try:
        builder.as_dataset(split=next(iter(_default_splits(builder))))
        return builder
    except AssertionError:
        data_dir = data_dir or str(pathlib.Path(builder.data_dir).parents[1])
        raise FileNotFoundError(
            f"config.data.name={name!r}: TFDS dataset not prepared in config.data.data_dir="
            f"{data_dir} (download is disabled). {_tfds_howto(name, data_dir, manual_dir)}"
        ) from None


def _default_splits(builder) -> list[str]:
    return list(builder.info.splits) or ["train"]


def _config_get(config, field: str, default=None):
    # Mappings and attribute objects (ml_collections.ConfigDict is not a Mapping) alike.
    if isinstance(config, Mapping):
        value = config.get(field, default)
    else:
        value = getattr(config, field, default)
    return default if value is None else value


def tfds_source(name: str, split: str, data_dir: str | None = None,
                manual_dir: str | None = None, num_examples: int | Mapping[str, int] | None = None,
                split_names: Mapping[str, str] | None = None) -> TfdsSource:
    """A `TfdsSource` for `split` of the prepared dataset `name`.

    `split` 'test' maps to the dataset's evaluation split (imagenet2012: 'validation').
    `num_examples` (int, or {split: int}) is used only when the builder knows no split sizes,
    as under `tfds.testing.mock_data`.
    """
    builder = tfds_builder(name, data_dir, manual_dir)
    base = name.split(":")[0].split("/")[0]
    names = dict(TFDS_SPLIT_NAMES.get(base, {}), **(split_names or {}))
    tfds_split = names.get(split, split)
    splits = builder.info.splits
    if splits:
        if tfds_split not in splits:
            raise ValueError(f"split {split!r} -> {tfds_split!r} not in {name}'s splits "
                             f"{sorted(splits)}.")
        count = splits[tfds_split].num_examples
    else:
        count = num_examples.get(split) if isinstance(num_examples, Mapping) else num_examples
        if count is None:
            raise ValueError(f"config.data.num_examples: {name} reports no split sizes (mock "
                             f"data?); give the number of {split!r} examples.")
    label = builder.info.features["label"] if "label" in builder.info.features else None
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    return TfdsSource(builder, tfds_split, int(count), num_classes, name)


# ------------------------------------------------------------------------------------------------
# Dispatch on the config.


def _require_path(data_config, field: str = "path") -> pathlib.Path:
    value = _config_get(data_config, field)
    if not value:
        raise ValueError(f"config.data.{field} must be set for source "
                         f"{_config_get(data_config, 'source')!r}.")
    return pathlib.Path(value).expanduser()


def _npz_split_path(path: pathlib.Path, split: str) -> pathlib.Path:
    """A folder holds `<split>.npz`; a name with '{split}' is filled in; a single file serves
    'train' (or the split it is named after)."""
    if "{split}" in str(path):
        return pathlib.Path(str(path).format(split=split))
    if path.is_dir():
        return path / f"{split}.npz"
    if path.suffix == ".npz" and split != "train" and path.stem != split:
        raise ValueError(f"config.data.path={path} is one file but split {split!r} was asked; "
                         f"give the folder holding <split>.npz or a pattern with '{{split}}'.")
    return path


def load_dataset(data_config, split: str = "train") -> ArrayDataset | TfdsSource:
    """The `split` of the dataset described by `data_config` (the config's `data` block).

    Fields: source in SOURCES; path (npz, jpeg_npz, image_folder); image_size (digits,
    image_folder); name, data_dir, manual_dir, num_examples (tfds); num_classes (optional).
    """
    source = _config_get(data_config, "source")
    num_classes = _config_get(data_config, "num_classes")
    if source == "npz":
        path = _npz_split_path(_require_path(data_config), split)
        if not path.is_file():
            raise FileNotFoundError(f"config.data.path: {path} does not exist; expected "
                                    f"{CIFAR_NPZ_LAYOUT}.")
        return load_npz(path, num_classes, name=f"{path.parent.name}_{split}")
    if source == "jpeg_npz":
        path = _require_path(data_config)
        path = path / "jpeg.npz" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"config.data.path: {path} does not exist; expected "
                                    f"{JPEG_NPZ_LAYOUT}.")
        return load_jpeg_npz(path, split, limit=_config_get(data_config, "limit"),
                             num_classes=num_classes, name=f"{path.parent.name}_{split}")
    if source == "digits":
        return load_digits(split, image_size=int(_config_get(data_config, "image_size", 8)))
    if source == "image_folder":
        root = _require_path(data_config)
        if (root / split).is_dir():
            root = root / split
        elif split != "train" or not root.is_dir():
            raise FileNotFoundError(f"config.data.path: neither {root / split} nor (for 'train') "
                                    f"{root} is a folder; expected "
                                    f"<path>/[<split>/]<class>/<image>.")
        image_size = _config_get(data_config, "image_size")
        if not image_size:
            raise ValueError("config.data.image_size must be set for source 'image_folder'.")
        return load_image_folder(root, int(image_size), name=f"{root.parent.name}_{split}")
    if source == "tfds":
        name = _config_get(data_config, "name")
        if not name:
            raise ValueError("config.data.name must name a TFDS dataset (e.g. 'cifar10', "
                             "'imagenet2012') for source 'tfds'.")
        return tfds_source(name, split, _config_get(data_config, "data_dir"),
                           _config_get(data_config, "manual_dir"),
                           _config_get(data_config, "num_examples"),
                           _config_get(data_config, "split_names"))
    raise ValueError(f"config.data.source={source!r} is not a known source; valid: {SOURCES}.")
