"""The main job: zero to classifier-guided samples in one command, on a laptop CPU.

  python -m launch.quickstart                        # writes quickstart_out/
  python -m launch.quickstart --workdir=DIR --config.training.num_steps=2000

Trains a small class-conditional diffusion model, a noise-aware classifier and a clean
classifier on the built-in mnist_5k digits, samples with and without classifier
guidance, and writes DIR/summary.md with bits/dim, classifier accuracy per t-quartile
and how often the samples are recognised as the requested digit, beside PNG grids,
loss curves and samples_*.npz. About 15 minutes on 2 CPU cores; a GPU or TPU is used
when present (and then trains longer). Running it again with the same workdir reuses
what is finished and resumes the rest. The config is configs/quickstart.py (every
field can be overridden with --config.<field>=value).
"""

import os
import pathlib

from absl import flags, logging

from launch import common

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "quickstart.py")
_CONFIG = common.define_config_flag("The job's config.", default=_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", "quickstart_out", "Where everything is written.")


def main(argv: list[str]) -> None:
    import jax

    _split_the_cpu(jax, _CONFIG.value.quickstart.get("cpu_devices", 1))
    jax.devices()  # start the backend quietly: a bad input's error stays the only line
    logging.set_verbosity(logging.INFO)  # phases, steps/s, images/s, ETA
    from diffusion_jax import quickstart

    quickstart.run_quickstart(_CONFIG.value, _WORKDIR.value)
    print(f"wrote {_WORKDIR.value}/summary.md")


def _split_the_cpu(jax, count) -> None:
    """On a CPU host, `quickstart.cpu_devices` host devices (the batches split over them:
    1.5x the steps/s of one device on 2 cores), unless the user chose a device count."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"quickstart.cpu_devices={count!r}: must be an integer >= 1.")
    env = os.environ
    chosen = "device_count" in env.get("XLA_FLAGS", "") or "JAX_NUM_CPU_DEVICES" in env
    if count > 1 and not chosen and jax.config.jax_num_cpu_devices in (-1, None):
        jax.config.update("jax_num_cpu_devices", count)


if __name__ == "__main__":
    common.run_main(main)
