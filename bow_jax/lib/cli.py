"""Command-line mistakes in one line: config files that do not load, overrides of unknown fields.

ml_collections' `config_flags` raises while absl parses the flags, and absl's `app.run` answers
with the usage text and a traceback whose last line names `lrr`, not `config.optim.lrr`. `main.py`
catches that and asks `diagnose` what the user got wrong, in terms of the command line:

    error: --config.optim.lrr: config.optim has no field 'lrr'; did you mean config.optim.lr?

`fields` / `format_fields` list a config's every dotted field (`--list_config`).
"""
import difflib
import importlib.util
import os
import re
import traceback
from typing import Any, List, Optional, Sequence, Tuple

import ml_collections

from bow_jax.lib import errors

# `--config.a.b=1`, `--config.a.b 1`, `--noconfig.a.b` (a boolean), as config_flags reads them.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG = re.compile(r"^--?config(?:=(.*))?$")


class CommandLineError(Exception):
    """A mistake on the command line, with a one-line message for the user."""


def config_argument(argv: Sequence[str]) -> Optional[str]:
    """The value of --config in `argv` (`--config=x` or `--config x`), or None."""
    for i, arg in enumerate(argv):
        match = _CONFIG.match(arg)
        if match:
            if match.group(1) is not None:
                return match.group(1)
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def override_paths(argv: Sequence[str]) -> List[str]:
    """The dotted paths that `argv` overrides, below `config.` (e.g. ['optim.lr'])."""
    return [m.group(1) for m in map(_OVERRIDE.match, argv) if m]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the file `spec` ('path.py' or 'path.py:argument', as config_flags).

    Raises CommandLineError naming the file: missing, not Python (line and SyntaxError), no
    get_config, or an exception in it (the line of the config file it came through).
    """
    path, *args = spec.split(":", 1)
    shown = f"--config={spec}"
    if not os.path.isfile(path):
        raise CommandLineError(f"{shown}: no such file (relative to {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location("bow_jax_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise CommandLineError(f"{shown}: the file defines no get_config() function")
        return module.get_config(*args)
    except CommandLineError:
        raise
    except SyntaxError as e:
        raise CommandLineError(f"{shown}: line {e.lineno}: SyntaxError: {e.msg}") from e
    except Exception as e:  # pylint: disable=broad-except  # any failure of the user's file
        raise CommandLineError(f"{shown}: {_where(e, path)}{type(e).__name__}: "
                               f"{first_line(e)}") from e


def _where(error: BaseException, path: str) -> str:
    """'line N: ' of the innermost traceback frame in the file `path`, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f"line {frames[-1].lineno}: " if frames else ""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def whole_message(error: BaseException) -> str:
    """Every line of `error`'s message (trailing blanks removed), or its repr when empty."""
    text = str(error).strip()
    return text if text else repr(error)


def is_input_error(error: BaseException) -> bool:
    """Whether `error` is one that main.py prints as `error: <its whole message>` without a
    traceback, decided by its type, never its wording: an `errors.ExplainedError` (bad input, a
    missing file, a failed write, a damaged checkpoint, a locked workdir, a non-finite state),
    or an ImportError of a missing optional dependency that names its pip command
    (lib/extras.py). Anything else is a bug and keeps its traceback."""
    if isinstance(error, ImportError):
        return "pip install" in str(error)
    return isinstance(error, errors.ExplainedError)


def unknown_field(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
    """Why `config.<path>` names no field (with the closest valid one), or None if it does.

    `path` is dotted, as after `--config.`; an index such as `shots[0]` is checked by its name.
    """
    node, parent = config, "config"
    for key in (part.split("[")[0] for part in path.split(".")):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return f"{parent} is a {type(node).__name__}, not a section with field '{key}'"
        if key not in node:
            return f"{parent} has no field '{key}'; " + _suggestion(config, node, parent, key)
        node, parent = node[key], f"{parent}.{key}"
    return None


def _suggestion(config, node, parent: str, key: str) -> str:
    """'did you mean X?': the closest field name in the same section, else a field of that name
    elsewhere in the config; else where the valid names can be seen."""
    close = difflib.get_close_matches(key, list(node.keys()), n=1, cutoff=0.6)
    if close:
        return f"did you mean {parent}.{close[0]}?"
    elsewhere = [name for name, _, _ in fields(config) if name.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere[:3])}?"
    return f"{parent}'s fields are listed by --list_config"


def diagnose(argv: Sequence[str]) -> Optional[str]:
    """The first mistake in `argv`'s --config and --config.* flags, as '--flag: what is wrong',
    or None when the config loads and every override names a field."""
    spec = config_argument(argv)
    if spec is None:
        return None
    try:
        config = load_config_file(spec)
    except CommandLineError as e:
        return str(e)
    for path in override_paths(argv):
        problem = unknown_field(config, path)
        if problem:
            return f"--config.{path}: {problem}"
    return None


# Tuple fields whose default is () in the shipped configs: what their elements are.
EMPTY_TUPLE_KINDS = {"optim.milestones": int, "finetune.milestones": int,
                     "eval.checkpoint_steps": int}
_KIND_WORDS = {int: "integers", float: "numbers", str: "names"}


def _element_kind(path: str, default) -> Optional[type]:
    """int, float or str: what the elements of the tuple field `path` are, from its default
    (`EMPTY_TUPLE_KINDS` when that is empty); None when unknown or mixed."""
    if not default:
        return EMPTY_TUPLE_KINDS.get(path)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in default):
        return int
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in default):
        return float
    return str if all(isinstance(x, str) for x in default) else None


def tuple_mistake(path: str, default, value) -> Optional[str]:
    """Why `value`, given on the command line for the tuple field `path`, does not hold what its
    `default` holds, or None. ml_collections keeps what it cannot parse as one string element:
    `(abc)` arrives as ('(abc)',), `(layer3,layer4)` as ('(layer3,layer4)',)."""
    kind = _element_kind(path, default)
    if kind is None or not isinstance(value, (tuple, list)):
        return None
    given = value[0] if len(value) == 1 and isinstance(value[0], str) else tuple(value)
    if kind is str:
        if any("," in x or "(" in x for x in value if isinstance(x, str)):
            names = tuple(x.strip(" ()'\"") for x in ",".join(map(str, value)).split(","))
            quoted = repr(names).replace(" ", "")
            return (f"--config.{path}={given}: the names are read as one string; quote each, "
                    f"e.g. \"--config.{path}={quoted}\"")
        return None
    numbers = (int,) if kind is int else (int, float)
    if all(isinstance(x, numbers) and not isinstance(x, bool) for x in value):
        return None
    example = repr(tuple(default) or (1, 2)).replace(" ", "")
    return (f"--config.{path}={given}: expected a tuple of {_KIND_WORDS[kind]}, e.g. "
            f"--config.{path}='{example}'")


def check_overrides(argv: Sequence[str], config: ml_collections.ConfigDict) -> Optional[str]:
    """The first override in `argv` whose value does not fit its tuple field (`tuple_mistake`),
    as '--config.a.b=...: what is wrong', or None. Compares with the config file's own value."""
    spec = config_argument(argv)
    if spec is None:
        return None
    defaults = load_config_file(spec)
    for path in override_paths(argv):
        if "[" in path:
            continue
        default, value = _get(defaults, path), _get(config, path)
        if isinstance(default, (tuple, list)):
            problem = tuple_mistake(path, default, value)
            if problem:
                return problem
    return None


def _get(config, path: str):
    for key in path.split("."):
        config = config[key]
    return config


def fields(config: ml_collections.ConfigDict,
           prefix: str = "config") -> List[Tuple[str, Any, str]]:
    """Every leaf field of `config` as (dotted name, value, type name), sections in key order.
    A None placeholder reports its declared type (e.g. float)."""
    rows = []
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ml_collections.ConfigDict):
            sub = fields(value, name)
            rows.extend(sub if sub else [(name, value.to_dict(), "ConfigDict")])
        else:
            rows.append((name, value, config.get_type(key).__name__))
    return rows


def format_fields(config: ml_collections.ConfigDict) -> str:
    """`fields` as aligned lines: 'config.optim.lr  0.1  float'."""
    rows = [(name, repr(value), kind) for name, value, kind in fields(config)]
    width_name = max((len(r[0]) for r in rows), default=0)
    width_value = min(max((len(r[1]) for r in rows), default=0), 40)
    return "\n".join(f"{n:<{width_name}}  {v:<{width_value}}  {k}" for n, v, k in rows)
