"""LSUN horse 256x256 unconditional ADM (Table 11 LSUN column; 552M parameters).

FID-table row: ADM (dropout), 1000 ancestral steps, unconditional: FID 2.57.
`lsun_horse_nodropout.pt` is this config with `--config.model.dropout=0.0`.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/lsun_horse.py --workdir=/path/to/workdir
Convert the released checkpoint (`lsun_horse.pt`):
  python -m launch.convert_checkpoint --config=configs/lsun_horse.py \
    --torch_checkpoint=lsun_horse.pt --output=/path/to/lsun_horse_converted
Variants: `--config=configs/lsun_horse.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    return variants.apply_variant(families.lsun("horse", 250_000), arg)
