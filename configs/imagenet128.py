"""ImageNet 128x128 class-conditional ADM (Table 11; 422M parameters; 4 heads everywhere).

FID-table row: ADM-G, 250 ancestral steps, classifier scale 0.5: FID 2.97.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet128.py --workdir=/path/to/workdir
Convert the released checkpoint (`128x128_diffusion.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet128.py \
    --torch_checkpoint=128x128_diffusion.pt --output=/path/to/imagenet128_converted
Variants: `--config=configs/imagenet128.py:tiny` (CPU-sized network and run),
  `:ddim25` (ADM-G, DDIM 25 steps, scale 1.25: FID 5.98),
  `:unguided` (ADM, 250 steps, no guidance: FID 5.91).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny', 'ddim25', 'unguided')."""
    config = families.adm(128, 4_360_000, num_head_channels=-1, classifier_scale=0.5)
    rows = {
        "ddim25": {"method": "ddim", "timestep_respacing": 25, "classifier_scale": 1.25},
        "unguided": {"classifier_scale": 0.0},
    }
    return variants.apply_variant(config, arg, rows)
