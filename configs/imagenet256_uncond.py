"""ImageNet 256x256 unconditional ADM (553M parameters; `256x256_diffusion_uncond.pt`).

Sampling as the paper code's README: 250 ancestral steps guided by classifier256 at scale 10.0.
Training settings as imagenet256 (the paper's appendix gives no separate column).
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet256_uncond.py --workdir=/path/to/workdir
Convert the released checkpoint (`256x256_diffusion_uncond.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet256_uncond.py \
    --torch_checkpoint=256x256_diffusion_uncond.pt --output=/path/to/imagenet256_uncond_converted
Variants: `--config=configs/imagenet256_uncond.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    config = families.adm(256, 1_980_000, num_classes=None, classifier_scale=10.0)
    return variants.apply_variant(config, arg)
