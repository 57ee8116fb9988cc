"""The evaluation protocols by name: config.eval.protocols chooses among `PROTOCOLS`.

Each protocol is one module holding one `api.Protocol` (see protocols/api.py for the
contract). Adding one: write `protocols/<name>_protocol.py` with its `PROTOCOL`, then add its
import and its entry below.
"""
from __future__ import annotations

from bow_jax.lib.errors import InputError
from bow_jax.protocols import fewshot_protocol, api, knn_protocol, linear_protocol
from bow_jax.protocols import voc07_protocol

PROTOCOLS: dict[str, api.Protocol] = {p.name: p for p in (
    linear_protocol.PROTOCOL,
    fewshot_protocol.PROTOCOL,
    knn_protocol.PROTOCOL,
    voc07_protocol.PROTOCOL,
)}

DEFAULT = ("linear", "fewshot", "knn")  # config.eval.protocols' default (and an older config's)


def chosen(config) -> list[api.Protocol]:
    """The protocols of config.eval.protocols (a tuple of names), in its order.

    InputError naming config.eval.protocols when it is not a tuple or list of names (a string
    would be read letter by letter), names one twice, or names one not in `PROTOCOLS`."""
    names = getattr(config.eval, "protocols", DEFAULT)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InputError(f"config.eval.protocols={names!r}; expected a tuple of protocol names, "
                         f"e.g. ('linear', 'knn'), from {sorted(PROTOCOLS)}.")
    names = tuple(names)
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise InputError(f"config.eval.protocols={names!r}: unknown {unknown}; expected names "
                         f"from {sorted(PROTOCOLS)}.")
    if len(set(names)) != len(names):
        raise InputError(f"config.eval.protocols={names!r} names a protocol twice.")
    return [PROTOCOLS[n] for n in names]
