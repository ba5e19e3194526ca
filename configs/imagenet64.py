"""ImageNet 64x64 class-conditional ADM (the paper's Table 11 column; 296M parameters).

FID-table row: ADM (dropout), 250 ancestral steps, no guidance: FID 2.07.
The paper code's README also samples it with classifier_scale 1.0 and classifier64.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train --config=configs/imagenet64.py --workdir=/path/to/workdir
Convert the released checkpoint (`64x64_diffusion.pt`):
  python -m launch.convert_checkpoint --config=configs/imagenet64.py \
    --torch_checkpoint=64x64_diffusion.pt --output=/path/to/imagenet64_converted
Variants: `--config=configs/imagenet64.py:tiny` (CPU-sized network and run),
  `:guided` (250 steps guided by classifier64 at scale 1.0, the README's command).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny', 'guided')."""
    config = families.adm(
        64,
        540_000,
        num_channels=192,
        num_res_blocks=3,
        use_new_attention_order=True,
        dropout=0.1,
        noise_schedule="cosine",
        lr=3e-4,
        batch_size=2048,
    )
    rows = {"guided": families.guided_sampling(64, 1.0)}
    return variants.apply_variant(config, arg, rows)
