"""ImageNet 256x256 class-conditional ADM (Table 11; 554M parameters).

FID-table row: ADM-G, 250 ancestral steps, classifier scale 1.0: FID 4.59.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet256.py --workdir=/path/to/workdir
Convert the released checkpoint (`256x256_diffusion.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet256.py \
    --torch_checkpoint=256x256_diffusion.pt --output=/path/to/imagenet256_converted
Variants: `--config=configs/imagenet256.py:tiny` (CPU-sized network and run),
  `:ddim25` (ADM-G, DDIM 25 steps, scale 2.5: FID 5.44),
  `:unguided` (ADM, 250 steps, no guidance: FID 10.94).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny', 'ddim25', 'unguided')."""
    config = families.adm(256, 1_980_000, classifier_scale=1.0)
    rows = {
        "ddim25": {"method": "ddim", "timestep_respacing": 25, "classifier_scale": 2.5},
        "unguided": {"classifier_scale": 0.0},
    }
    return variants.apply_variant(config, arg, rows)
