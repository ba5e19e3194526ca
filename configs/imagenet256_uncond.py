"""ImageNet 256x256 unconditional ADM (553M parameters; `256x256_diffusion_uncond.pt`).

Sampling as the paper code's README: 250 ancestral steps guided by classifier256 at scale 10.0.
Training settings as imagenet256 (the paper's appendix gives no separate column).
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet256_uncond.py --workdir=/path/to/workdir
Convert the released checkpoint (`256x256_diffusion_uncond.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet256_uncond.py \
    --torch_checkpoint=256x256_diffusion_uncond.pt --output=/path/to/imagenet256_uncond_converted
Variants: `--config=configs/imagenet256_uncond.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import base, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    config = base.get_base_config()
    model = config.model
    model.kind = "unet"
    model.image_size = 256
    model.num_channels = 256
    model.num_res_blocks = 2
    model.attention_resolutions = (32, 16, 8)
    model.channel_mult = ()  # the paper's default for image_size
    model.num_heads = 4  # unused: num_head_channels sets the heads
    model.num_head_channels = 64
    model.num_heads_upsample = -1
    model.use_scale_shift_norm = True
    model.resblock_updown = True
    model.use_new_attention_order = False
    model.dropout = 0.0
    model.num_classes = None
    model.learn_sigma = True

    diffusion = config.diffusion
    diffusion.steps = 1000
    diffusion.learn_sigma = True
    diffusion.noise_schedule = "linear"

    data = config.data
    data.dataset = "imagenet2012"
    data.image_size = 256
    data.class_cond = False

    config.optim.lr = 0.0001
    config.optim.weight_decay = 0.0
    config.training.batch_size = 256
    config.training.num_steps = 1980000
    config.training.ema_rates = (0.9999,)

    sampling = config.sampling
    sampling.method = "ancestral"
    sampling.timestep_respacing = 250
    sampling.classifier_scale = 10.0
    sampling.classifier_config = "configs/classifier256.py"
    return variants.apply_variant(config, arg)
