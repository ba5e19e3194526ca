"""Test-wide setup: 8 fake CPU devices, float64 available, shared fixtures."""

import os

# Must happen before jax is imported anywhere: the suite runs on 8 fake CPU devices
# so sharded code paths are exercised exactly as on an 8-accelerator host.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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

# Parity tests compare against the float64 reference; model code picks its dtype
# explicitly, so enabling x64 does not change what the library computes in float32.
jax.config.update("jax_enable_x64", True)
