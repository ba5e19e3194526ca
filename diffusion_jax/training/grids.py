"""Sample grids and sharded sampling during training (EMA samples, in-training FID)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import parallel


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounded as the paper code's sample script."""
    return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 [N, H, W, C] images into one [rows*(H+pad)+pad, ..., C] grid image."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def write_png(path: epath.PathLike, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] image as PNG (through a temporary file, then rename)."""
    from PIL import Image

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    with tmp.open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    tmp.replace(path)


# Moved to the ground floor (parallel.py) so sampling jobs share them; kept as names here.
global_rows = parallel.global_rows
local_rows = parallel.local_rows


@functools.partial(jax.jit, static_argnames=("sample_fn", "image_shape"))
def _sample(params, key_data, kwargs, *, sample_fn, image_shape):
    keys = jax.random.wrap_key_data(key_data)
    return sample_fn(params, keys, kwargs, image_shape)


def sample_sharded(
    sample_fn: Any,
    params: Any,
    key_data: np.ndarray,
    kwargs: dict[str, np.ndarray],
    image_shape: tuple[int, ...],
    mesh: Mesh,
) -> np.ndarray:
    """Runs `sample_fn(params, keys [N], kwargs, image_shape)` sharded over the mesh.

    Every process passes the same `key_data` ([N, 2] uint32, one key per sample) and
    `kwargs` ([N, ...] each); N must divide over the devices. Returns this process's rows
    of the [N, H, W, C] result in global order (all rows with one process).
    """
    keys = global_rows(np.asarray(key_data), mesh)
    kw = {k: global_rows(np.asarray(v), mesh) for k, v in kwargs.items()}
    out = _sample(params, keys, kw, sample_fn=sample_fn, image_shape=tuple(image_shape))
    return local_rows(out)


def sample_keys(base_key: jax.Array, purpose: int, indices: np.ndarray) -> np.ndarray:
    """Key data [N, 2] of `fold_in(fold_in(base_key, purpose), i)` for each global index i."""
    key = jax.random.fold_in(base_key, purpose)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))
    return np.asarray(jax.random.key_data(keys))
