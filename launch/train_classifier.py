"""Trains a noise-aware classifier of the paper (for classifier guidance) from a config.

  python -m launch.train_classifier --config=configs/classifier128.py --workdir=DIR

Running the same command again resumes from DIR's latest complete checkpoint. Several
processes (GPU clusters): add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on each (not needed on TPU pods or SLURM).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    try:
        distributed.initialize()
        from diffusion_jax.training import train_classifier

        train_classifier(_CONFIG.value, _WORKDIR.value)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")  # bad input: one line naming the field and the fix


if __name__ == "__main__":
    app.run(main)
