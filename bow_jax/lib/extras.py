"""Optional dependencies, imported by name: a missing one says which extra installs it.

The core install trains on in-memory data; TFDS pipelines need TensorFlow (`tfds` extra) and the
torchvision export needs PyTorch (`torch` extra). Modules that need one call
`extras.require('tensorflow', 'tfds')` where they would write `import tensorflow`, so that a core
install running a TFDS config stops with the command that fixes it, not a bare
ModuleNotFoundError.
"""
import importlib
import types

from bow_jax.lib import logs

# The extra of setup.py that provides each optional top-level module.
EXTRA_OF = {
    "tensorflow": "tfds",
    "tensorflow_datasets": "tfds",
    "torch": "torch",
    "torchvision": "torch",
}


def install_hint(extra: str) -> str:
    """The pip command that installs `extra` (from PyPI or from a clone of the repository)."""
    return f"pip install 'bow_jax[{extra}]' (or, in a clone: pip install -e '.[{extra}]')"


def require(module_name: str, extra: str = "", purpose: str = "") -> types.ModuleType:
    """Imports and returns `module_name` (e.g. 'tensorflow', 'tensorflow_datasets', 'torch').

    `extra`: the setup.py extra providing it (default: EXTRA_OF of its top-level package);
    `purpose`: what needs it, for the message (e.g. "config.data.source='tfds'").
    Raises ImportError naming the module, the purpose and the pip command when the module itself
    is not installed; any other import failure (a broken install of one of its own dependencies)
    propagates unchanged. The import runs under `logs.quiet_native_stderr()`: TensorFlow prints
    C++ banners at import that no log level reaches.
    """
    top = module_name.split(".")[0]
    extra = extra or EXTRA_OF.get(top, "")
    try:
        with logs.quiet_native_stderr():
            return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        need = f" ({purpose} needs it)" if purpose else ""
        fix = f"; install it with: {install_hint(extra)}" if extra else ""
        raise ImportError(f"{module_name} is not installed{need}{fix}.", name=module_name) from e
