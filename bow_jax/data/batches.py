"""The one source of training batches, for every loop (pre-training, the augmented linear probe,
fine-tuning): global batches of views on the device, sharded on the mesh's 'data' axis, for steps
start_step, start_step + 1, ... Each batch is a function of (seed, step), so a resumed loop sees
the batches an uninterrupted one would have seen.

* In memory (`datasets.ArrayDataset`: npz, digits, image folders): the images are put on every
  device once; per step only this process's slice of the global batch indices crosses from the
  host (`pipeline.IndexLoader`), and the device gathers the images and cuts the views with
  `device_views(images uint8 [B, H, W, 3], key) -> {name: array [B, ...]}`, keyed by
  fold_in(view_key, step).
* Streamed (`datasets.TfdsSource`): tf.data decodes and cuts `host_views(image, seed)` per image
  (`pipeline.tfds_train_views`, or `pipeline.tfds_subset_views` for a labelled subset), and this
  process's slice is sharded onto its devices.

The random-resized-crop + flip view of the evaluation protocols (`crop_flip_views`,
`tf_crop_flip_views`) lives here too: one definition per side.
"""
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from bow_jax.data import augment, datasets, pipeline
from bow_jax.lib import errors, sharding

DeviceViews = Callable[[jax.Array, jax.Array], dict]  # (uint8 images [B,H,W,3], key) -> views


def training_batches(data, *, batch_size: int, seed: int, mesh, start_step: int,
                     device_views: DeviceViews, host_views: Optional[pipeline.ViewFn] = None,
                     view_key: Optional[jax.Array] = None, limit: Optional[int] = None,
                     positions: Optional[np.ndarray] = None, cache_dir: Optional[str] = None,
                     what: str = "config.data.in_memory=False") -> Iterator[dict]:
    """Global batches {view name: [batch_size, ...], 'label': int32 [batch_size]} sharded on
    'data', for steps start_step, start_step + 1, ... (see the module docstring).

    data: an `ArrayDataset` or a `TfdsSource`. limit: train on the first `limit` examples only
    (None: all). positions: train on these examples only (int, into the split; a TFDS subset is
    streamed by position, `pipeline.tfds_subset_views`). view_key: the key the
    device views of step s are folded from (default fold_in(key(seed), 1)). cache_dir: a TFDS
    subset's encoded records are cached there after the first pass. InputError naming `what`
    when the data are streamed and the loop has no `host_views`."""
    if isinstance(data, datasets.TfdsSource):
        if host_views is None:
            raise errors.InputError(f"{what}: this loop cannot stream {data.name} (its views "
                                    "are cut on the device only); use in-memory data.")
        yield from _streamed(data, batch_size, seed, mesh, start_step, host_views, limit,
                             positions, cache_dir)
        return
    if limit is not None and limit < len(data):
        data = data.subset(np.arange(limit))
    if positions is not None:
        data = data.subset(np.asarray(positions))
    view_key = jax.random.fold_in(jax.random.key(seed), 1) if view_key is None else view_key
    yield from _in_memory(data, batch_size, seed, mesh, start_step, device_views, view_key)


def _in_memory(data, batch_size, seed, mesh, start_step, device_views, view_key):
    images = sharding.replicate(data.images, mesh)
    labels = sharding.replicate(data.labels, mesh)

    def views(images, labels, index, step):
        out = device_views(images[index], jax.random.fold_in(view_key, step))
        return {**out, "label": labels[index]}

    views = jax.jit(views, out_shardings=sharding.batch_sharded(mesh))
    loader = pipeline.IndexLoader(len(data), batch_size, seed, start_step=start_step)
    for step, batch in enumerate(loader, start_step):
        yield views(images, labels, sharding.shard_batch(batch["index"], mesh), step)


def _streamed(source, batch_size, seed, mesh, start_step, host_views, limit, positions,
              cache_dir):
    if positions is None:
        limited = limit is not None and limit < source.num_examples
        host = pipeline.tfds_train_views(
            source.builder, f"{source.split}[:{limit}]" if limited else source.split,
            global_batch=batch_size, seed=seed, view_fn=host_views, start_step=start_step,
            num_examples=limit if limited else source.num_examples)
    else:
        host = pipeline.tfds_subset_views(
            source.builder, source.split, positions, global_batch=batch_size, seed=seed,
            view_fn=host_views, start_step=start_step, cache_dir=cache_dir)
    for batch in host:
        yield sharding.shard_batch(batch, mesh)


def crop_flip_views(images, key, *, crop: int, scale: Sequence[float], flip: bool = True) -> dict:
    """{'image': uint8 [B, crop, crop, 3]}: torchvision RandomResizedCrop(crop, scale) then
    RandomHorizontalFlip of uint8 images [B, H, W, 3], one draw per image from `key`. The crop is
    rounded back to uint8, as PIL hands it to ToTensor."""
    crop_key, flip_key = jax.random.split(key)
    views = augment.to_uint8(augment.random_resized_crop_batch(crop_key, images, crop,
                                                               tuple(scale)))
    return {"image": augment.random_flip_batch(flip_key, views) if flip else views}


def tf_crop_flip_views(crop: int, scale: Sequence[float], flip: bool = True) -> pipeline.ViewFn:
    """The same view on the host, for tf.data: `view_fn(image uint8 [H, W, 3], seed int64 [2])`
    -> {'image': uint8 [crop, crop, 3]}, stateless per seed."""
    def view_fn(image, seed):
        tf = pipeline.import_tensorflow()
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
        view = pipeline.tf_random_resized_crop(image, crop, tuple(scale), seed=crop_seed)
        return {"image": pipeline.tf_flip(view, flip_seed) if flip else view}
    return view_fn
