"""A config's train or test split as an in-memory `ArrayDataset` (what training and evaluation
of in-memory data read)."""
import numpy as np

from bow_jax.data import datasets


def load_split(config, split: str) -> datasets.ArrayDataset:
    """`config.data`'s `split`, cut to `config.data.limit` (train) or `config.eval.test_limit`
    (test) when those are set. TFDS datasets small enough for memory (CIFAR) are read whole."""
    data = datasets.load_dataset(config.data, split)
    if not isinstance(data, datasets.ArrayDataset):
        data = datasets.tfds_to_arrays(data)
    limit = config.data.limit if split == "train" else config.eval.test_limit
    return data.subset(np.arange(min(limit, len(data)))) if limit else data
