"""bow_jax: bag-of-visual-words self-supervised learning (RotNet, BoWNet, OBoW) in JAX/Flax."""
from setuptools import find_packages, setup

# Versions are pinned to the set checked to install together on Python 3.11 (CPU) and that the
# GPU machines' jax 0.11 accepts; see README "Install and extras".
CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    "absl-py",
    "pillow",
    "scikit-learn",  # ships the digits images the demo trains on; reference for k-means
    "tensorboardX>=2.6.5",  # TensorBoard event files without TensorFlow
    "tqdm>=4.70.1",  # rate and ETA of long phases on a terminal
    # Only clu.parameter_overview (parameter counts; imports no TensorFlow, unlike clu's
    # metric_writers / periodic_actions, which we replace with tensorboardX and jax.profiler).
    "clu>=0.0.12",
]
EXTRAS = {
    # TFDS input pipelines (in-memory training needs none of this).
    "tfds": [
        "tensorflow-cpu>=2.21.0",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tensorflow-datasets 4.9.10 needs it without declaring it
    ],
    # The TensorBoard viewer itself (`tensorboard --logdir=WORKDIR`); writing needs only the core.
    "tensorboard": ["tensorboard>=2.21.0"],
    "test": ["pytest>=8", "pytest-xdist"],
    "torch": ["torch==2.14.1", "torchvision==0.29.1"],
    "cuda": ["jax[cuda13]"],
}
EXTRAS["test"] = EXTRAS["test"] + EXTRAS["tfds"]

setup(
    name="bow_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["bow_jax", "bow_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
