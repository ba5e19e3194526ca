"""The quickstart's likelihood baseline: independent per-dimension categorical models.

Each of the H*W*C dimensions gets its own categorical distribution over the 256
intensity levels, fitted on the training images (counts plus `alpha` pseudo-counts per
level, so a level never seen on the training images still has a finite cost). It
ignores every dependency between pixels, so a generative model that learns anything
about digits' shapes must beat it. Its bits/dim are directly comparable with
`calc_bpd_loop`'s: both are -log2 p(x) / (H*W*C) of the same uint8 images.
"""

from __future__ import annotations

import numpy as np


def fit_categorical(images: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """Fits per-dimension categoricals.

    Args:
      images: uint8 [N, H, W, C] training images.
      alpha: pseudo-count added to every level of every dimension.

    Returns:
      log2-probabilities [H*W*C, 256].
    """
    flat = np.asarray(images, np.uint8).reshape(len(images), -1)  # [N, D]
    d = flat.shape[1]
    counts = np.full((d, 256), float(alpha))
    np.add.at(counts, (np.broadcast_to(np.arange(d), flat.shape), flat), 1.0)
    return np.log2(counts / counts.sum(axis=1, keepdims=True))


def categorical_bpd(log2_probs: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Bits/dim of each image under `fit_categorical`'s model.

    Args:
      log2_probs: [D, 256] from `fit_categorical`.
      images: uint8 [N, H, W, C] with H*W*C == D.

    Returns:
      float [N]: -log2 p(image) / D.
    """
    flat = np.asarray(images, np.uint8).reshape(len(images), -1)
    if flat.shape[1] != log2_probs.shape[0]:
        raise ValueError(
            f"images have {flat.shape[1]} dimensions, the baseline was fitted on "
            f"{log2_probs.shape[0]}."
        )
    return -log2_probs[np.arange(flat.shape[1])[None, :], flat].mean(axis=1)


__all__ = ["categorical_bpd", "fit_categorical"]
