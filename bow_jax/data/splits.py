"""A config's train or test split, in the form training and evaluation read it.

In-memory data (`ArrayDataset`) is the default: npz, JPEG npz, digits, image folders, and TFDS
datasets small enough for memory (CIFAR), which are read whole once. With
`config.data.in_memory=False` a TFDS training split stays a `TfdsSource` that the host pipeline
streams (ImageNet).
"""
import numpy as np

from bow_jax.data import datasets
from bow_jax.lib.errors import InputError


def tfds_to_arrays(source: datasets.TfdsSource) -> datasets.ArrayDataset:
    """Reads a whole TFDS split (images of one size, e.g. CIFAR) into host memory."""
    tfds = datasets.import_tfds()
    ds = source.builder.as_dataset(split=source.split, shuffle_files=False)
    images, labels = [], []
    for example in tfds.as_numpy(ds.take(source.num_examples)):
        images.append(example["image"])
        labels.append(example["label"])
    if len({im.shape for im in images}) > 1:
        raise InputError(f"config.data.in_memory: {source.name} has images of several sizes; "
                         "set config.data.in_memory=False to stream it.")
    return datasets.ArrayDataset(np.stack(images).astype(np.uint8),
                                 np.asarray(labels, np.int32), source.num_classes, source.name)


def load_split(config, split: str):
    """`config.data`'s `split`, cut to `config.data.limit` (train) or `config.eval.test_limit`
    (test) when those are set."""
    data = datasets.load_dataset(config.data, split)
    if isinstance(data, datasets.TfdsSource):
        if split == "train" and not config.data.in_memory:
            return data
        data = tfds_to_arrays(data)
    limit = config.data.limit if split == "train" else config.eval.test_limit
    return data.subset(np.arange(min(limit, len(data)))) if limit else data
