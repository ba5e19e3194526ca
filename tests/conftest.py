"""Test-wide setup: 8 fake CPU devices, float32 by default, the `x64` fixture."""

import os

# Must happen before jax is imported anywhere: the suite runs on 8 fake CPU devices
# so sharded code paths are exercised exactly as on an 8-accelerator host.
# LLVM optimisation level 1 (XLA's default is 3): compiling dominates this suite's time
# on a CPU, and level 1 compiles a tiny UNet train step in 26% less CPU time while its
# steps run 10% slower (bench/RESULTS.md, "The suite's compile flags"). Results are
# compared within the suite's runs and with tolerances, never with level-3 constants.
os.environ["XLA_FLAGS"] = (
    "--xla_backend_optimization_level=1 "  # a level already in XLA_FLAGS comes later: it wins
    + os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, inherited by the launcher
# subprocesses: the end-to-end tests compile the same programs in several processes
# (uninterrupted vs killed-and-resumed runs), which then compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffusion_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Keep TensorFlow (used only by the tfds data path) quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# TensorFlow (tfds test paths) imported before torchvision segfaults the process
# (conflicting bundled native libraries); loading torch/torchvision first is safe, so
# the suite fixes that order here, before any test module imports either.
try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # the parity-test dependencies are optional for the library
    pass

import jax
import pytest

# The suite runs in JAX's default mode (float32, int32), the one users run; float64 is
# switched on only where a test asks for it (below).


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (`jax.enable_x64`), for float64-tight parity
    tests against the float64 reference. Use it per test or per module:
    `pytestmark = pytest.mark.usefixtures("x64")`.

    The switch is a context manager (thread-local) and part of jit's cache key, so
    functions compiled inside the test are recompiled, not reused, in float32 outside.
    """
    with jax.enable_x64(True):
        yield


# The longest files first: the suite runs on two workers file by file (pyproject's
# `-n 2 --dist loadfile`), and a long file started last would run alone at the end.
_LONGEST_FIRST = (
    "test_quickstart.py",
    "test_training_e2e.py",
    "test_fid_table.py",
    "test_training_features.py",
    "test_sampling_e2e.py",
    "test_training_learning.py",
    "test_sweep.py",
    "test_training_steps.py",
    "test_evaluation_launchers.py",
    "test_sampling_job.py",
)


def pytest_collection_modifyitems(config, items):
    del config
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept
