"""The `evaluate_torchvision` task: score any torchvision ResNet `.pth` file (config.export.path)
with the protocols of `config.eval.protocols`, as `evaluate` scores our checkpoints."""
import functools
import os

from bow_jax.data.splits import load_split
from bow_jax.protocols import api as protocols
from bow_jax.protocols import runner
from bow_jax.export import torchvision
from bow_jax.lib import sharding
from bow_jax.lib.errors import InputError
from bow_jax.methods import interface

READS_RUN = False
SECTION = None  # reads config.export.path, config.model and config.eval


def default_config():
    return None


def run(config, workdir: str, path: str = "") -> dict:
    """Scores the torchvision checkpoint `path` (default config.export.path) on `config.data`;
    the backbone is `config.model` (name + kwargs), the network config.export.network (an
    official OBoW file's 'student' or 'teacher'), the feature config.eval.feature. With
    config.eval.random_init the same backbone at random initialisation is scored beside it
    (`runner.score_random_init`). Results in <workdir>/eval. InputError when no path is set."""
    torchvision.import_torch()  # before anything may import TensorFlow
    path = path or config.export.path
    if not path:
        raise InputError("config.export.path: set the .pth file to evaluate.")
    backbone, variables = torchvision.encode_torchvision_checkpoint(
        path, config.model.name, config.model.kwargs.to_dict(), network=config.export.network)
    mean, std = interface.normalization(config)
    # A torchvision file has no pretext task to score: the encoder alone.
    encode = functools.partial(interface.encode_with, backbone, feature_name=config.eval.feature,
                               mean=mean, std=std)
    mesh = sharding.make_mesh()
    train, test = load_split(config, "train"), load_split(config, "test")
    results = {f"torchvision {os.path.basename(path)}":
               runner.score(protocols.Encoder(encode, variables), train, test, config, mesh)}
    if config.eval.random_init:
        results["random init"] = runner.score_random_init(
            encode, runner.backbone_init(backbone, train.image_shape), train, test, config, mesh)
    runner.report(results, f"torchvision file {path}", workdir)
    return results
