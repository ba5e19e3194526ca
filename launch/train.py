"""Trains a diffusion model or upsampler of the paper from a config.

  python -m launch.train --config=configs/imagenet128.py --workdir=DIR
  python -m launch.train --config=configs/upsample64_256.py --workdir=DIR
  python -m launch.train --config=configs/imagenet256.py --workdir=DIR \
    --config.data.dataset=folder --config.data.data_dir=IMAGES \
    --config.training.init_from=ckpt/imagenet256            # fine-tune a released model

Running the same command again resumes from DIR's latest complete checkpoint. Several
processes (GPU clusters): add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on each (not needed on TPU pods or SLURM).
"""

import signal
import threading

from absl import flags, logging

from launch import common, distributed

_CONFIG = common.define_config_flag("The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["workdir"])


def run(argv: list[str], trainer: str) -> None:
    """Starts the processes, then `diffusion_jax.training.<trainer>(config, workdir)`."""
    logging.set_verbosity(logging.INFO)
    distributed.initialize()  # before any jax computation
    from diffusion_jax import training

    stop = threading.Event()  # preemption: checkpoint and stop at the next step

    def on_sigterm(signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint and stopping.")
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        getattr(training, trainer)(_CONFIG.value, _WORKDIR.value, stop=stop)
    except training.NonFiniteError as e:
        common.fail(str(e))


def main(argv: list[str]) -> None:
    run(argv, "train")


if __name__ == "__main__":
    common.run_main(main)
