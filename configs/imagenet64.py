"""ImageNet 64x64 class-conditional ADM (the paper's Table 11 column; 296M parameters).

FID-table row: ADM (dropout), 250 ancestral steps, no guidance: FID 2.07.
The paper code's README also samples it with classifier_scale 1.0 and classifier64.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet64.py --workdir=/path/to/workdir
Convert the released checkpoint (`64x64_diffusion.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet64.py \
    --torch_checkpoint=64x64_diffusion.pt --output=/path/to/imagenet64_converted
Variants: `--config=configs/imagenet64.py:tiny` (CPU-sized network and run),
  `:guided` (250 steps guided by classifier64 at scale 1.0, the README's command).
"""

import ml_collections

from configs import base, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny', 'guided')."""
    config = base.get_base_config()
    model = config.model
    model.kind = "unet"
    model.image_size = 64
    model.num_channels = 192
    model.num_res_blocks = 3
    model.attention_resolutions = (32, 16, 8)
    model.channel_mult = ()  # the paper's default for image_size
    model.num_heads = 4  # unused: num_head_channels sets the heads
    model.num_head_channels = 64
    model.num_heads_upsample = -1
    model.use_scale_shift_norm = True
    model.resblock_updown = True
    model.use_new_attention_order = True
    model.dropout = 0.1
    model.num_classes = 1000
    model.learn_sigma = True

    diffusion = config.diffusion
    diffusion.steps = 1000
    diffusion.learn_sigma = True
    diffusion.noise_schedule = "cosine"

    data = config.data
    data.dataset = "imagenet2012"
    data.image_size = 64
    data.class_cond = True

    config.optim.lr = 0.0003
    config.optim.weight_decay = 0.0
    config.training.batch_size = 2048
    config.training.num_steps = 540000
    config.training.ema_rates = (0.9999,)

    sampling = config.sampling
    sampling.method = "ancestral"
    sampling.timestep_respacing = 250
    sampling.classifier_scale = 0.0
    sampling.classifier_config = ""
    rows = {
        "guided": {"classifier_scale": 1.0, "classifier_config": "configs/classifier64.py"},
    }
    return variants.apply_variant(config, arg, rows)
