"""Detectron2 export: a torchvision ResNet state dict renamed to Detectron2's ResNet, as a `.pkl`.

    tv = torchvision.to_torchvision_state_dict(params, batch_stats, 'resnet50', fc='none')
    save_detectron2('r50.pkl', to_detectron2_state_dict(tv))    # atomic pickle, numpy only
    # detectron2: MODEL.WEIGHTS: r50.pkl -> DetectionCheckpointer(model).load('r50.pkl')

The file is `{'model': {name: np.ndarray}, '__author__': 'bow_jax', 'matching_heuristics': True}`,
what Detectron2's `DetectionCheckpointer._load_file` takes as "Detectron2 model zoo format" from a
`.pkl`; `matching_heuristics` makes it match our names as suffixes of the model's
(`backbone.res2.0.conv1.weight`, `roi_heads.res5.0.conv1.weight` for R50-C4), as
`detectron2/checkpoint/c2_model_loading.py` `align_and_update_state_dicts` does
(github.com/facebookresearch/detectron2).

The renaming is one table, the one of detectron2's `tools/convert-torchvision-to-d2.py`:
    conv1 / bn1                    -> stem.conv1 / stem.conv1.norm
    layer{i}.{j}.conv{k} / .bn{k}  -> res{i+1}.{j}.conv{k} / .conv{k}.norm
    layer{i}.{j}.downsample.0 / .1 -> res{i+1}.{j}.shortcut / .shortcut.norm
Arrays are unchanged (OIHW kernels, BN weight/bias/running_mean/running_var). Unlike that script
the file has no fc (a classifier, not part of a detector) and no `num_batches_tracked` (a counter
Detectron2's FrozenBN does not have; Detectron2's own `.pyth` reader drops it too).

Detectron2 needs the torchvision convention the weights were trained with: RGB input
(`INPUT.FORMAT: "RGB"`), torchvision's mean/std on the 0-255 scale (`MODEL.PIXEL_MEAN:
[123.675, 116.280, 103.530]`, `MODEL.PIXEL_STD: [58.395, 57.120, 57.375]`) and the stride in the
3x3 conv (`MODEL.RESNETS.STRIDE_IN_1X1: False`).

Arrays are pickled as `numpy.ndarray(shape, dtype, buffer=bytearray)`, so the file refers to no
numpy-internal module (NumPy 2 pickles name `numpy._core`, which NumPy < 1.26 cannot import) and
loads in any Detectron2 environment; `load_detectron2` reads it back refusing anything else.
"""
import io
import os
import pickle
import re
from typing import Any, Mapping

import numpy as np

from bow_jax.lib import files
from bow_jax.lib.errors import InputError, MissingInputError

AUTHOR = "bow_jax"
PICKLE_PROTOCOL = 4  # Python >= 3.4 reads it
DROPPED_SUFFIXES = (".num_batches_tracked",)
DROPPED_PREFIXES = ("fc.",)
# torchvision module -> Detectron2 module, outside (stem) and inside a residual block.
STEM_TABLE = {"conv1": "stem.conv1", "bn1": "stem.conv1.norm"}
BLOCK_TABLE = {"conv1": "conv1", "bn1": "conv1.norm", "conv2": "conv2", "bn2": "conv2.norm",
               "conv3": "conv3", "bn3": "conv3.norm",
               "downsample.0": "shortcut", "downsample.1": "shortcut.norm"}
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.(.+)\.([a-z_]+)$")
# The only globals a file written here refers to (see `load_detectron2`).
_ALLOWED_GLOBALS = {("numpy", "ndarray"), ("builtins", "bytearray")}


def detectron2_key(torchvision_key: str) -> str:
    """Detectron2's ResNet name of a torchvision ResNet key ('layer1.0.bn1.weight' ->
    'res2.0.conv1.norm.weight'); InputError for a key that is not a ResNet backbone's."""
    module, _, leaf = torchvision_key.rpartition(".")
    if module in STEM_TABLE:
        return f"{STEM_TABLE[module]}.{leaf}"
    match = _BLOCK_KEY.match(torchvision_key)
    if match is None or match.group(3) not in BLOCK_TABLE:
        raise InputError(f"{torchvision_key!r} is not a torchvision ResNet backbone key (conv1, "
                         "bn1, layer<1-4>.<block>.{conv,bn}<k> or .downsample.<0|1>).")
    stage, block, inner, leaf = match.groups()
    return f"res{int(stage) + 1}.{block}.{BLOCK_TABLE[inner]}.{leaf}"


def to_detectron2_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """A torchvision ResNet state dict (numpy arrays, e.g. `to_torchvision_state_dict`) ->
    {Detectron2 name: float32 np.ndarray}, in the same order, fc and num_batches_tracked dropped.

    The values are the same arrays' contents (OIHW kernels, BN vectors); InputError on a key that
    `detectron2_key` does not know.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith(DROPPED_SUFFIXES) or key.startswith(DROPPED_PREFIXES):
            continue
        out[detectron2_key(key)] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


def _reduce_ndarray(array: np.ndarray):
    """Pickle an array as `numpy.ndarray(shape, dtype, bytearray)`: stable across NumPy versions,
    and writable when loaded (torch.from_numpy warns on read-only arrays)."""
    array = np.ascontiguousarray(array)
    return np.ndarray, (array.shape, array.dtype.str, bytearray(array.tobytes()))


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is np.ndarray:  # pylint: disable=unidiomatic-typecheck
            return _reduce_ndarray(obj)
        return NotImplemented


def save_detectron2(path: str, state_dict: Mapping[str, Any]) -> str:
    """Writes `{'model': state_dict, '__author__': 'bow_jax', 'matching_heuristics': True}` to
    `path` (a `.pkl`) atomically; returns the path. `state_dict`: {Detectron2 name: array}."""
    if not str(path).endswith(".pkl"):
        raise InputError(f"{path}: Detectron2 reads a weights file as this format only when its "
                         "name ends in '.pkl' (config.export.path).")
    model = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
    with files.atomic_open(path, "wb") as f:
        _Pickler(f, protocol=PICKLE_PROTOCOL).dump(
            {"model": model, "__author__": AUTHOR, "matching_heuristics": True})
    return path


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}")
        return super().find_class(module, name)


def load_detectron2(path: str) -> dict:
    """The {'model': {name: np.ndarray}, ...} dict of a `.pkl` written by `save_detectron2`.

    Only arrays and containers are unpickled (a file whose pickle refers to anything else, which
    could run code, is an InputError); MissingInputError when `path` does not exist.
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such .pkl file.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _DataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise InputError(f"{path}: not a Detectron2 .pkl written by bow_jax ({e}); it will not "
                         "be unpickled.") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise InputError(f"{path}: expected {{'model': {{name: array}}, ...}}; got "
                         f"{type(obj).__name__}.")
    return obj
