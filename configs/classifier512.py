"""Noise-aware ImageNet 512x512 classifier for guidance (54M parameters).

The UNet's encoder half with attention pooling, trained on x_t at uniformly drawn t
with imagenet512's noise schedule. The paper code anneals the learning rate
linearly to zero (`optim.anneal_lr`); its AdamW uses `optim.weight_decay`;
it keeps no EMA of the weights.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train_classifier --config=configs/classifier512.py --workdir=/path/to/workdir
Convert the released checkpoint (`512x512_classifier.pt`):
  python -m launch.convert_checkpoint --config=configs/classifier512.py \
    --torch_checkpoint=512x512_classifier.pt --output=/path/to/classifier512_converted
Variants: `--config=configs/classifier512.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import base, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    config = base.get_base_config()
    model = config.model
    model.kind = "classifier"
    model.image_size = 512
    model.num_channels = 128  # the paper's classifier_width
    model.num_res_blocks = 2  # the paper's classifier_depth
    model.attention_resolutions = (32, 16, 8)
    model.channel_mult = ()  # the paper's default for image_size
    model.num_heads = 1  # unused: num_head_channels sets the heads
    model.num_head_channels = 64
    model.use_scale_shift_norm = True
    model.resblock_updown = True
    model.use_new_attention_order = False
    model.dropout = 0.0
    model.num_classes = 1000  # logits
    model.learn_sigma = False
    model.pool = "attention"

    diffusion = config.diffusion
    diffusion.steps = 1000
    diffusion.learn_sigma = False
    diffusion.noise_schedule = "linear"

    data = config.data
    data.dataset = "imagenet2012"
    data.image_size = 512
    data.class_cond = True

    config.optim.lr = 0.0003
    config.optim.weight_decay = 0.05
    config.training.batch_size = 256
    config.training.num_steps = 500000
    config.optim.anneal_lr = True
    config.training.ema_rates = ()
    return variants.apply_variant(config, arg)
