"""ImageNet 256x256 class-conditional ADM (Table 11; 554M parameters).

FID-table row: ADM-G, 250 ancestral steps, classifier scale 1.0: FID 4.59.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet256.py --workdir=/path/to/workdir
Convert the released checkpoint (`256x256_diffusion.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet256.py \
    --torch_checkpoint=256x256_diffusion.pt --output=/path/to/imagenet256_converted
Variants: `--config=configs/imagenet256.py:tiny` (CPU-sized network and run),
  `:ddim25` (ADM-G, DDIM 25 steps, scale 2.5: FID 5.44),
  `:unguided` (ADM, 250 steps, no guidance: FID 10.94).
"""

import ml_collections

from configs import base, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny', 'ddim25', 'unguided')."""
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
    model.num_classes = 1000
    model.learn_sigma = True

    diffusion = config.diffusion
    diffusion.steps = 1000
    diffusion.learn_sigma = True
    diffusion.noise_schedule = "linear"

    data = config.data
    data.dataset = "imagenet2012"
    data.image_size = 256
    data.class_cond = True

    config.optim.lr = 0.0001
    config.optim.weight_decay = 0.0
    config.training.batch_size = 256
    config.training.num_steps = 1980000
    config.training.ema_rates = (0.9999,)

    sampling = config.sampling
    sampling.method = "ancestral"
    sampling.timestep_respacing = 250
    sampling.classifier_scale = 1.0
    sampling.classifier_config = "configs/classifier256.py"

    rows = {
        "ddim25": {"method": "ddim", "timestep_respacing": 25, "classifier_scale": 2.5},
        "unguided": {"classifier_scale": 0.0},
    }
    return variants.apply_variant(config, arg, rows)
