"""Sizes a run before it runs: compiled memory per device, FLOPs, time and cost.

  python -m launch.plan --config=configs/imagenet512.py --devices=64 --device_memory_gb=16
  python -m launch.plan --config=configs/imagenet256.py --devices=8 --mfu=0.4

Compiles the config's train step (and its sampling program) for N devices without running
them: on a CPU host N fake devices, on a pod host the real ones. Prints the per-device
memory of the mesh / remat / microbatch variants (which fit `--device_memory_gb`), the
FLOPs per step, and the days of the paper's run and hours of a 50,000-sample FID row at
an MFU (README: Plan a run).
"""

import os

from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = common.define_config_flag("The config to plan.")
_DEVICES = flags.DEFINE_integer("devices", None, "Devices to compile for.")
_MEMORY = flags.DEFINE_float("device_memory_gb", 0.0, "GiB per device (0: the backend's).")
_MFU = flags.DEFINE_float("mfu", None, "Model FLOPs utilisation for the times (default 0.3).")
_PEAK = flags.DEFINE_float("peak_tflops", 782.0, "Peak bf16 TFLOP/s of one device (H200).")
_SAMPLING = flags.DEFINE_bool("sampling", True, "Also compile the sampling program.")
flags.mark_flags_as_required(["devices"])


def main(argv: list[str]) -> None:
    if _DEVICES.value <= 0:
        raise ValueError(f"--devices={_DEVICES.value} must be a positive device count.")
    # A CPU host fakes the devices; read when the backend starts, so set before any use.
    fake = f"--xla_force_host_platform_device_count={_DEVICES.value}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {fake}".strip()
    from diffusion_jax.jobs import plan

    # configs/imagenet64.py:tiny -> imagenet64:tiny
    name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
    name = name.replace(".py", "")
    result = plan.plan(
        _CONFIG.value,
        _DEVICES.value,
        device_memory_gb=_MEMORY.value,
        mfu=plan.ASSUMED_MFU if _MFU.value is None else _MFU.value,
        peak_tflops=_PEAK.value,
        sampling=_SAMPLING.value,
    )
    print(plan.format_plan(name, result), flush=True)


if __name__ == "__main__":
    common.run_main(main)
