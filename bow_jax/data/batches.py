"""The one source of training batches, for every loop (pre-training, the augmented linear probe,
fine-tuning): global batches of views on the device, sharded on the mesh's 'data' axis, for steps
start_step, start_step + 1, ... Each batch is a function of (seed, step), so a resumed loop sees
the batches an uninterrupted one would have seen.

Every view is cut on the device by the loop's `device_views(images uint8 [B, S, S, 3], sizes
int32 [B, 2], key) -> {name: array [B, ...]}`, from canvases: image b is the top-left
sizes[b] = (h, w) corner of images[b] (the geometric ops of `data/geometric.py` read only
that corner). The key of step s is fold_in(view_key, s), split per position of the global
batch, so the views do not depend on how the batch is spread over devices or hosts.

* In memory (`datasets.ArrayDataset`: npz, digits, image folders): the images are put on every
  device once and are their own canvases; per step only this process's slice of the global batch
  indices crosses from the host (`pipeline.IndexLoader`) and the device gathers the images.
* Streamed (`datasets.TfdsSource`): tf.data reads and decodes each image once into a canvas of
  `source.canvas_size` with its true size (`pipeline.tfds_canvases`, or
  `pipeline.tfds_subset_canvases` for a labelled subset); this process's slice is sharded onto
  its devices. Nothing else runs per image on the host.

The random-resized-crop + flip view of the evaluation protocols (`crop_flip_views`) lives here
too.
"""
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.data import augment, datasets, pipeline
from bow_jax.lib import sharding

# (uint8 canvases [B, S, S, 3], true sizes int32 [B, 2], key) -> {name: views [B, ...]}
DeviceViews = Callable[[jax.Array, jax.Array, jax.Array], dict]


def training_batches(data, *, batch_size: int, seed: int, mesh, start_step: int,
                     device_views: DeviceViews, view_key: Optional[jax.Array] = None,
                     limit: Optional[int] = None, positions: Optional[np.ndarray] = None,
                     cache_dir: Optional[str] = None,
                     unreadable_counts: Optional[dict] = None) -> Iterator[dict]:
    """Global batches {view name: [batch_size, ...], 'label': int32 [batch_size]} sharded on
    'data', for steps start_step, start_step + 1, ... (see the module docstring).

    data: an `ArrayDataset` or a `TfdsSource`. limit: train on the first `limit` examples only
    (None: all). positions: train on these examples only (int, into the split; a TFDS subset is
    streamed by position, `pipeline.tfds_subset_canvases`). view_key: the key the views of step
    s are folded from (default fold_in(key(seed), 1)). cache_dir: a TFDS subset's encoded records
    are cached there after the first pass. unreadable_counts: streamed data's counts of images
    read and unreadable so far ({'read', 'unreadable'}, from a checkpoint), kept up to date in
    place (`pipeline.UnreadableImages`)."""
    view_key = jax.random.fold_in(jax.random.key(seed), 1) if view_key is None else view_key
    cut = _view_cutter(device_views, view_key, mesh)
    if isinstance(data, datasets.TfdsSource):
        for step, batch in enumerate(_streamed(data, batch_size, seed, start_step, limit,
                                               positions, cache_dir, unreadable_counts),
                                     start_step):
            batch = sharding.shard_batch(batch, mesh)
            yield cut(batch["image"], batch["size"], batch.get("label"), step)
        return
    if limit is not None and limit < len(data):
        data = data.subset(np.arange(limit))
    if positions is not None:
        data = data.subset(np.asarray(positions))
    yield from _in_memory(data, batch_size, seed, mesh, start_step, cut)


def _view_cutter(device_views: DeviceViews, view_key, mesh):
    """jit((canvases, sizes, labels, step) -> views + 'label'), sharded on 'data'."""
    def cut(images, sizes, labels, step):
        views = device_views(images, sizes, jax.random.fold_in(view_key, step))
        return views if labels is None else {**views, "label": labels}
    return jax.jit(cut, out_shardings=sharding.batch_sharded(mesh))


def _in_memory(data, batch_size, seed, mesh, start_step, cut):
    images = sharding.replicate(data.images, mesh)
    labels = sharding.replicate(data.labels, mesh)
    size = np.asarray(data.images.shape[1:3], np.int32)

    @jax.jit
    def gather(images, labels, index):
        sizes = jnp.broadcast_to(jnp.asarray(size), (index.shape[0], 2))
        return images[index], sizes, labels[index]

    loader = pipeline.IndexLoader(len(data), batch_size, seed, start_step=start_step)
    for step, batch in enumerate(loader, start_step):
        yield cut(*gather(images, labels, sharding.shard_batch(batch["index"], mesh)), step)


def _streamed(source, batch_size, seed, start_step, limit, positions, cache_dir, counts):
    """This process's host batches of canvases (numpy)."""
    if positions is not None:
        return pipeline.tfds_subset_canvases(
            source.builder, source.split, positions, global_batch=batch_size, seed=seed,
            canvas_size=source.canvas_size, start_step=start_step, cache_dir=cache_dir,
            max_unreadable_fraction=source.max_unreadable_fraction, unreadable_counts=counts)
    limited = limit is not None and limit < source.num_examples
    return pipeline.tfds_canvases(
        source.builder, f"{source.split}[:{limit}]" if limited else source.split,
        global_batch=batch_size, seed=seed, canvas_size=source.canvas_size,
        start_step=start_step, num_examples=limit if limited else source.num_examples,
        max_unreadable_fraction=source.max_unreadable_fraction, unreadable_counts=counts)


def crop_flip_views(images, sizes, key, *, crop: int, scale: Sequence[float],
                    flip: bool = True) -> dict:
    """{'image': uint8 [B, crop, crop, 3]}: torchvision RandomResizedCrop(crop, scale) then
    RandomHorizontalFlip of canvases uint8 [B, S, S, 3] with true sizes [B, 2], one draw per
    image from `key`."""
    crop_key, flip_key = jax.random.split(key)
    keys = jax.random.split(crop_key, images.shape[0])
    views = jax.vmap(lambda k, image, size: augment.random_resized_crop(
        k, image, crop, tuple(scale), size=size))(keys, images, sizes)
    return {"image": augment.random_flip_batch(flip_key, views) if flip else views}
