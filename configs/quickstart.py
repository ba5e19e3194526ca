"""Quickstart: a tiny class-conditional diffusion model on the built-in `mnist_5k` (32x32).

Runs end to end on a laptop CPU in minutes; nothing to download.
Launch:
  python -m launch.train --config=configs/quickstart.py --workdir=/tmp/quickstart
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the quickstart config (`arg` is accepted and must be empty)."""
    if arg:
        raise ValueError(f"configs/quickstart.py takes no variant, got {arg!r}.")
    config = base.get_base_config()
    model = config.model
    model.image_size = 32
    model.num_channels = 32
    model.num_res_blocks = 1
    model.channel_mult = (1, 2, 2)
    model.attention_resolutions = (8,)
    model.num_heads = 2
    model.resblock_updown = True
    model.num_classes = 10
    model.learn_sigma = True

    diffusion = config.diffusion
    diffusion.learn_sigma = True
    diffusion.noise_schedule = "cosine"

    data = config.data
    data.image_size = 32
    data.class_cond = True
    data.random_flip = False  # digits are not mirror-symmetric

    config.optim.lr = 3e-4
    training = config.training
    training.num_steps = 2000
    training.batch_size = 64
    training.ema_rates = (0.999,)
    training.log_every = 50
    training.checkpoint_every = 500

    sampling = config.sampling
    sampling.num_samples = 64
    sampling.batch_size = 64
    sampling.method = "ddim"
    sampling.timestep_respacing = 50
    return config
