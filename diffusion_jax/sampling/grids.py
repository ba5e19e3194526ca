"""Sample grids (tiling and PNG files): the sampling job's and the training loops'."""

from __future__ import annotations

import numpy as np
from etils import epath

from diffusion_jax import files


def make_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tiles uint8 [N, H, W, C] images into one [rows*(H+pad)+pad, ..., C] grid image."""
    n, h, w, c = images.shape
    columns = int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def write_png(path: epath.PathLike, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] image (C = 3, or 1: grey) as PNG, atomically."""
    from PIL import Image

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path, "wb") as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")
