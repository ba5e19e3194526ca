"""Noise-aware ImageNet 64x64 classifier for guidance (65M parameters).

The UNet's encoder half with attention pooling, trained on x_t at uniformly drawn t
with imagenet64's noise schedule. The paper code anneals the learning rate
linearly to zero (`optim.anneal_lr`); its AdamW uses `optim.weight_decay`;
it keeps no EMA of the weights.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train_classifier --config=configs/classifier64.py --workdir=/path/to/workdir
Convert the released checkpoint (`64x64_classifier.pt`):
  python -m launch.convert_checkpoint --config=configs/classifier64.py \
    --torch_checkpoint=64x64_classifier.pt --output=/path/to/classifier64_converted
Variants: `--config=configs/classifier64.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    config = families.classifier(
        64,
        300_000,
        num_res_blocks=4,
        noise_schedule="cosine",
        lr=6e-4,
        weight_decay=0.2,
        batch_size=1024,
    )
    return variants.apply_variant(config, arg)
