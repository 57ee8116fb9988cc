"""Prepare `digits_jpeg`, a tiny TFDS dataset shaped like ImageNet, from real images, offline.

scikit-learn's digits (1,797 real 8x8 handwritten digits, bundled with scikit-learn) upsampled
(bicubic) to a different size per image (shorter side 40-72 px, aspect 3:4 to 4:3), stored as
JPEG like ImageNet's TFDS records (`image` of shape (None, None, 3), `label` of 10 classes,
`file_name` as `<class>_<index>.JPEG`), split into 'train' (the first 1,497) and 'test' (the last
300). It lets the ImageNet recipes run end to end on a CPU in minutes:

    python scripts/tiny_tfds.py --data_dir /tmp/tfds
    python -m bow_jax.main --config=configs/obow_resnet50.py --workdir=/tmp/r50_tiny \\
        --config.data.name=digits_jpeg --config.data.data_dir=/tmp/tfds ...   (README)

Writes `<data_dir>/digits_jpeg/1.0.0/` (TFDS's own files); an existing complete copy is kept.
"""
import argparse
import io
import os

import numpy as np
from PIL import Image

NAME, VERSION, NUM_TEST = "digits_jpeg", "1.0.0", 300


def sized_images(seed: int = 0):
    """(JPEG bytes, label, file name) of every digit, each upsampled to its own size."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        gray = np.uint8(np.clip(image * 255.0 / 16.0, 0, 255))
        shorter, aspect = int(rng.integers(40, 73)), float(rng.uniform(3 / 4, 4 / 3))
        size = (shorter, round(shorter * aspect)) if aspect >= 1 else (round(shorter / aspect),
                                                                       shorter)
        rgb = Image.fromarray(gray).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=90)
        yield buffer.getvalue(), int(label), f"{label}_{i:04d}.JPEG"


def prepare(data_dir: str) -> str:
    """Writes the dataset under `data_dir` (if not already there); returns its folder."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    folder = os.path.join(data_dir, NAME, VERSION)
    if os.path.isfile(os.path.join(folder, "dataset_info.json")):
        return folder
    tfds.disable_progress_bar()
    rows = list(sized_images())
    decoded = [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg, _, _ in rows]

    def split(part):
        return tf.data.Dataset.from_generator(
            lambda: ({"image": decoded[i], "label": rows[i][1], "file_name": rows[i][2]}
                     for i in part),
            output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8),
                              "label": tf.TensorSpec((), tf.int64),
                              "file_name": tf.TensorSpec((), tf.string)})

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10),
        "file_name": tfds.features.Text()})
    n = len(rows)
    tfds.dataset_builders.store_as_tfds_dataset(
        name=NAME, version=VERSION, features=features, data_dir=data_dir,
        split_datasets={"train": split(range(n - NUM_TEST)), "test": split(range(n - NUM_TEST, n))})
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
    print(f"{NAME}: {prepare(parser.parse_args().data_dir)}")


if __name__ == "__main__":
    main()
