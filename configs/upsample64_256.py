"""ImageNet 64 -> 256 upsampler, ADM-U (312M parameters; 4 heads everywhere).

FID-table row: ADM-G + ADM-U, 250 + 250 steps (base: imagenet64, guided): FID 3.94.
x_t is 256x256; the 64x64 image arrives as `low_res` and is upsampled bilinearly.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/upsample64_256.py --workdir=/path/to/workdir
Convert the released checkpoint (`64_256_upsampler.pt`):
  python -m launch.convert_checkpoint --config=configs/upsample64_256.py \
    --torch_checkpoint=64_256_upsampler.pt --output=/path/to/upsample64_256_converted
Variants: `--config=configs/upsample64_256.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    config = families.upsampler(64, 256, 500_000, num_head_channels=-1)
    return variants.apply_variant(config, arg)
