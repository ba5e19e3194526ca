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

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    return variants.apply_variant(families.lsun("bedroom", 500_000), arg)
