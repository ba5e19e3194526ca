"""ImageNet 512x512 class-conditional ADM (Table 11; 559M parameters).

FID-table row: ADM-G, 250 ancestral steps, classifier scale 4.0: FID 7.72.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet512.py --workdir=/path/to/workdir
Convert the released checkpoint (`512x512_diffusion.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet512.py \
    --torch_checkpoint=512x512_diffusion.pt --output=/path/to/imagenet512_converted
Variants: `--config=configs/imagenet512.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    config = families.adm(512, 1_940_000, classifier_scale=4.0)
    return variants.apply_variant(config, arg)
