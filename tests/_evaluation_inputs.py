"""Evaluator inputs for end-to-end tests: random FID Inception weights and a reference batch.

`write_random_inception(directory)` saves pytorch-fid's Inception-v3 with random weights
(`test_inception.build_random_fid_inception`) as a `.pth`, as the released weights
file is laid out, converts it to `.npz` (quicker to load) and returns that path;
`write_reference(path)` saves smooth random 16x16 "photos" as a reference batch of
images only, so the evaluator computes (and caches) its statistics.
"""

from __future__ import annotations

import pathlib

import numpy as np


def write_random_inception(directory: pathlib.Path, seed: int = 1) -> pathlib.Path:
    """Random-weights FID Inception as DIR/w.pth and DIR/w.npz; returns the .npz."""
    import torch
    from test_inception import build_random_fid_inception

    from diffusion_jax import evaluation

    torch.save(build_random_fid_inception(seed=seed).state_dict(), directory / "w.pth")
    evaluation.save_inception_npz(directory / "w.pth", directory / "w.npz")
    return directory / "w.npz"


def write_reference(path: pathlib.Path, num_images: int = 24, size: int = 16, seed: int = 0):
    """A reference batch of `num_images` smooth `size`x`size` images (no statistics)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (num_images, size // 4, size // 4, 3))
    np.savez(path, coarse.repeat(4, 1).repeat(4, 2).astype(np.uint8))
    return path
