"""Streamed, sharded feature extraction of a whole split, cached in the workdir.

`split_features` runs `features.iter_features` (the one compiled extractor) over
`data.eval_input.local_batches`: each process reads and transforms its own shard, batches of one
global size go to all devices of all hosts, the padding rows are dropped. The rows of all
processes are gathered on every process and written at their split positions into

    <workdir>/eval/features/<tag>/<feature>/<split>.npy          float32 [N, D]
                                            <split>_flip.npy     float32 [N, D] (flip=True)
                                            <split>_labels.npy   int32 [N] (-1: left out)
                                                                 or int8 [N, C] multi-label
                                            <split>.json         the key below, N and D

(`np.lib.format.open_memmap` files under a temporary name, renamed when complete, the JSON header
written last, all by process 0; the other processes keep their copy in memory). A later call with
the same key (tag = the checkpoint's step, the state's fingerprint, feature, split, source,
transform, number of examples, flip) reads the files back memory-mapped (multi-label inputs,
`EvalInput.label_shape` = (C,), keep int8 targets [N, C] in {-1, 0, 1} and say so in the header's
`label_shape`; single-label files and headers are unchanged); a header that does not match, a
missing file or one whose shape, dtype or size is wrong (a truncated write) is recomputed, never
trusted. Multi-process runs decide on process 0 and need the workdir on a shared file system, as
the checkpoints do.

Host memory: one batch of images per process (plus tf.data's prefetch of two batches), the
features of one batch, and the output rows, which are a file-backed memory map on process 0.
Measured with tracemalloc (Python and numpy allocations; 16x16 images in memory, D = 1024, global
batch 64, 8 CPU devices): the cached pass peaks at 6.1 MiB for 256 images and 6.1 MiB for 2048
(mostly tracing and compiling, independent of N), while `features.extract_features` on the 2048
images peaks at 16.1 MiB (the 8 MiB of features, twice); see
tests/test_streamed_eval.py::test_streamed_pass_memory_is_bounded.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import uuid
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from bow_jax.data import datasets, eval_input
from bow_jax.protocols import features
from bow_jax.lib import checkpoint, files, logs, sharding, writers

CACHE_VERSION = 1


@dataclasses.dataclass
class SplitFeatures:
    """Features of a split: `feats` float32 [N, D], `labels` int32 [N] in [0, num_classes) or,
    for multi-label data (VOC07), int8 targets [N, num_classes] in {-1, 0, 1}, `flip_feats`
    float32 [N, D] of the horizontally flipped images (or None), `where` the cache folder they
    were read from or written to (None: not cached)."""
    feats: np.ndarray
    labels: np.ndarray
    num_classes: int
    flip_feats: Optional[np.ndarray] = None
    where: Optional[str] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return np.ndim(self.labels) == 2


def label_layout(label_shape: tuple) -> tuple[tuple, type]:
    """(per-row shape, dtype) of the cached labels: ((), int32) or ((C,), int8) multi-label."""
    return (tuple(label_shape), np.int8) if label_shape else ((), np.int32)


def state_fingerprint(variables) -> str:
    """A short hash of the per-leaf checksums of `variables` (`checkpoint.inspect`): features of
    another state never pass for this one's."""
    leaves, _ = checkpoint.inspect(variables)
    return hashlib.sha256(json.dumps(leaves, sort_keys=True).encode()).hexdigest()[:16]


def cache_paths(workdir: str, tag: str, feature: str, split: str) -> dict:
    folder = os.path.join(workdir, "eval", "features", tag, feature)
    return {"feats": os.path.join(folder, f"{split}.npy"),
            "flip_feats": os.path.join(folder, f"{split}_flip.npy"),
            "labels": os.path.join(folder, f"{split}_labels.npy"),
            "header": os.path.join(folder, f"{split}.json"), "folder": folder}


def _load_array(path: str, shape: tuple, dtype) -> np.ndarray:
    """The .npy at `path` memory-mapped; ValueError unless it has exactly `shape` and `dtype`
    (a truncated file fails in np.load: its data is shorter than its header says)."""
    array = np.load(path, mmap_mode="r")
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise ValueError(f"{path}: {array.dtype} {array.shape}, expected {dtype} {shape}")
    return array


def read_cache(paths: dict, key: dict, flip: bool) -> Optional[dict]:
    """The cached arrays matching `key` ({'feats', 'labels'[, 'flip_feats']}), or None when
    absent, of another key, incomplete or damaged."""
    try:
        with open(paths["header"], encoding="utf-8") as f:
            header = json.load(f)
        if header.get("key") != key or (flip and not header.get("flip")):
            return None
        n, dim = int(header["num_examples"]), int(header["feature_dim"])
        row, dtype = label_layout(tuple(header.get("label_shape", ())))
        out = {"feats": _load_array(paths["feats"], (n, dim), np.float32),
               "labels": _load_array(paths["labels"], (n,) + row, dtype)}
        if flip:
            out["flip_feats"] = _load_array(paths["flip_feats"], (n, dim), np.float32)
        return out
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        if os.path.exists(paths["header"]):
            logs.warn(f"feature cache {paths['header']} is unusable ({e}); recomputing.")
        return None


class _Destination:
    """Where the gathered rows go: on process 0 with a cache, `.npy` memory maps under temporary
    names (`commit` renames them and writes the header); otherwise arrays in memory."""

    def __init__(self, n: int, dim: int, flip: bool, paths: Optional[dict], label_shape=()):
        self.paths, self.temps = paths, {}
        names = ["feats", "labels"] + (["flip_feats"] if flip else [])
        self.arrays = {}
        row, label_dtype = label_layout(label_shape)
        for name in names:
            shape, dtype = ((n,) + row, label_dtype) if name == "labels" else ((n, dim), np.float32)
            if paths is None:
                self.arrays[name] = np.empty(shape, dtype)
                continue
            os.makedirs(paths["folder"], exist_ok=True)
            base = os.path.basename(paths[name])
            self.temps[name] = os.path.join(paths["folder"], f".{base}.{uuid.uuid4().hex}.tmp")
            self.arrays[name] = np.lib.format.open_memmap(self.temps[name], "w+", dtype, shape)
        self.arrays["labels"][:] = eval_input.missing_labels(1, label_shape)[0]

    def write(self, index: np.ndarray, rows: dict) -> None:
        valid = index >= 0
        for name, values in rows.items():
            self.arrays[name][index[valid]] = values[valid]

    def commit(self, header: dict) -> None:
        if self.paths is None:
            return
        if os.path.exists(self.paths["header"]):  # no header may describe half-renamed files
            os.unlink(self.paths["header"])
        for name, temp in self.temps.items():
            self.arrays[name].flush()
            os.replace(temp, self.paths[name])
        files.atomic_write_text(self.paths["header"], json.dumps(header, indent=1) + "\n")

    def discard(self) -> None:
        for temp in self.temps.values():
            if os.path.exists(temp):
                os.unlink(temp)


def _feature_dim(encode: Callable, variables, image_shape) -> int:
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.uint8)
    out = jax.eval_shape(encode, x) if variables is None else jax.eval_shape(encode, variables, x)
    if len(out.shape) != 2:
        raise ValueError(f"encode must return [B, D] features; got shape {out.shape}.")
    return int(out.shape[1])


def _gathered(rows: dict) -> dict:
    """Every process's rows of one batch, on every process, in process order."""
    if jax.process_count() == 1:
        return rows
    return multihost_utils.process_allgather(rows, tiled=True)


def _stream(encode, inp, batch_size, mesh, flip, variables, dest: _Destination, desc: str):
    """One pass over `inp`, all processes together; rows land in `dest` at their positions."""
    local_batch = batch_size // jax.process_count()
    meta = collections.deque()

    def images():
        for batch in eval_input.local_batches(inp, local_batch):
            meta.append((batch.index, batch.labels))
            yield batch.images

    total = eval_input.batches_per_process(inp.num_examples, local_batch, jax.process_count())
    stream = features.iter_features(encode, writers.progress(images(), total, desc, "batch"),
                                    batch_size, mesh, flip, variables)
    for out in stream:
        index, labels = meta.popleft()
        rows = {"index": index, "labels": labels}
        rows.update({"feats": out[0], "flip_feats": out[1]} if flip else {"feats": out})
        rows = _gathered(rows)
        dest.write(rows.pop("index"), rows)


def _without_unreadable(arrays: dict, inp, max_unreadable_fraction: float) -> dict:
    """Rows whose image could not be decoded (label -1, multi-label: `MISSING_TARGET`) dropped;
    more than `max_unreadable_fraction` of them is an UnreadableImageError."""
    keep = eval_input.valid_rows(arrays["labels"])
    dropped = int((~keep).sum())
    if not dropped:
        return arrays
    if dropped > max_unreadable_fraction * len(keep):
        raise datasets.UnreadableImageError(
            f"{inp.name} split {inp.split!r}: {dropped} of {len(keep)} images cannot be decoded "
            f"(at most {max_unreadable_fraction:.1%}: max_unreadable_fraction of the "
            f"evaluation data, config.eval.data when that is set, else config.data).")
    return {name: np.asarray(a)[keep] for name, a in arrays.items()}


def _decide(hit: bool) -> bool:
    """Process 0's cache decision, shared by all processes (each must run the same batches)."""
    if jax.process_count() == 1:
        return hit
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(hit)))


def split_features(encode: Callable, inp: eval_input.EvalInput, batch_size: int, mesh=None, *,
                   variables=None, flip: bool = False, workdir: Optional[str] = None,
                   tag: str = "", feature: str = "",
                   max_unreadable_fraction: float = datasets.MAX_UNREADABLE_FRACTION
                   ) -> SplitFeatures:
    """`encode(variables, images)` features of every example of `inp`, streamed (see the module
    docstring); with `flip` also those of the flipped images, in the same compiled call.

    With `workdir`, features are read from / written to its cache under `tag` (e.g. 'step_1000')
    and `feature` (config.eval.feature). `batch_size`: the global batch, a multiple of the
    device count (ValueError otherwise). Rows of undecodable images are dropped (see
    `_without_unreadable`). Returns float32 features, int32 labels (int8 [N, C] targets for a
    multi-label input).
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    paths = key = None
    if workdir:
        paths = cache_paths(workdir, tag, feature, inp.split)
        key = {"version": CACHE_VERSION, "tag": tag, "feature": feature,
               "state": None if variables is None else state_fingerprint(variables),
               **inp.describe()}
        key = json.loads(json.dumps(key))
        cached = read_cache(paths, key, flip) if jax.process_index() == 0 else None
        if _decide(cached is not None):
            cached = cached if cached is not None else read_cache(paths, key, flip)
            logs.say(f"features of {inp.split} ({tag}, {feature}): cached in {paths['folder']}")
            return _split_features(cached, inp, max_unreadable_fraction, paths["folder"])
    dim = _feature_dim(encode, variables, inp.image_shape)
    writing = paths if jax.process_index() == 0 else None
    dest = _Destination(inp.num_examples, dim, flip, writing, inp.label_shape)
    header = {"key": key, "num_examples": inp.num_examples, "feature_dim": dim, "flip": flip}
    if inp.label_shape:  # single-label headers stay as they were
        header["label_shape"] = list(inp.label_shape)
    try:
        _stream(encode, inp, batch_size, mesh, flip, variables, dest,
                f"features of {inp.split}" + (f" ({tag}, {feature})" if tag else ""))
        dest.commit(header)
    except BaseException:
        dest.discard()
        raise
    where = None if paths is None else paths["folder"]
    return _split_features(dest.arrays, inp, max_unreadable_fraction, where)


def _split_features(arrays: dict, inp, max_unreadable_fraction: float,
                    where: Optional[str]) -> SplitFeatures:
    arrays = _without_unreadable(arrays, inp, max_unreadable_fraction)
    return SplitFeatures(arrays["feats"], arrays["labels"], inp.num_classes,
                         arrays.get("flip_feats"), where)
