"""The `export` task: the newest checkpoint of a workdir -> a torchvision `.pth` file (or the
official OBoW release layout), with the student backbone's variables."""
import os
from typing import Tuple

import jax
import ml_collections
import numpy as np

from bow_jax.lib import logs
from bow_jax.lib.errors import InputError
from bow_jax.export import torchvision
from bow_jax.tasks import common

READS_RUN = True  # reads a trained run: its workdir must exist
SECTION = "export"


def default_config() -> ml_collections.ConfigDict:
    """config.export: the `export` and `evaluate_torchvision` tasks' fields."""
    e = ml_collections.ConfigDict()
    e.path = ""  # export: the .pth written ('' = <workdir>/torchvision_<arch>_step<N>.pth);
    #              evaluate_torchvision: the .pth read
    e.layout = "torchvision"  # 'torchvision': plain state dict | 'obow': {'network': sd}, fc=kG(V)
    e.fc = "zero"  # 'zero' | 'random' | 'none' | 'params' (layout 'obow' ignores it)
    e.num_classes = 1000  # fc rows for fc='zero'/'random' (torchvision's default 1000)
    return e


def obow_state_fc(config, state) -> Tuple[np.ndarray, np.ndarray]:
    """`torchvision.obow_fc` of an OBoW state: its BoW head, current vocabularies and kappa."""
    if config.method != "obow":
        raise InputError(f"config.export.layout='obow' needs an OBoW run (config.method='obow'), "
                         f"not {config.method!r}.")
    head_variables = {"params": state.params["bow_head"],
                      "batch_stats": state.batch_stats["bow_head"]}
    return torchvision.obow_fc(jax.device_get(head_variables), jax.device_get(state.vocabularies),
                               config.obow.kappa)


def export_state(config, method, state, path: str, layout: str = "torchvision", fc="zero",
                 num_classes: int = 1000) -> str:
    """Writes the student backbone of `state` to `path` in `layout`; returns the path."""
    arch = config.model.name
    torchvision.check_arch(arch)
    kwargs = config.model.kwargs.to_dict()
    if kwargs.get("width", 64) != 64 or kwargs.get("cifar_stem", False):
        logs.warn(f"config.model.kwargs={kwargs} is not torchvision's {arch} (width 64, ImageNet "
                  "stem): the file keeps torchvision's names but a stock torchvision model will "
                  "not load it.")
    variables = jax.device_get(method.backbone_variables(state))
    if layout == "obow":
        fc = obow_state_fc(config, state)
    state_dict = torchvision.to_torchvision_state_dict(
        variables["params"], variables["batch_stats"], arch, fc=fc, num_classes=num_classes,
        model_kwargs=kwargs)
    if jax.process_index() == 0:
        torchvision.save_torchvision(path, state_dict, layout)
    return path


def run(config, workdir: str, path: str = "") -> str:
    """Exports the newest checkpoint of `workdir` to `path`, else config.export.path, else
    <workdir>/torchvision_<arch>[_obow]_step<N>.pth. Returns the path written."""
    torchvision.import_torch()  # fail early, and before any TensorFlow import
    cfg = config.export
    torchvision.check_arch(config.model.name)
    if cfg.layout not in torchvision.LAYOUTS:
        raise InputError(f"config.export.layout={cfg.layout!r}; expected one of "
                         f"{list(torchvision.LAYOUTS)}.")
    with common.restore_trained(config, workdir, "export") as run_:
        suffix = "_obow" if cfg.layout == "obow" else ""
        path = path or cfg.path or os.path.join(
            workdir, f"torchvision_{config.model.name}{suffix}_step{run_.restored_step}.pth")
        export_state(config, run_.method, run_.state, path, cfg.layout, cfg.fc, cfg.num_classes)
    logs.say(f"export: wrote {path} (layout {cfg.layout}, step {run_.restored_step})")
    return path
