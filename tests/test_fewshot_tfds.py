"""Few-shot settings a streamed TFDS split cannot satisfy stop the run before training: its labels
are unknown until it is read, but its size (after config.eval.test_limit) bounds the episodes."""
import numpy as np
import pytest

from bow_jax.config import base_config
from bow_jax.lib import errors
from bow_jax.protocols import checks

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

N_TRAIN, N_TEST, CLASSES = 12, 18, 3


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A prepared TFDS dataset of 8x8 images, 3 classes, 6 test images each; built offline."""
    data_dir = tmp_path_factory.mktemp("tfds")

    def split(n):
        def gen():
            for i in range(n):
                yield {"image": np.full((8, 8, 3), i, np.uint8), "label": i % CLASSES}
        return tf.data.Dataset.from_generator(gen, output_signature={
            "image": tf.TensorSpec((8, 8, 3), tf.uint8), "label": tf.TensorSpec((), tf.int64)})

    feats = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3)),
                                        "label": tfds.features.ClassLabel(num_classes=CLASSES)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_fewshot", version="1.0.0", features=feats, data_dir=str(data_dir),
        split_datasets={"train": split(N_TRAIN), "test": split(N_TEST)})
    return str(data_dir)


def _config(data_dir, **evals):
    c = base_config("rotnet")
    c.data.update(dict(source="tfds", name="tiny_fewshot", data_dir=data_dir, in_memory=False))
    c.eval.update({**dict(protocols=("fewshot",), batch_size=8, fewshot_ways=3,
                          fewshot_queries=1, fewshot_shots=(1, 5)), **evals})
    return c


def test_streamed_tfds_fewshot_bound_is_checked_before_training(tiny_tfds):
    assert checks.check_evaluation_data(_config(tiny_tfds)) is None  # 3 x (5 + 1) = 18
    with pytest.raises(errors.InputError, match=r"config\.eval\.fewshot_shots=\(1, 500\), .*"
                                                r"fewshot_ways=3: 500-shot episodes need 501 "
                                                r"examples of each of at least 3 classes, 1503 "
                                                r"in all; the test split \(TFDS tiny_fewshot "
                                                r"split 'test'\) has 18\."):
        checks.check_evaluation_data(_config(tiny_tfds, fewshot_shots=(1, 500)))
    with pytest.raises(errors.InputError, match=r"fewshot_queries=100 .* has 18\."):
        checks.check_evaluation_data(_config(tiny_tfds, fewshot_shots=(1,), fewshot_queries=100))
    with pytest.raises(errors.InputError, match=r"need 6 examples of each of at least 3 classes, "
                                                r"18 in all; .*first 12 by config\.eval\."
                                                r"test_limit\) has 12\."):
        checks.check_evaluation_data(_config(tiny_tfds, test_limit=12))
