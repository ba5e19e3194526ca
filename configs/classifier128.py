"""Noise-aware ImageNet 128x128 classifier for guidance (43M parameters).

The UNet's encoder half with attention pooling, trained on x_t at uniformly drawn t
with imagenet128's noise schedule. The paper code anneals the learning rate
linearly to zero (`optim.anneal_lr`); its AdamW uses `optim.weight_decay`;
it keeps no EMA of the weights.
Launch (training from scratch, the paper used V100s; plan for a pod):
  python -m launch.train_classifier --config=configs/classifier128.py --workdir=/path/to/workdir
Convert the released checkpoint (`128x128_classifier.pt`):
  python -m launch.convert_checkpoint --config=configs/classifier128.py \
    --torch_checkpoint=128x128_classifier.pt --output=/path/to/classifier128_converted
Variants: `--config=configs/classifier128.py:tiny` (CPU-sized network and run).
"""

import ml_collections

from configs import families, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg` picks a variant (None, 'tiny')."""
    return variants.apply_variant(families.classifier(128, 300_000), arg)
