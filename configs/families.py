"""Family builders for the paper configs: ADM diffusion models, upsamplers, classifiers.

Each builder starts from `base.get_base_config()` and sets what its whole family shares;
its arguments are what differs between members, with the family's usual value as the
default. A paper config calls one builder with its own values, then applies its variant.
"""

import ml_collections

from configs import base


def guided_sampling(image_size: int, scale: float) -> dict:
    """Sampling fields for classifier guidance by the paper's classifier of that size.

    Args:
      image_size: side of the sampled images; picks `configs/classifier<image_size>.py`.
      scale: the classifier scale.

    Returns:
      A dict of `config.sampling` fields, for `config.sampling.update` or a variant row.
    """
    return {
        "classifier_scale": scale,
        "classifier_config": f"configs/classifier{image_size}.py",
    }


def adm(
    image_size: int,
    num_steps: int,
    *,
    dataset: str = "imagenet2012",
    num_classes: int | None = 1000,
    num_channels: int = 256,
    num_res_blocks: int = 2,
    num_head_channels: int = 64,
    use_new_attention_order: bool = False,
    dropout: float = 0.0,
    noise_schedule: str = "linear",
    lr: float = 1e-4,
    batch_size: int = 256,
    classifier_scale: float = 0.0,
) -> ml_collections.ConfigDict:
    """The ADM diffusion-model family (the paper's Table 11 columns).

    Attention at 32, 16 and 8 pixels, BigGAN up/down-sampling residual blocks,
    learned sigmas, the paper code's channel_mult for `image_size`; sampled with
    250 ancestral steps.

    Args:
      image_size: side of the images (network and data).
      num_steps: training iterations.
      dataset: the data's name (tfds or built-in).
      num_classes: class count for class conditioning; None = unconditional.
      num_channels: base channel count.
      num_res_blocks: residual blocks per resolution.
      num_head_channels: channels per attention head; -1 = `num_heads` (4) heads.
      use_new_attention_order: the paper code's QKV split order.
      dropout: residual-block dropout.
      noise_schedule: 'linear' or 'cosine'.
      lr: learning rate.
      batch_size: global training batch size.
      classifier_scale: guidance scale of the FID-table row; 0 = unguided, otherwise
        guided by `configs/classifier<image_size>.py`.

    Returns:
      The config.
    """
    config = base.get_base_config()
    config.model.update(
        image_size=image_size,
        num_channels=num_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=(32, 16, 8),
        num_head_channels=num_head_channels,  # when != -1, it sets the heads
        resblock_updown=True,
        use_new_attention_order=use_new_attention_order,
        dropout=dropout,
        num_classes=num_classes,
        learn_sigma=True,
    )
    config.diffusion.update(learn_sigma=True, noise_schedule=noise_schedule)
    config.data.update(dataset=dataset, image_size=image_size, class_cond=num_classes is not None)
    config.optim.lr = lr
    config.training.update(batch_size=batch_size, num_steps=num_steps)
    if classifier_scale:
        config.sampling.update(guided_sampling(image_size, classifier_scale))
    return config


def lsun(category: str, num_steps: int) -> ml_collections.ConfigDict:
    """The LSUN family: unconditional 256x256 ADM with dropout, 1000 sampling steps.

    Args:
      category: the LSUN category ('bedroom', 'cat', 'horse'); data is `lsun/<category>`.
      num_steps: training iterations.

    Returns:
      The config.
    """
    config = adm(256, num_steps, dataset=f"lsun/{category}", num_classes=None, dropout=0.1)
    config.data.preprocessing = "lsun"  # datasets/lsun_bedroom.py, then the loader
    config.sampling.timestep_respacing = 1000
    return config


def upsampler(
    low_res_size: int,
    image_size: int,
    num_steps: int,
    *,
    attention_resolutions: tuple[int, ...] = (32, 16, 8),
    num_head_channels: int = 64,
) -> ml_collections.ConfigDict:
    """The ADM-U family: class-conditional ImageNet super-resolution (6 levels, 192 channels).

    Args:
      low_res_size: side of the conditioning image (`batch["low_res"]`).
      image_size: side of the output image x_t.
      num_steps: training iterations.
      attention_resolutions: resolutions (pixels) with self-attention.
      num_head_channels: channels per attention head; -1 = `num_heads` (4) heads.

    Returns:
      The config.
    """
    config = adm(image_size, num_steps, num_channels=192, num_head_channels=num_head_channels)
    config.model.update(
        kind="superres",
        attention_resolutions=attention_resolutions,
        channel_mult=(1, 1, 2, 2, 4, 4),
    )
    config.data.low_res_size = low_res_size
    return config


def classifier(
    image_size: int,
    num_steps: int,
    *,
    num_res_blocks: int = 2,
    noise_schedule: str = "linear",
    lr: float = 3e-4,
    weight_decay: float = 0.05,
    batch_size: int = 256,
) -> ml_collections.ConfigDict:
    """The noise-aware ImageNet classifier family used for guidance.

    The UNet's encoder half (128 channels, attention at 32, 16, 8 with 64-channel
    heads) with attention pooling over 1000 logits. As the paper code, the learning
    rate anneals linearly to zero and no EMA of the weights is kept.

    Args:
      image_size: side of the images (network and data).
      num_steps: training iterations.
      num_res_blocks: residual blocks per resolution (the paper's classifier_depth).
      noise_schedule: the schedule of the diffusion model it guides.
      lr: learning rate.
      weight_decay: AdamW weight decay.
      batch_size: global training batch size.

    Returns:
      The config.
    """
    config = base.get_base_config()
    config.model.update(
        kind="classifier",
        image_size=image_size,
        num_res_blocks=num_res_blocks,
        attention_resolutions=(32, 16, 8),
        num_heads=1,  # unused: num_head_channels sets the heads
        num_head_channels=64,
        resblock_updown=True,
        num_classes=1000,  # logits
    )
    config.diffusion.noise_schedule = noise_schedule
    config.data.update(dataset="imagenet2012", image_size=image_size, class_cond=True)
    config.optim.update(lr=lr, weight_decay=weight_decay, anneal_lr=True)
    config.training.update(batch_size=batch_size, num_steps=num_steps, ema_rates=())
    return config
