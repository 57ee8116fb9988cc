"""Data sources: whole datasets in memory (npz, JPEG bytes, scikit-learn digits, image folders)
and TFDS datasets by name.

In-memory sources return an `ArrayDataset` (uint8 [N,H,W,3] + int32 labels) that the training loop
puts on the device once; per step only indices travel. They never import TensorFlow, so training
from memory works on machines without it. TFDS sources return a `TfdsSource` handle that
`pipeline.tfds_canvases` turns into batches; TensorFlow is imported only there.

Image files are decoded by Pillow into the 8-bit RGB picture an image viewer shows (`to_rgb`):
EXIF orientation applied, transparency composited over white, 16-bit samples scaled (65535 ->
255). Image folders follow torchvision's `ImageFolder` layout, `<split>/<class>/<image>`, with
the training split's class index shared by every split. Policy for files that cannot be decoded
(image folders and JPEG npz alike): each is skipped and named in one `UnreadableImagesWarning`
with the count, as long as they are at most `MAX_UNREADABLE_FRACTION` (5%) of the files; more
than that means a broken copy or a wrong path, and is an `UnreadableImageError` naming them.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import pathlib
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bow_jax.lib import extras
from bow_jax.lib.errors import InputError, MissingInputError

SOURCES = ("npz", "jpeg_npz", "digits", "image_folder", "tfds")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm",
                  ".tif", ".tiff")
# Entries that operating systems, archivers and tools leave in dataset folders; with every name
# starting with '.' (.DS_Store, .ipynb_checkpoints, ._AppleDouble files) they are never data.
NOT_DATA_NAMES = frozenset({"__MACOSX", "Thumbs.db", "thumbs.db", "ehthumbs.db", "desktop.ini",
                            "Desktop.ini", "$RECYCLE.BIN", "System Volume Information",
                            "lost+found", "@eaDir", "__pycache__"})
# Folder names that hold a split rather than a class.
SPLIT_FOLDER_NAMES = ("train", "val", "validation", "test")
# Up to this fraction of a dataset's files may fail to decode (skipped with a warning); more is
# an error. Overridden by config.data.max_unreadable_fraction (0: any failure is an error).
MAX_UNREADABLE_FRACTION = 0.05
CIFAR_NPZ_LAYOUT = ("CIFAR-10 npz files as in ../shared/data/cifar10 "
                    "(train.npz / test.npz with images uint8 [N,32,32,3] and labels [N])")
JPEG_NPZ_LAYOUT = ("a JPEG-bytes npz as ../shared/data/cifar10/jpeg.npz ({split}_jpeg bytes, "
                   "{split}_offsets [N+1], {split}_labels [N])")
# TFDS names some evaluation splits differently from 'test'.
# Streamed images are padded into a canvas of this side (config.data.canvas_size): ImageNet's
# photographs are mostly at most 500 pixels on their longer side, so nearly all pass unscaled.
DEFAULT_CANVAS_SIZE = 512
TFDS_SPLIT_NAMES = {"imagenet2012": {"test": "validation"}}


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image dataset held whole in host memory.

    images: uint8 [N,H,W,3] RGB (NHWC); labels: int32 [N] in [0, num_classes); filenames: for
    image folders, each example's 'class/file' name (what SimCLR-style subset files list).
    """
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    filenames: tuple[str, ...] | None = None

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"ArrayDataset {self.name!r}: images must be uint8 [N,H,W,3], "
                             f"got {images.dtype} {images.shape}.")
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise InputError(f"ArrayDataset {self.name!r}: labels must be int32 [{len(images)}], "
                             f"got {labels.dtype} {labels.shape}.")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(f"ArrayDataset {self.name!r}: labels must lie in "
                             f"[0, {self.num_classes}), got [{labels.min()}, {labels.max()}].")
        if self.filenames is not None and len(self.filenames) != len(labels):
            raise InputError(f"ArrayDataset {self.name!r}: {len(self.filenames)} filenames for "
                             f"{len(labels)} examples.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ArrayDataset":
        """The examples at `indices` (in that order), same classes and name."""
        indices = np.asarray(indices, np.int64)
        filenames = (None if self.filenames is None
                     else tuple(self.filenames[i] for i in indices))
        return ArrayDataset(self.images[indices], self.labels[indices], self.num_classes,
                            self.name, filenames)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A prepared TFDS dataset and one of its splits, ready for `pipeline.tfds_canvases`.
    canvas_size: the side of the uint8 canvas each streamed image is padded into (images with a
    longer side are shrunk to fit; `pipeline.tf_canvas`), config.data.canvas_size.
    max_unreadable_fraction: the share of streamed images that may fail to decode (each named
    and replaced; `pipeline.UnreadableImages`), config.data.max_unreadable_fraction."""
    builder: Any
    split: str
    num_examples: int
    num_classes: int
    name: str
    canvas_size: int = DEFAULT_CANVAS_SIZE
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION

    def __len__(self) -> int:
        return self.num_examples


# ------------------------------------------------------------------------------------------------
# In-memory sources.


def _as_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{what}: labels must be integers, got {labels.dtype}.")
    return labels.astype(np.int32)


def _num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    return int(num_classes) if num_classes is not None else int(labels.max(initial=-1)) + 1


def load_npz(path, num_classes: int | None = None, name: str | None = None) -> ArrayDataset:
    """An npz with `images` uint8 [N,H,W,3] (or [N,H,W] greyscale) and `labels` [N]."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist; expected {CIFAR_NPZ_LAYOUT}.")
    with np.load(path) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise InputError(f"{path}: missing arrays {sorted(missing)}; "
                             f"expected {CIFAR_NPZ_LAYOUT}.")
        images, labels = data["images"], _as_labels(data["labels"], str(path))
    if images.ndim == 3:  # grayscale [N,H,W]: repeat to RGB so every model sees 3 channels
        images = np.repeat(images[..., None], 3, axis=-1)
    return ArrayDataset(images, labels, _num_classes(labels, num_classes), name or path.stem)


class UnreadableImageError(InputError):
    """An image file (or encoded image) that Pillow cannot decode; the message names it."""


class UnreadableImagesWarning(UserWarning):
    """Some files of a dataset could not be decoded and were skipped; the message names them."""


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Samples in [0, 65535] -> uint8 round(v * 255 / 65535): 65535 -> 255, 257 * k -> k."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _has_transparency(image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def to_rgb(image) -> np.ndarray:
    """A Pillow image -> uint8 [H,W,3]: the 8-bit RGB picture an image viewer shows.

    * EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), as viewers do.
    * 16-bit samples ('I;16*'; 'I', the mode Pillow gives 16-bit greyscale TIFF and older PNG
      readers) are read as [0, 65535] and scaled, round(v * 255 / 65535), never clipped at 255.
    * 'F' (float TIFF) is read as [0, 1], the convention of float images (NaN -> 0).
    * Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited over a
      white background, as a page shows it; Pillow's plain convert('RGB') would expose whatever
      colour the transparent pixels happen to store.
    * Every other mode (L, 1, P, CMYK, YCbCr, RGB, ...) goes through Pillow's convert('RGB').
    """
    from PIL import Image, ImageOps
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        return _gray_to_rgb(_scale_16bit(np.asarray(image)))
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0)
        return _gray_to_rgb(np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, source: str = "encoded image") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 [H,W,3] RGB (`to_rgb`), decoded by Pillow.

    Raises UnreadableImageError naming `source` (a file path, or npz entry) and Pillow's reason
    when the bytes are not an image, are truncated or otherwise cannot be decoded.
    """
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now, so a truncated file fails here, inside the try
            return to_rgb(image)
    except MemoryError:
        raise
    except Exception as e:  # Pillow's plugins raise OSError, ValueError, SyntaxError, ...
        # Pillow names the in-memory stream ('<_io.BytesIO object at 0x...>'): `source` says it.
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise UnreadableImageError(f"{source}: cannot decode as an image "
                                   f"({type(e).__name__}: {reason}).") from e


def decode_all(sources: Sequence[str], read: Callable[[int], bytes],
               transform: Callable[[np.ndarray], np.ndarray] = lambda image: image,
               max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
               what: str = "dataset") -> tuple[list[np.ndarray], list[int]]:
    """Decodes `read(i)` for every i, `sources[i]` naming it; returns (images, kept indices).

    Images that fail to decode are skipped with one UnreadableImagesWarning naming them and their
    count; when they are more than `max_unreadable_fraction` of all (and always when none decodes)
    an UnreadableImageError names them instead.
    """
    images, kept, failed = [], [], []
    for i, source in enumerate(sources):
        try:
            images.append(transform(decode_image(read(i), source)))
            kept.append(i)
        except UnreadableImageError as e:
            failed.append(str(e))
    if not failed:
        return images, kept
    shown = "\n  ".join(failed[:10]) + (f"\n  ... and {len(failed) - 10} more"
                                        if len(failed) > 10 else "")
    summary = (f"{what}: {len(failed)} of {len(sources)} images cannot be decoded "
               f"(at most {max_unreadable_fraction:.1%} may be skipped, "
               f"config.data.max_unreadable_fraction):\n  {shown}")
    if not kept or len(failed) > max_unreadable_fraction * len(sources):
        raise UnreadableImageError(summary)
    warnings.warn(f"{summary}\nThey are skipped.", UnreadableImagesWarning, stacklevel=2)
    return images, kept


def load_jpeg_npz(path, split: str = "train", limit: int | None = None,
                  num_classes: int | None = None, name: str | None = None,
                  max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION) -> ArrayDataset:
    """JPEG bytes stored in one npz (`{split}_jpeg`, `{split}_offsets`, `{split}_labels`), decoded.

    Image i is the bytes [offsets[i], offsets[i+1]). `limit` decodes only the first `limit` images.
    Entries that cannot be decoded follow `decode_all`'s policy (named, skipped or an error).
    For the CIFAR-10 JPEG npz and Pillow 13 this reproduces the CIFAR-10 npz arrays exactly.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist; expected {JPEG_NPZ_LAYOUT}.")
    keys = [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"]
    with np.load(path) as data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise InputError(f"{path}: split {split!r} needs arrays {missing}; has {data.files}.")
        blob, offsets, labels = (data[k] for k in keys)
    count = len(labels) if limit is None else min(int(limit), len(labels))
    if len(offsets) != len(labels) + 1:
        raise InputError(f"{path}: {split}_offsets must have N+1={len(labels) + 1} entries, "
                         f"got {len(offsets)}.")
    images, kept = decode_all([f"{path}:{split}[{i}]" for i in range(count)],
                              lambda i: blob[offsets[i]:offsets[i + 1]].tobytes(),
                              max_unreadable_fraction=max_unreadable_fraction,
                              what=f"{path} split {split!r}")
    labels = _as_labels(labels[:count], str(path))
    return ArrayDataset(np.stack(images), labels[kept], _num_classes(labels, num_classes),
                        name or split)


def _resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a uint8 [H,W,3] image to [size,size,3] with Pillow."""
    from PIL import Image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def digits_split(labels: np.ndarray, split: str, test_every: int = 5) -> np.ndarray:
    """Indices of a fixed stratified split: within each class, every `test_every`-th image
    (positions test_every-1, 2*test_every-1, ... in dataset order) is test, the rest train."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}.")
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


# ------------------------------------------------------------------------------------------------
# Image folders: <split>/<class>/<image> (torchvision ImageFolder layout).


def is_data_name(name: str) -> bool:
    """False for entries that are never images nor classes: hidden names ('.DS_Store',
    '.ipynb_checkpoints', '._x.jpg') and OS / archiver metadata (`NOT_DATA_NAMES`)."""
    return not name.startswith(".") and name not in NOT_DATA_NAMES


def is_image_name(name: str) -> bool:
    """A data file name with an image extension (`IMAGE_SUFFIXES`, any case)."""
    return is_data_name(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


class LooseImagesWarning(UserWarning):
    """Image files directly in an image folder's split folder, outside any class folder."""


class SymlinkSkippedWarning(UserWarning):
    """A symbolic link to a folder was not followed: it leads back into the tree being listed or
    to a folder already walked (a loop would multiply and mislabel the images)."""


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_problem(target: str, here: str, tree: str, walked: set) -> str | None:
    """Why a link to the real folder `target`, found in the real folder `here` while listing
    the real folder `tree`, must not be followed; None when it leads to new images."""
    if _within(here, target) or _within(tree, target):
        return "it leads to a folder that contains it (a loop)"
    if _within(target, tree):
        return "it leads back into the image folder (its images would count twice)"
    if any(_within(target, w) for w in walked):
        return "it leads to a folder already walked (its images would count twice)"
    if any(_within(w, target) for w in walked):
        return "it leads to a folder that holds one already walked (its images would count twice)"
    return None


def _followed_dirs(dirpath: str, dirnames: list, tree: str, walked: set) -> list:
    """The subfolders of `dirpath` to walk: data names only, and links to folders only when
    `_link_problem` finds none (else skipped with a `SymlinkSkippedWarning` naming the link).
    A followed link's target joins `walked` at once: two links to one folder count it once."""
    keep = []
    for name in sorted(d for d in dirnames if is_data_name(d)):
        path = os.path.join(dirpath, name)
        if os.path.islink(path):
            target = os.path.realpath(path)
            problem = _link_problem(target, os.path.realpath(dirpath), tree, walked)
            if problem:
                warnings.warn(f"{path} -> {target}: symbolic link not followed: {problem}.",
                              SymlinkSkippedWarning, stacklevel=2)  # one location: shown once
                continue
            walked.add(target)
        keep.append(name)
    return keep


def _image_files(folder: pathlib.Path, first_only: bool = False,
                 tree: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Image files under `folder`, subfolders included (as torchvision's ImageFolder walks),
    hidden and metadata entries pruned; sorted by their relative path.

    Links to folders are followed (a class folder may live on another disk), except those that
    lead back into `tree` (the split folder being listed; default `folder`), to a folder that
    contains them, or to a folder already walked: those are skipped with a
    `SymlinkSkippedWarning` naming the link, where torchvision's ImageFolder recurses until
    the system refuses, multiplying the images and labelling other classes' as this one."""
    found, walked = [], set()
    tree_real = os.path.realpath(tree if tree is not None else folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        dirnames[:] = _followed_dirs(dirpath, dirnames, tree_real, walked)
        found.extend(pathlib.Path(dirpath, f) for f in filenames if is_image_name(f))
        if first_only and found:
            return found
    return sorted(found, key=lambda f: f.relative_to(folder).parts)


def _class_folders(root: pathlib.Path) -> list[str]:
    if not root.is_dir():
        raise MissingInputError(f"{root} is not a folder; expected root/<class>/<image files>.")
    return sorted(e.name for e in os.scandir(root)
                  if is_data_name(e.name) and e.is_dir(follow_symlinks=True))


def image_folder_classes(root) -> tuple[str, ...]:
    """The class index an image folder (a training split) defines: its sorted class folders.

    Cheap (stops at the first image of each class). A class folder without any image file is a
    InputError naming it, as in torchvision's ImageFolder: its label would silently exist with no
    example.
    """
    root = pathlib.Path(root)
    classes = _class_folders(root)
    empty = [c for c in classes if not _image_files(root / c, first_only=True, tree=root)]
    if empty:
        raise InputError(f"{root}: class folders {empty} hold no image files "
                         f"({', '.join(IMAGE_SUFFIXES)}); remove them or add images.")
    if not classes:
        raise MissingInputError(f"{root}: no class folders; expected root/<class>/<image files>.")
    return tuple(classes)


@dataclasses.dataclass(frozen=True)
class ImageFolderListing:
    """The examples of an image folder, without decoding: `paths[i]` has label `labels[i]`
    (int32, an index into `classes`, the training split's class index)."""
    root: pathlib.Path
    classes: tuple[str, ...]
    paths: tuple[pathlib.Path, ...]
    labels: np.ndarray

    @property
    def names(self) -> list[str]:
        """'class/file' names (POSIX separators), as SimCLR-style subset files list them."""
        return [p.relative_to(self.root).as_posix() for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)


def list_image_folder(root, classes: Sequence[str] | None = None) -> ImageFolderListing:
    """The image files of `root/<class>/...` and their labels, in dataset order (classes in
    index order, files sorted by path within each), decoding nothing.

    classes: the class index to label with, i.e. the training split's (`image_folder_classes`);
    None: `root` is the training split and defines it. Hidden entries, OS metadata and files
    without an image extension are neither classes nor images. A class folder of `root` absent
    from `classes` is an InputError naming it; a class of `classes` absent from `root` is fine.
    """
    root = pathlib.Path(root)
    index = image_folder_classes(root) if classes is None else tuple(classes)
    label_of = {c: i for i, c in enumerate(index)}
    per_class = {c: _image_files(root / c, tree=root) for c in _class_folders(root)}
    per_class = {c: files for c, files in per_class.items() if files}
    unknown = sorted(set(per_class) - set(label_of))
    if unknown:
        raise InputError(f"{root}: classes {unknown} are not classes of the training split, "
                         f"whose class index is {list(index)}; every split must use the "
                         f"training split's classes (config.data.path: the image folder).")
    loose = [e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name)]
    if loose:
        warnings.warn(f"{root}: {len(loose)} image files (e.g. {loose[0]!r}) lie outside any "
                      f"class folder and are ignored; expected root/<class>/<image>.",
                      LooseImagesWarning, stacklevel=2)
    paths, labels = [], []
    for cls in sorted(per_class, key=label_of.get):
        paths.extend(per_class[cls])
        labels.extend([label_of[cls]] * len(per_class[cls]))
    if not paths:
        raise MissingInputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found under "
                                f"root/<class>/; class folders seen: {sorted(per_class)}.")
    return ImageFolderListing(root, index, tuple(paths), np.asarray(labels, np.int32))


def load_image_folder(root, image_size: int, name: str | None = None,
                      classes: Sequence[str] | None = None,
                      max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION) -> ArrayDataset:
    """The images of `list_image_folder(root, classes)`, decoded (`decode_image`), resized
    (shorter side to `image_size`, bilinear) and centre-cropped: uint8 [N, image_size,
    image_size, 3], with each example's 'class/file' name in `filenames`.

    Files that cannot be decoded follow `decode_all`'s policy: skipped and named in a warning up
    to `max_unreadable_fraction` of the files, an UnreadableImageError naming them beyond.
    """
    listing = list_image_folder(root, classes)
    images, kept = decode_all([str(p) for p in listing.paths],
                              lambda i: listing.paths[i].read_bytes(),
                              lambda image: resize_shorter_center_crop(image, image_size),
                              max_unreadable_fraction, what=str(listing.root))
    names = listing.names
    return ArrayDataset(np.stack(images), listing.labels[kept], len(listing.classes),
                        name or listing.root.name, tuple(names[i] for i in kept))


def image_folder_split_root(path, split: str) -> pathlib.Path:
    """The folder of `split` in an image-folder dataset at `path` (config.data.path):
    `path/<split>`, or for 'train' `path` itself when it holds class folders directly.

    MissingInputError naming config.data.path when the split has no folder; InputError when
    `path` mixes class folders with split folders (their names would become classes).
    """
    path = pathlib.Path(path).expanduser()
    if (path / split).is_dir():
        return path / split
    if split != "train" or not path.is_dir():
        raise MissingInputError(f"config.data.path: neither {path / split} nor (for 'train') "
                                f"{path} is a folder; expected <path>/[<split>/]<class>/<image>.")
    splits = [d for d in SPLIT_FOLDER_NAMES if (path / d).is_dir()]
    if splits:
        raise InputError(f"config.data.path={path} holds split folders {splits} but no train/: "
                         f"its class folders and {splits} would all become classes; put the "
                         f"training classes under {path / 'train'}.")
    return path


# ------------------------------------------------------------------------------------------------
# TFDS.


def import_tfds():
    """Import tensorflow_datasets lazily, keeping TensorFlow off any GPU (JAX owns it)."""
    tf = extras.require("tensorflow", "tfds", purpose="TFDS data (config.data.source='tfds')")
    tfds = extras.require("tensorflow_datasets", "tfds",
                          purpose="TFDS data (config.data.source='tfds')")
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

    Raises MissingInputError within a second, saying how to prepare the data, when `name` has not
    been built into `data_dir` (tfds.load without download=False would hang for minutes offline).
    Under `tfds.testing.mock_data` the builder is returned as is.
    """
    tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        # The library's message lists every catalog dataset: too long to be useful here.
        del e
        if data_dir and not os.path.isdir(data_dir):
            raise MissingInputError(f"config.data.data_dir={data_dir}: no such folder (where "
                                    f"the prepared TFDS dataset {name!r} should be).") from None
        raise InputError(f"config.data.name: TFDS has no dataset {name!r} (neither in its "
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
        raise MissingInputError(
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


def with_canvas(source: TfdsSource, data_config) -> TfdsSource:
    """`source` with the stream settings of `data_config`: canvas_size (InputError naming the
    field unless it is a positive int) and max_unreadable_fraction; absent: the defaults."""
    size = _config_get(data_config, "canvas_size", DEFAULT_CANVAS_SIZE)
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise InputError(f"config.data.canvas_size={size!r}; expected a positive number of "
                         "pixels (the side of the padded image the device cuts views from).")
    fraction = float(_config_get(data_config, "max_unreadable_fraction",
                                 MAX_UNREADABLE_FRACTION))
    return dataclasses.replace(source, canvas_size=int(size), max_unreadable_fraction=fraction)


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
            raise InputError(f"split {split!r} -> {tfds_split!r} not in {name}'s splits "
                             f"{sorted(splits)}.")
        count = splits[tfds_split].num_examples
    else:
        count = num_examples.get(split) if isinstance(num_examples, Mapping) else num_examples
        if count is None:
            raise InputError(f"config.data.num_examples: {name} reports no split sizes (mock "
                             f"data?); give the number of {split!r} examples.")
    label = builder.info.features["label"] if "label" in builder.info.features else None
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    return TfdsSource(builder, tfds_split, int(count), num_classes, name)


# ------------------------------------------------------------------------------------------------
# Dispatch on the config.


def _require_path(data_config, field: str = "path") -> pathlib.Path:
    value = _config_get(data_config, field)
    if not value:
        raise InputError(f"config.data.{field} must be set for source "
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
        raise InputError(f"config.data.path={path} is one file but split {split!r} was asked; "
                         f"give the folder holding <split>.npz or a pattern with '{{split}}'.")
    return path


def _max_unreadable_fraction(data_config) -> float:
    value = float(_config_get(data_config, "max_unreadable_fraction", MAX_UNREADABLE_FRACTION))
    if not 0.0 <= value < 1.0:
        raise InputError(f"config.data.max_unreadable_fraction={value}; expected a fraction in "
                         f"[0, 1) of the files that may be skipped when they cannot be decoded.")
    return value


def image_folder_split(data_config, split: str) -> ImageFolderListing:
    """The listing of `split` of the image folder at config.data.path, labelled with the
    training split's class index (so train, validation and test labels agree)."""
    root = image_folder_split_root(_require_path(data_config), split)
    classes = None
    if split != "train":
        classes = image_folder_classes(image_folder_split_root(_require_path(data_config),
                                                               "train"))
    return list_image_folder(root, classes)


def _load_image_folder_split(data_config, split: str) -> ArrayDataset:
    listing = image_folder_split(data_config, split)
    image_size = _config_get(data_config, "image_size")
    if not image_size:
        raise InputError("config.data.image_size must be set for source 'image_folder'.")
    return load_image_folder(listing.root, int(image_size),
                             name=f"{listing.root.parent.name}_{split}", classes=listing.classes,
                             max_unreadable_fraction=_max_unreadable_fraction(data_config))


def load_dataset(data_config, split: str = "train") -> ArrayDataset | TfdsSource:
    """The `split` of the dataset described by `data_config` (the config's `data` block).

    Fields: source in SOURCES; path (npz, jpeg_npz, image_folder); image_size (digits,
    image_folder); name, data_dir, manual_dir, num_examples (tfds); num_classes and
    max_unreadable_fraction (optional; see `decode_all`). Image-folder splits other than 'train'
    are labelled with the training split's class index.
    """
    source = _config_get(data_config, "source")
    num_classes = _config_get(data_config, "num_classes")
    if source == "npz":
        path = _npz_split_path(_require_path(data_config), split)
        if not path.is_file():
            raise MissingInputError(f"config.data.path: {path} does not exist; expected "
                                    f"{CIFAR_NPZ_LAYOUT}.")
        return load_npz(path, num_classes, name=f"{path.parent.name}_{split}")
    if source == "jpeg_npz":
        path = _require_path(data_config)
        path = path / "jpeg.npz" if path.is_dir() else path
        if not path.is_file():
            raise MissingInputError(f"config.data.path: {path} does not exist; expected "
                                    f"{JPEG_NPZ_LAYOUT}.")
        return load_jpeg_npz(path, split, limit=_config_get(data_config, "limit"),
                             num_classes=num_classes, name=f"{path.parent.name}_{split}",
                             max_unreadable_fraction=_max_unreadable_fraction(data_config))
    if source == "digits":
        return load_digits(split, image_size=int(_config_get(data_config, "image_size", 8)))
    if source == "image_folder":
        return _load_image_folder_split(data_config, split)
    if source == "tfds":
        name = _config_get(data_config, "name")
        if not name:
            raise InputError("config.data.name must name a TFDS dataset (e.g. 'cifar10', "
                             "'imagenet2012') for source 'tfds'.")
        source = tfds_source(name, split, _config_get(data_config, "data_dir"),
                             _config_get(data_config, "manual_dir"),
                             _config_get(data_config, "num_examples"),
                             _config_get(data_config, "split_names"))
        return with_canvas(source, data_config)
    raise InputError(f"config.data.source={source!r} is not a known source; valid: {SOURCES}.")


# ------------------------------------------------------------------------------------------------
# What a split holds, without decoding its images (for checks made before training).


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    """A split's size and labels, read without decoding images.

    num_examples: examples in the split; labels: int [num_examples], or None where reading them
    would mean reading the examples (TFDS); num_classes: of the source's class index (0 when
    unknown); where: the file, folder or dataset read, for messages.
    """
    num_examples: int
    labels: np.ndarray | None
    num_classes: int
    where: str


def _npz_members(path: pathlib.Path, needed: Sequence[str], layout: str) -> dict:
    """Arrays `needed[1:]` of an npz (only those are read), after checking `needed` exist."""
    if not path.is_file():
        raise MissingInputError(f"config.data.path: {path} does not exist; expected {layout}.")
    with np.load(path) as data:
        missing = [k for k in needed if k not in data.files]
        if missing:
            raise InputError(f"config.data.path: {path} lacks arrays {missing}; expected "
                             f"{layout}.")
        return {k: data[k] for k in needed[1:]}


def describe_split(data_config, split: str) -> SplitSummary:
    """`split` of the dataset `data_config` describes, as `load_dataset` would read it, but
    cheaply: npz files open only their label arrays, image folders are listed, TFDS builders
    report their split sizes (or config.data.num_examples under mock data).

    Raises what `load_dataset` raises for a missing split, file or field (MissingInputError /
    InputError naming the config field), and an InputError for an image folder without
    config.data.image_size.
    """
    source = _config_get(data_config, "source")
    num_classes = _config_get(data_config, "num_classes")
    if source == "npz":
        path = _npz_split_path(_require_path(data_config), split)
        labels = _npz_members(path, ["images", "labels"], CIFAR_NPZ_LAYOUT)["labels"]
    elif source == "jpeg_npz":
        path = _require_path(data_config)
        path = path / "jpeg.npz" if path.is_dir() else path
        keys = [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"]
        labels = _npz_members(path, keys, JPEG_NPZ_LAYOUT)[f"{split}_labels"]
        limit = _config_get(data_config, "limit")
        labels = labels[:int(limit)] if limit else labels
    elif source == "digits":
        from sklearn.datasets import load_digits as sklearn_digits
        target = sklearn_digits().target
        path, labels, num_classes = "scikit-learn digits", target[digits_split(target, split)], 10
    elif source == "image_folder":
        if not _config_get(data_config, "image_size"):
            raise InputError("config.data.image_size must be set for source 'image_folder'.")
        listing = image_folder_split(data_config, split)
        return SplitSummary(len(listing), listing.labels, len(listing.classes),
                            str(listing.root))
    else:  # 'tfds', or an unknown source, which load_dataset reports
        data = load_dataset(data_config, split)
        return SplitSummary(len(data), None, data.num_classes,
                            f"TFDS {data.name} split {data.split!r}")
    labels = _as_labels(labels, str(path))
    return SplitSummary(len(labels), labels, _num_classes(labels, num_classes), str(path))
