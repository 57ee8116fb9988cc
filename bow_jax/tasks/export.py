"""The `export` task: the newest checkpoint of a workdir -> a torchvision `.pth` file, the official
OBoW release layout, or a Detectron2 `.pkl`, with the student (or OBoW teacher) backbone's
variables. One module per format (`bow_jax.export`); this task only dispatches by layout."""
import os
from typing import Tuple

import jax
import ml_collections
import numpy as np

from bow_jax.lib import logs
from bow_jax.lib.errors import InputError
from bow_jax.export import detectron2, torchvision
from bow_jax.tasks import common

READS_RUN = True  # reads a trained run: its workdir must exist
SECTION = "export"
LAYOUTS = torchvision.LAYOUTS + ("detectron2",)


def default_config() -> ml_collections.ConfigDict:
    """config.export: the `export` and `evaluate_torchvision` tasks' fields."""
    e = ml_collections.ConfigDict()
    e.path = ""  # export: the file written ('' = <workdir>/<layout>_<arch>_step<N>.pth|.pkl);
    #              evaluate_torchvision: the .pth read
    e.layout = "torchvision"  # 'torchvision': plain state dict | 'obow': {'network': sd}, fc=kG(V)
    #                           | 'detectron2': .pkl {'model': {d2 name: array}} (no fc)
    e.network = "student"  # 'student' | 'teacher' (OBoW's EMA teacher): the backbone exported, or
    #                        read from an official OBoW entire-model file (evaluate_torchvision)
    e.fc = "zero"  # 'zero' | 'random' | 'none' | 'params' (layouts 'obow', 'detectron2' ignore it)
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


def network_variables(config, method, state, network: str = "student") -> dict:
    """{'params', 'batch_stats'} (host numpy) of the backbone exported: the student, or for
    network='teacher' the EMA teacher of a state that has one (OBoW)."""
    if network not in torchvision.NETWORKS:
        raise InputError(f"config.export.network={network!r}; expected one of "
                         f"{list(torchvision.NETWORKS)}.")
    if network == "student":
        return jax.device_get(method.backbone_variables(state))
    if not hasattr(state, "teacher_params"):
        raise InputError(f"config.export.network='teacher': a {config.method!r} run has no "
                         "teacher backbone (OBoW runs do).")
    return jax.device_get({"params": state.teacher_params,
                           "batch_stats": state.teacher_batch_stats})


def export_state(config, method, state, path: str, layout: str = "torchvision", fc="zero",
                 num_classes: int = 1000, network: str = "student") -> str:
    """Writes the `network` backbone of `state` to `path` in `layout` (one of LAYOUTS): the
    torchvision state dict, saved as is ('torchvision', 'obow') or renamed to Detectron2's
    ResNet ('detectron2', no fc). Returns the path; process 0 writes."""
    arch = config.model.name
    torchvision.check_arch(arch)
    kwargs = config.model.kwargs.to_dict()
    if kwargs.get("width", 64) != 64 or kwargs.get("cifar_stem", False):
        logs.warn(f"config.model.kwargs={kwargs} is not torchvision's {arch} (width 64, ImageNet "
                  "stem): the file keeps the format's names but a stock torchvision (or "
                  "Detectron2) ResNet will not load it.")
    variables = network_variables(config, method, state, network)
    if layout == "obow":
        fc = obow_state_fc(config, state)
    elif layout == "detectron2":
        fc = "none"
    state_dict = torchvision.to_torchvision_state_dict(
        variables["params"], variables["batch_stats"], arch, fc=fc, num_classes=num_classes,
        model_kwargs=kwargs)
    if jax.process_index() == 0:
        if layout == "detectron2":
            detectron2.save_detectron2(path, detectron2.to_detectron2_state_dict(state_dict))
        else:
            torchvision.save_torchvision(path, state_dict, layout)
    return path


def default_path(config, workdir: str, step: int) -> str:
    """<workdir>/torchvision_<arch>[_obow]_step<N>.pth, or detectron2_<arch>_step<N>.pkl."""
    layout, arch = config.export.layout, config.model.name
    teacher = "_teacher" if config.export.network == "teacher" else ""
    if layout == "detectron2":
        return os.path.join(workdir, f"detectron2_{arch}{teacher}_step{step}.pkl")
    obow = "_obow" if layout == "obow" else ""
    return os.path.join(workdir, f"torchvision_{arch}{obow}{teacher}_step{step}.pth")


def check_export_config(config) -> None:
    """InputError naming config.export.layout / .network / .path when they cannot be written."""
    cfg = config.export
    torchvision.check_arch(config.model.name)
    if cfg.layout not in LAYOUTS:
        raise InputError(f"config.export.layout={cfg.layout!r}; expected one of {list(LAYOUTS)}.")
    if cfg.network not in torchvision.NETWORKS:
        raise InputError(f"config.export.network={cfg.network!r}; expected one of "
                         f"{list(torchvision.NETWORKS)}.")
    if cfg.layout == "detectron2" and cfg.path and not cfg.path.endswith(".pkl"):
        raise InputError(f"config.export.path={cfg.path!r}: layout 'detectron2' writes a .pkl "
                         "(Detectron2 reads its format by that suffix).")


def run(config, workdir: str, path: str = "") -> str:
    """Exports the newest checkpoint of `workdir` to `path`, else config.export.path, else
    `default_path`. Returns the path written."""
    torchvision.import_torch()  # fail early, and before any TensorFlow import
    cfg = config.export
    check_export_config(config)
    with common.restore_trained(config, workdir, "export") as run_:
        path = path or cfg.path or default_path(config, workdir, run_.restored_step)
        export_state(config, run_.method, run_.state, path, cfg.layout, cfg.fc, cfg.num_classes,
                     cfg.network)
    logs.say(f"export: wrote {path} (layout {cfg.layout}, {cfg.network}, "
             f"step {run_.restored_step})")
    return path
