"""Test set-up: 8 fake CPU devices so every test also exercises the multi-device code path."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

# torchvision imported after TensorFlow can segfault (environment.md); some test modules import
# TensorFlow, so where torchvision is installed it is imported first, here.
if importlib.util.find_spec("torchvision") is not None:
    import torchvision  # noqa: E402,F401  pylint: disable=unused-import

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests exercise numerics, not XLA's optimiser: this cuts CPU compile time a lot.
jax.config.update("jax_disable_most_optimizations", True)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_DIR = SHARED / "data" / "cifar10"


@pytest.fixture(scope="session")
def cifar10_dir():
    """Path of the shared real CIFAR-10 folder; skips the test where it is absent."""
    if not (CIFAR10_DIR / "train.npz").exists():
        pytest.skip("../shared/data/cifar10 not present")
    return CIFAR10_DIR


@pytest.fixture(scope="module")
def persistent_compilation_cache(tmp_path_factory):
    """XLA's persistent compilation cache in a temporary folder for one test module: a module
    whose runs compile the very same programs again (resumed runs, several stages) compiles each
    once. Use with `pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")`."""
    from jax.experimental.compilation_cache import compilation_cache
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    compilation_cache.reset_cache()
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
