"""Trains a noise-aware classifier of the paper (for classifier guidance) from a config.

  python -m launch.train_classifier --config=configs/classifier128.py --workdir=DIR

Running the same command again resumes from DIR's latest complete checkpoint. Several
processes (GPU clusters): add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on each (not needed on TPU pods or SLURM).
"""

from absl import flags, logging

from launch import common, distributed

_CONFIG = common.define_config_flag("The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    common.check_no_arguments(argv)
    logging.set_verbosity(logging.INFO)
    distributed.initialize()  # before any jax computation
    from diffusion_jax import training

    try:
        training.train_classifier(_CONFIG.value, _WORKDIR.value)
    except training.NonFiniteError as e:
        common.fail(str(e))


if __name__ == "__main__":
    common.run_main(main)
