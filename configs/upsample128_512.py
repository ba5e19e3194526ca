"""ImageNet 128 -> 512 upsampler, ADM-U (309M parameters; 6 levels, attention at 32, 16).

FID-table row: ADM-G + ADM-U, 250 + 250 steps (base: imagenet128, guided): FID 3.85.
x_t is 512x512; the 128x128 image arrives as `low_res` and is upsampled bilinearly.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/upsample128_512.py --workdir=/path/to/workdir
Convert the released checkpoint (`128_512_upsampler.pt`):
  python -m launch.convert_checkpoint --config=configs/upsample128_512.py \
    --torch_checkpoint=128_512_upsampler.pt --output=/path/to/upsample128_512_converted
Variants: `--config=configs/upsample128_512.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    config = families.upsampler(128, 512, 1_050_000, attention_resolutions=(32, 16))
    return variants.apply_variant(config, arg)
