"""Small variants of the paper configs, selected by the config argument.

`--config=configs/imagenet64.py:tiny` shrinks the network and the run (same dataset,
same diffusion settings) so the whole pipeline runs in minutes on a CPU;
`:ddim25` switches a guided config to its 25-step DDIM FID-table row.
"""

import ml_collections


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks `config` in place to a CPU-sized model and run; returns it."""
    model = config.model
    large = 32 if model.kind == "superres" else 16
    if model.kind == "superres":
        config.data.low_res_size = large // 4
    config.data.image_size = large
    model.update(
        image_size=large,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(large // 2,),
        dtype="float32",
    )
    if model.num_head_channels != -1:
        model.num_head_channels = 32
    config.training.update(num_steps=20, batch_size=8, log_every=5, checkpoint_every=10)
    config.sampling.update(num_samples=8, batch_size=8, timestep_respacing=10)
    if config.sampling.classifier_config and ":" not in config.sampling.classifier_config:
        config.sampling.classifier_config += ":tiny"  # the guidance classifier shrinks too
    return config


def apply_variant(
    config: ml_collections.ConfigDict, arg: str | None, rows: dict | None = None
) -> ml_collections.ConfigDict:
    """Applies the variant named by the config argument.

    Args:
      config: the full paper config.
      arg: None or '' (paper config), 'tiny', or a key of `rows`.
      rows: extra named sampling variants, name -> {field: value} for config.sampling.

    Returns:
      The modified config.
    """
    rows = rows or {}
    if not arg:
        return config
    if arg == "tiny":
        return shrink_to_tiny(config)
    if arg in rows:
        config.sampling.update(rows[arg])
        return config
    raise ValueError(
        f"unknown config variant {arg!r}: use 'tiny'" + "".join(f", {r!r}" for r in rows) + "."
    )
