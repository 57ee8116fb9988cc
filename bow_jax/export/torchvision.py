"""torchvision interop: our ResNet variables <-> torchvision ResNet state dicts and `.pth` files.

Export (what detection and other PyTorch work loads):

    sd = to_torchvision_state_dict(params, batch_stats, 'resnet50')           # numpy, torch layout
    save_torchvision('resnet50.pth', sd)                                      # atomic torch.save
    torchvision.models.resnet50().load_state_dict(torch.load('resnet50.pth'))  # strict

`layout='obow'` writes the official OBoW release layout instead: `{'network': state_dict}` whose fc
is kappa * G(V) of the last BoW level (`obow_fc`), rows of norm kappa, bias 0.

Import (to score any torchvision ResNet with our evaluations):

    params, batch_stats = from_torchvision_state_dict(load_torchvision('x.pth'), 'resnet50')
    backbone, variables = encode_torchvision_checkpoint('x.pth', 'resnet50', network='teacher')

`encode_torchvision_checkpoint` also reads the official OBoW files (github.com/valeoai/obow)
as they are: the entire model of `Solver.save_network` (student and teacher, `network` picks),
the student of `OBoWSolver.save_feature_extractor`, and the torchvision-format release whose fc is
the 8192 x 2048 BoW weights (dropped: not a classifier). See `select_network`.

A `.pth` file is data, never code: `load_torchvision` reads it with
`torch.load(weights_only=True)` only and refuses files whose pickle would build arbitrary objects.

The name table is `models.resnet.torchvision_key`; layouts: conv kernels HWIO <-> OIHW, dense
kernels [in, out] <-> [out, in]. Flax's BatchNorm has no `num_batches_tracked`; the export writes
it as an int64 0 so that strict `load_state_dict` works (it only matters for BN momentum=None).

torch is imported only by the functions that read or write files (and the `export` /
`evaluate_torchvision` tasks), never by training. In a process that will also import TensorFlow,
torch must be imported first (the reverse order can segfault): `import_torch()` does it.
"""
from __future__ import annotations

import math
import os
import pickle
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bow_jax.lib import extras, files
from bow_jax.lib.errors import InputError, MissingInputError
from bow_jax.models import create_backbone, feature_dims
from bow_jax.models.heads import DynamicBoWHead
from bow_jax.models.resnet import (from_torch_layout, to_torch_layout, torch_axes,
                                   torchvision_key)

ARCHS = ("resnet18", "resnet34", "resnet50")
LAYOUTS = ("torchvision", "obow")
NETWORKS = ("student", "teacher")
# The official OBoW code (github.com/valeoai/obow): `obow/feature_extractor.py` ResNet keeps
# torchvision's modules as `_feature_blocks` 0 = Sequential(Conv=conv1, bn=bn1, relu, maxpool),
# 1..4 = layer1..4; `obow/builder_obow.py` OBoW holds the student as `feature_extractor` and the
# EMA teacher as `feature_extractor_teacher`. `obow/solver.py` `save_network` writes
# {'epoch', 'network': model.state_dict(), 'meters'} (under DDP every key starts 'module.');
# `save_feature_extractor` writes {'epoch', 'network': feature_extractor.state_dict(), 'meters'}.
OBOW_BLOCKS = "_feature_blocks."
OBOW_PREFIXES = {"student": "feature_extractor.", "teacher": "feature_extractor_teacher."}
OBOW_STEM = {"Conv": "conv1", "bn": "bn1"}
CHECKPOINT_LAYOUTS = ("torchvision", "obow_model", "obow_feature_extractor")
FC_MODES = ("params", "zero", "random", "none")
# Wrappers other code puts around a state dict: {'state_dict': sd} (Lightning, many trainers),
# {'network': sd} (the OBoW release), {'model': sd}.
CONTAINER_KEYS = ("state_dict", "network", "model")
NUM_BATCHES_TRACKED = "num_batches_tracked"
TEMPLATE_INPUT = (1, 64, 64, 3)  # parameter shapes do not depend on the input size

StateDict = dict  # str -> np.ndarray


def import_torch():
    """torch, imported with a clear message when absent (install the `torch` extra)."""
    return extras.require("torch", "torch", purpose="the torchvision export / import")


# ------------------------------------------------------------------------------------------------
# Templates: which variables an architecture has, named and shaped.


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise InputError(f"arch={arch!r}: torchvision export/import supports {list(ARCHS)}.")


def _backbone(arch: str, model_kwargs: Optional[Mapping[str, Any]], num_classes: Optional[int]):
    check_arch(arch)
    kwargs = dict(model_kwargs or {})
    if num_classes:
        kwargs["num_classes"] = int(num_classes)
    return create_backbone(arch, **kwargs)


def variable_template(arch: str, model_kwargs: Optional[Mapping[str, Any]] = None,
                      num_classes: Optional[int] = None) -> dict:
    """{(collection, *module path, leaf): ShapeDtypeStruct} of our ResNet, in creation order.

    `model_kwargs` are the backbone options (width, cifar_stem; default: torchvision's network).
    Costs no FLOPs (eval_shape).
    """
    backbone = _backbone(arch, model_kwargs, num_classes)
    shapes = jax.eval_shape(
        lambda: backbone.init(jax.random.key(0), jnp.zeros(TEMPLATE_INPUT), train=False))
    return traverse_util.flatten_dict(dict(shapes))


def torch_shape(flax_path: Sequence[str], shape: Sequence[int]) -> tuple:
    """The torch-layout shape of a Flax variable of `shape` (see `to_torch_layout`)."""
    axes = torch_axes(flax_path, len(shape))
    return tuple(shape) if axes is None else tuple(shape[i] for i in axes)


def _bn_modules(template: dict) -> set:
    """Module paths (without collection) that have BatchNorm statistics."""
    return {path[1:-1] for path in template if path[0] == "batch_stats"}


def _name(path: Sequence[str]) -> str:
    """torchvision name of a Flax path, or the path itself when it is not a ResNet variable."""
    try:
        return torchvision_key(path)
    except ValueError:
        return "/".join(map(str, path))


def _check_same(found: dict, expected: dict, what: str, hint: str) -> None:
    """Raise an InputError listing missing / unexpected / mis-shaped entries."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: {tuple(found[k])} (expected {tuple(expected[k])})"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong)):
            if items:
                shown = ", ".join(map(str, items[:6])) + (" ..." if len(items) > 6 else "")
                parts.append(f"{len(items)} {name}: {shown}")
        raise InputError(f"{what} does not match: " + "; ".join(parts) + f". {hint}")


# torchvision's module order: stem, layers by (stage, block), fc; in a block conv1, bn1, ...,
# downsample; in a BatchNorm weight, bias, running_mean, running_var.
_BLOCK_ORDER = {"conv1": 0, "bn1": 1, "conv2": 2, "bn2": 3, "conv3": 4, "bn3": 5,
                "downsample_conv": 6, "downsample_bn": 7}
_LEAF_ORDER = {"kernel": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3}


def _torchvision_order(path: Sequence[str]) -> tuple:
    """Sort key of a Flax variable path (with collection) in torchvision's state-dict order."""
    modules, leaf = path[1:-1], path[-1]
    top = modules[0]
    if top.startswith("layer"):
        stage, block = (int(n) for n in top[len("layer"):].split("_"))
        place = (2, stage, block, _BLOCK_ORDER.get(modules[1], 99))
    else:
        place = ({"conv1": 0, "bn1": 1}.get(top, 3), 0, 0, 0)
    return place + (_LEAF_ORDER.get(leaf, 9),)


# ------------------------------------------------------------------------------------------------
# Flax -> torchvision.


def _torch_linear_init(rng: np.random.Generator, num_classes: int, dim: int):
    """torch.nn.Linear's default init U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    bound = 1.0 / math.sqrt(dim)
    weight = rng.uniform(-bound, bound, (num_classes, dim)).astype(np.float32)
    bias = rng.uniform(-bound, bound, (num_classes,)).astype(np.float32)
    return weight, bias


def _fc_entries(fc, flat_params: dict, dim: int, num_classes: int, seed: int) -> dict:
    """The fc.weight / fc.bias entries for the fc choice (see `to_torchvision_state_dict`)."""
    if fc is None:
        fc = "params" if ("fc", "kernel") in flat_params else "zero"
    if isinstance(fc, str):
        if fc not in FC_MODES:
            raise InputError(f"fc={fc!r}; expected one of {list(FC_MODES)} or a "
                             "(weight [K, C], bias [K]) pair.")
        if fc == "none":
            return {}
        if fc == "params":
            if ("fc", "kernel") not in flat_params:
                raise InputError("fc='params' but the params have no 'fc' (the backbone was "
                                 "built without num_classes).")
            weight = to_torch_layout(("fc", "kernel"), flat_params[("fc", "kernel")])
            bias = np.asarray(flat_params[("fc", "bias")])
        elif fc == "zero":
            weight = np.zeros((num_classes, dim), np.float32)
            bias = np.zeros((num_classes,), np.float32)
        else:
            weight, bias = _torch_linear_init(np.random.default_rng(seed), num_classes, dim)
    else:
        try:
            weight, bias = fc
        except (TypeError, ValueError) as e:
            raise InputError("fc must be a mode string or a (weight, bias) pair.") from e
        weight, bias = np.asarray(weight), np.asarray(bias)
        if weight.ndim != 2 or weight.shape[1] != dim or bias.shape != weight.shape[:1]:
            raise InputError(f"fc=(weight, bias): expected weight [K, {dim}] and bias [K]; got "
                             f"{weight.shape} and {bias.shape}.")
    return {"fc.weight": np.ascontiguousarray(weight, np.float32),
            "fc.bias": np.ascontiguousarray(bias, np.float32)}


def to_torchvision_state_dict(params, batch_stats, arch: str, *, fc=None,
                              num_classes: int = 1000, seed: int = 0,
                              model_kwargs: Optional[Mapping[str, Any]] = None) -> StateDict:
    """Our ResNet's variables -> a torchvision ResNet state dict of numpy arrays.

    params / batch_stats: the backbone's collections (`{'conv1': ..., 'layer1_0': ...}`).
    fc: None ('params' when the params hold an fc, else 'zero'), 'params' (ours), 'zero' (zeros
      [num_classes, C]), 'random' (torch.nn.Linear's init, from `seed`), 'none' (no fc keys: load
      with strict=False or into a model whose fc is Identity), or a (weight [K, C], bias [K]) pair.
    model_kwargs: the backbone options the variables were built with; the default (torchvision's
      network) is what stock torchvision models load. Values keep float32 bits exactly; every
      BatchNorm also gets `num_batches_tracked` = int64 0.
    """
    template = variable_template(arch, model_kwargs)
    flat = {("params",) + k: v for k, v in traverse_util.flatten_dict(dict(params)).items()}
    flat.update({("batch_stats",) + k: v
                 for k, v in traverse_util.flatten_dict(dict(batch_stats)).items()})
    flat_params = {k[1:]: v for k, v in flat.items() if k[0] == "params"}
    _check_same({_name(k): torch_shape(k, np.shape(v)) for k, v in flat.items() if k[1] != "fc"},
                {_name(k): torch_shape(k, v.shape)
                 for k, v in sorted(template.items(), key=lambda kv: _torchvision_order(kv[0]))
                 if k[1] != "fc"},
                f"The variables of {arch} (model_kwargs={dict(model_kwargs or {})}), in "
                "torchvision names and layout,",
                "Pass the model_kwargs (width, cifar_stem) the backbone was built with.")
    bn_modules = _bn_modules(template)
    state_dict = {}
    for path in sorted(template, key=_torchvision_order):
        if path[0] != "params" or path[1] == "fc":
            continue  # statistics are written right after their BatchNorm's bias, as torch does
        state_dict[torchvision_key(path)] = np.ascontiguousarray(
            to_torch_layout(path, np.asarray(flat[path], np.float32)))
        module = path[1:-1]
        if module in bn_modules and path[-1] == "bias":
            for leaf in ("mean", "var"):
                stat = ("batch_stats",) + module + (leaf,)
                state_dict[torchvision_key(stat)] = np.ascontiguousarray(
                    np.asarray(flat[stat], np.float32))
            prefix = torchvision_key(stat).rsplit(".", 1)[0]
            state_dict[f"{prefix}.{NUM_BATCHES_TRACKED}"] = np.zeros((), np.int64)
    dim = feature_dims(_backbone(arch, model_kwargs, None), TEMPLATE_INPUT)["pooled"][-1]
    state_dict.update(_fc_entries(fc, flat_params, dim, num_classes, seed))
    return state_dict


# ------------------------------------------------------------------------------------------------
# torchvision -> Flax.


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict:
    """The state dict with `prefix` removed from every key that has it (DDP's 'module.')."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def from_torchvision_state_dict(state_dict: Mapping[str, Any], arch: str, *,
                                model_kwargs: Optional[Mapping[str, Any]] = None,
                                with_fc: bool = False) -> Tuple[dict, dict]:
    """A torchvision ResNet state dict (numpy or CPU tensors) -> (params, batch_stats) of ours.

    Keys may carry DDP's 'module.' prefix. `num_batches_tracked` is dropped (Flax has no counter);
    so is fc unless `with_fc` (then the backbone must be built with num_classes = fc rows).
    Every other key must be one of `arch`'s, with the right shape: a clear InputError otherwise.
    """
    state_dict = strip_prefix(dict(state_dict))
    num_classes = None
    if with_fc:
        if "fc.weight" not in state_dict:
            raise InputError("with_fc=True but the state dict has no 'fc.weight'.")
        num_classes = int(np.shape(state_dict["fc.weight"])[0])
    template = variable_template(arch, model_kwargs, num_classes)
    expected = {torchvision_key(path): torch_shape(path, v.shape) for path, v in template.items()}
    found = {k: np.shape(v) for k, v in state_dict.items()
             if not k.endswith("." + NUM_BATCHES_TRACKED)
             and not (not with_fc and k in ("fc.weight", "fc.bias"))}
    _check_same(found, expected, f"The state dict for {arch} "
                f"(model_kwargs={dict(model_kwargs or {})})",
                "Is it a torchvision ResNet of this arch (and width/stem)?")
    flat = {}
    for path in template:
        value = state_dict[torchvision_key(path)]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        flat[path] = np.ascontiguousarray(from_torch_layout(path, value.astype(np.float32)))
    variables = traverse_util.unflatten_dict(flat)
    return variables["params"], variables["batch_stats"]


# ------------------------------------------------------------------------------------------------
# OBoW's exported fc.


def obow_fc(head_variables: Mapping[str, Any], vocabularies: Sequence[Any],
            kappa: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(weight [K, C], bias [K]) = (kappa * G(V), 0) of the LAST BoW level, eval-mode generator BN.

    head_variables: the DynamicBoWHead's {'params', 'batch_stats'} (OBoW state: params['bow_head'],
    batch_stats['bow_head']); vocabularies: every level's words [K_l, C_l] (state.vocabularies);
    kappa: the fixed scale (config.obow.kappa), unused when the head learned 'kappa'. This is the fc
    of the official `--convert-to-torchvision` conversion (github.com/valeoai/obow), rows of
    norm kappa.
    """
    params = head_variables["params"]
    generators = sorted(k for k in params if k.startswith("generator_"))
    if len(generators) != len(vocabularies):
        raise InputError(f"head_variables has {len(generators)} weight generators but "
                         f"{len(vocabularies)} vocabularies were given (one per BoW level).")
    learn_kappa = "kappa" in params
    if kappa is None and not learn_kappa:
        raise InputError("obow_fc: kappa is required (config.obow.kappa) when it is not learned.")
    hidden, channels = np.shape(params[generators[0]]["fc2"]["kernel"])
    head = DynamicBoWHead(num_channels_out=int(channels), kappa=float(kappa or 1.0),
                          hidden_dim=int(hidden), learn_kappa=learn_kappa)
    weight, bias = head.apply(dict(head_variables), [jnp.asarray(v) for v in vocabularies],
                              method=DynamicBoWHead.torchvision_fc)
    return np.asarray(weight, np.float32), np.asarray(bias, np.float32)


# ------------------------------------------------------------------------------------------------
# Files.


def _atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename: whole or nothing."""
    torch = import_torch()
    with files.atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_torchvision(path: str, state_dict: Mapping[str, Any], layout: str = "torchvision") -> str:
    """Writes `state_dict` (numpy arrays) as a `.pth` file atomically; returns the path.

    layout 'torchvision': the plain state dict (`resnet50().load_state_dict(torch.load(path))`);
    'obow': `{'network': state_dict}` as the official OBoW release, whose fc must be kappa * G(V)
    (`to_torchvision_state_dict(..., fc=obow_fc(...))`).
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r}; expected one of {list(LAYOUTS)}.")
    if layout == "obow" and "fc.weight" not in state_dict:
        raise InputError("layout='obow' needs fc = kappa * G(V) of the last level in the state "
                         "dict: build it with to_torchvision_state_dict(..., fc=obow_fc(...)).")
    torch = import_torch()
    # A writable copy: torch warns on (and must not alias) read-only device_get buffers.
    tensors = {k: torch.from_numpy(np.array(v, order="C", copy=True))
               for k, v in state_dict.items()}
    _atomic_torch_save({"network": tensors} if layout == "obow" else tensors, path)
    return path


def _unwrap(obj, path: str) -> dict:
    """The state dict inside what torch.load returned (plain, {'state_dict'|'network'|'model'})."""
    for _ in range(3):  # a wrapper may hold another wrapper
        if not isinstance(obj, Mapping):
            break
        keys = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)]
        if not keys or any(hasattr(v, "shape") for v in obj.values()):
            break
        obj = obj[keys[0]]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise InputError(f"{path}: expected a state dict of tensors, or one inside "
                         f"{list(CONTAINER_KEYS)}; got {type(obj).__name__} with keys "
                         f"{list(obj)[:8] if isinstance(obj, Mapping) else '-'}.")
    return dict(obj)


def load_torchvision(path: str) -> StateDict:
    """A `.pth` state dict as {key: np.ndarray}, read with torch.load(weights_only=True) only.

    Accepts a plain state dict, {'state_dict': sd}, {'network': sd} (the OBoW release),
    {'model': sd}, and DDP's 'module.' key prefix (removed). A file whose pickle would construct
    anything but tensors and containers (i.e. could run code) is refused with an InputError.
    """
    torch = import_torch()
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such .pth file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path} is not a plain state dict (its pickle refers to other objects, which could "
            "run code); it will not be unpickled. Re-save it as a dict of tensors "
            "(torch.save(model.state_dict(), path)).") from e
    except RuntimeError as e:
        raise InputError(f"{path}: not a readable torch file ({e}).") from e
    state_dict = strip_prefix(_unwrap(obj, path))
    out = {}
    for k, v in state_dict.items():
        if v.dtype in (torch.bfloat16, torch.float16):
            v = v.float()
        out[k] = v.detach().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------
# Using a torchvision checkpoint in our evaluations.


def checkpoint_layout(state_dict: Mapping[str, Any]) -> str:
    """Which of CHECKPOINT_LAYOUTS a loaded state dict (DDP prefix removed) is, or '' if none.

    'obow_model': the official OBoW entire model (student under 'feature_extractor.', teacher under
    'feature_extractor_teacher.', each `_feature_blocks.<0-4>...`); 'obow_feature_extractor': the
    official student-only save (keys `_feature_blocks.<0-4>...`); 'torchvision': conv1, layer1...
    """
    keys = list(state_dict)
    if any(k.startswith(OBOW_PREFIXES["student"] + OBOW_BLOCKS) for k in keys):
        return "obow_model"
    if any(k.startswith(OBOW_BLOCKS) for k in keys):
        return "obow_feature_extractor"
    if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    return ""


def from_obow_blocks(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
    """torchvision-named entries of the official OBoW ResNet under `prefix` (e.g.
    'feature_extractor_teacher.'): `_feature_blocks.0.Conv.w` -> `conv1.w`, `.0.bn.w` -> `bn1.w`,
    `_feature_blocks.<i>.rest` -> `layer<i>.rest`; keys outside `prefix` are left out. Values are
    unchanged (the blocks are torchvision's own modules)."""
    start = prefix + OBOW_BLOCKS
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(start):
            continue
        block, _, rest = key[len(start):].partition(".")
        if block == "0":
            module, _, leaf = rest.partition(".")
            out[f"{OBOW_STEM.get(module, module)}.{leaf}"] = value
        else:
            out[f"layer{block}.{rest}"] = value
    return out


def select_network(state_dict: Mapping[str, Any], path: str, network: str = "student") -> dict:
    """The torchvision-named state dict of `network` ('student' | 'teacher') in a loaded file.

    A torchvision or OBoW feature-extractor file holds one network, the student; the OBoW entire
    model holds both. InputError for an unknown `network` or one the file does not hold, and for
    a file of none of CHECKPOINT_LAYOUTS (naming `path` and the keys seen).
    """
    if network not in NETWORKS:
        raise InputError(f"config.export.network={network!r}; expected one of {list(NETWORKS)}.")
    layout = checkpoint_layout(state_dict)
    if not layout:
        shown = ", ".join(list(state_dict)[:8]) + (" ..." if len(state_dict) > 8 else "")
        raise InputError(
            f"{path}: none of the known layouts ({', '.join(CHECKPOINT_LAYOUTS)}): expected "
            "torchvision ResNet keys (conv1.weight, layer1...), or the official OBoW "
            f"'{OBOW_PREFIXES['student']}{OBOW_BLOCKS}...' / '{OBOW_BLOCKS}...'; "
            f"{len(state_dict)} keys seen: {shown}.")
    if layout == "obow_model":
        selected = from_obow_blocks(state_dict, OBOW_PREFIXES[network])
        if not selected:
            raise InputError(f"{path}: an OBoW model file without "
                             f"'{OBOW_PREFIXES[network]}{OBOW_BLOCKS}...' keys "
                             f"(config.export.network={network!r}).")
        return selected
    if network != "student":
        raise InputError(f"config.export.network={network!r}, but {path} ({layout} layout) "
                         "holds one network, the student; the teacher is only in the official "
                         "OBoW entire-model file.")
    return dict(state_dict) if layout == "torchvision" else from_obow_blocks(state_dict)


def encode_torchvision_checkpoint(path: str, arch: str,
                                  model_kwargs: Optional[Mapping[str, Any]] = None,
                                  network: str = "student"):
    """(backbone, variables) of our ResNet holding `network` of the checkpoint at `path`.

    `path`: a torchvision ResNet `.pth` (plain or wrapped, see `load_torchvision`) or an official
    OBoW file (entire model: `network` 'student' or 'teacher'; feature extractor; the
    torchvision-format release). `common.encode_with(backbone, variables, images, 'pooled', mean,
    std)` then gives its frozen features, so every evaluation here can score any torchvision
    ResNet. fc is ignored (the OBoW release's fc is its 8192 x 2048 BoW weights).
    """
    state_dict = select_network(load_torchvision(path), path, network)
    params, batch_stats = from_torchvision_state_dict(state_dict, arch,
                                                      model_kwargs=model_kwargs)
    backbone = _backbone(arch, model_kwargs, None)
    return backbone, {"params": params, "batch_stats": batch_stats}
