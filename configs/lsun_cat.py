"""LSUN cat 256x256 unconditional ADM (Table 11 LSUN column; 552M parameters).

FID-table row: ADM (dropout), 1000 ancestral steps, unconditional: FID 5.57.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/lsun_cat.py --workdir=/path/to/workdir
Convert the released checkpoint (`lsun_cat.pt`):
  python -m launch.convert_checkpoint --config=configs/lsun_cat.py \
    --torch_checkpoint=lsun_cat.pt --output=/path/to/lsun_cat_converted
Variants: `--config=configs/lsun_cat.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    return variants.apply_variant(families.lsun("cat", 200_000), arg)
