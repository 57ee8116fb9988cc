"""The `evaluate_torchvision` task: score any torchvision ResNet `.pth` file (config.export.path)
with the frozen-feature protocols of `config.eval`, as `evaluate` scores our checkpoints."""
import os

import jax
import jax.numpy as jnp

from bow_jax.data.splits import load_split
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
    the backbone is `config.model` (name + kwargs). Results in <workdir>/eval."""
    torchvision.import_torch()  # before anything may import TensorFlow
    path = path or config.export.path
    if not path:
        raise InputError("config.export.path: set the .pth file to evaluate.")
    backbone, variables = torchvision.encode_torchvision_checkpoint(
        path, config.model.name, config.model.kwargs.to_dict())
    mean, std = interface.normalization(config)

    def encode(v, x):
        return interface.encode_with(backbone, v, x, config.eval.feature, mean, std)

    # runner.score reads a method's encoder (a torchvision file has no pretext task to score).
    scorer = interface.Method(init_state=None, train_step=None, make_views=None, encode=encode)
    mesh = sharding.make_mesh()
    train, test = load_split(config, "train"), load_split(config, "test")
    results = {f"torchvision {os.path.basename(path)}":
               runner.score(scorer, variables, train, test, config, mesh)}
    if config.eval.random_init:
        init = jax.jit(lambda k: backbone.init(k, jnp.zeros(torchvision.TEMPLATE_INPUT),
                                               train=False))(jax.random.key(config.seed))
        results["random init"] = runner.score(scorer, init, train, test, config, mesh)
    runner.report(results, f"torchvision file {path}", workdir)
    return results
