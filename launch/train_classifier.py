"""Trains a noise-aware classifier of the paper (for classifier guidance) from a config.

  python -m launch.train_classifier --config=configs/classifier128.py --workdir=DIR

Running the same command again resumes from DIR's latest complete checkpoint. Several
processes (GPU clusters): add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on each (not needed on TPU pods or SLURM). Flags as `launch.train`.
"""

from launch import common
from launch import train as train_launcher  # defines --config, --workdir and the run


def main(argv: list[str]) -> None:
    train_launcher.run(argv, "train_classifier")


if __name__ == "__main__":
    common.run_main(main)
