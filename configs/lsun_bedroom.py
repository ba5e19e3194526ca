"""LSUN bedroom 256x256 unconditional ADM (Table 11 LSUN column; 552M parameters).

FID-table row: ADM (dropout), 1000 ancestral steps, unconditional: FID 1.90.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/lsun_bedroom.py --workdir=/path/to/workdir
Convert the released checkpoint (`lsun_bedroom.pt`):
  python -m launch.convert_checkpoint --config=configs/lsun_bedroom.py \
    --torch_checkpoint=lsun_bedroom.pt --output=/path/to/lsun_bedroom_converted
Variants: `--config=configs/lsun_bedroom.py:tiny` (CPU-sized network and run).
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
    model.dropout = 0.1
    model.num_classes = None
    model.learn_sigma = True

    diffusion = config.diffusion
    diffusion.steps = 1000
    diffusion.learn_sigma = True
    diffusion.noise_schedule = "linear"

    data = config.data
    data.dataset = "lsun/bedroom"
    data.image_size = 256
    data.class_cond = False

    config.optim.lr = 0.0001
    config.optim.weight_decay = 0.0
    config.training.batch_size = 256
    config.training.num_steps = 500000
    config.training.ema_rates = (0.9999,)

    sampling = config.sampling
    sampling.method = "ancestral"
    sampling.timestep_respacing = 1000
    sampling.classifier_scale = 0.0
    sampling.classifier_config = ""
    return variants.apply_variant(config, arg)
