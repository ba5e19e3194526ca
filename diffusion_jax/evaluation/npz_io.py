"""Reading the paper's `.npz` image batches: validated, streamed, with optional statistics.

Sample and reference files hold `arr_0` (uint8 `[N, H, W, 3]`) and, for reference batches,
precomputed FID statistics `mu`, `sigma` (pool, 2048-d) and `mu_s`, `sigma_s` (spatial,
2023-d). Images are streamed from the zip member batch by batch (as the paper's evaluator
does), so a 50k x 256 x 256 batch never has to fit in memory twice.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator

import numpy as np
from etils import epath

from diffusion_jax.evaluation.features import check_images

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass(frozen=True)
class ImageNpz:
    """An image batch file: its path, the header of `arr_0` and the members it holds."""

    path: epath.Path
    shape: tuple[int, ...]
    dtype: np.dtype
    members: tuple[str, ...]

    @property
    def num_images(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yields `[<=batch_size, H, W, 3]` uint8 batches of `arr_0` in file order."""
        with self.path.open("rb") as f, zipfile.ZipFile(f) as zf, zf.open(f"{IMAGES_KEY}.npy") as m:
            header = _read_header(m)
            if header is None or header[1] or header[2].hasobject:
                # Not a plain C-order buffer we can stream: load the array whole.
                m.close()
                yield from _chunks(self._load_member(IMAGES_KEY), batch_size)
                return
            shape, _, dtype = header
            per_image = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = m.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(f"{self.path}: {IMAGES_KEY} is truncated (corrupt file).")
                yield np.frombuffer(data, dtype).reshape(n, *shape[1:])

    def read_images(self) -> np.ndarray:
        """Returns all of `arr_0` (validated uint8)."""
        return check_images(self._load_member(IMAGES_KEY), f"{self.path}:{IMAGES_KEY}")

    def read_statistics(self) -> dict[str, np.ndarray] | None:
        """Returns the precomputed `mu`, `sigma`, `mu_s`, `sigma_s` (float64), or None.

        Raises:
          ValueError: if only some of the four are present.
        """
        present = [k for k in STAT_KEYS if k in self.members]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            missing = sorted(set(STAT_KEYS) - set(present))
            raise ValueError(
                f"{self.path} has FID statistics {present} but lacks {missing}; a reference "
                "batch needs all of mu, sigma, mu_s, sigma_s (rebuild it with make_reference)."
            )
        return {k: np.asarray(self._load_member(k), np.float64) for k in STAT_KEYS}

    def _load_member(self, key: str) -> np.ndarray:
        with self.path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            return data[key]


def _read_header(member) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """`(shape, fortran_order, dtype)` of an open .npy member (None: unknown format version)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    return None


def _chunks(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def open_image_npz(path: str | epath.PathLike) -> ImageNpz:
    """Opens and validates an image batch file without reading the images.

    Args:
      path: a `.npz` with `arr_0` uint8 `[N, H, W, 3]` (the paper's sample/reference layout).

    Returns:
      An `ImageNpz` describing the file.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if it is not a readable npz, lacks `arr_0`, or `arr_0` is not uint8
        NHWC RGB images (the message names the file and what to change).
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Image batch {path} does not exist.")
    try:
        with path.open("rb") as f, zipfile.ZipFile(f) as zf:
            members = tuple(n.removesuffix(".npy") for n in zf.namelist())
            if IMAGES_KEY not in members:
                raise ValueError(
                    f"{path} has no '{IMAGES_KEY}' array (it has {list(members)}); sample files "
                    f"store images as np.savez(path, images) so they land in '{IMAGES_KEY}'."
                )
            with zf.open(f"{IMAGES_KEY}.npy") as m:
                header = _read_header(m)
            if header is None:
                with path.open("rb") as f2, np.load(f2, allow_pickle=False) as data:
                    arr = data[IMAGES_KEY]
                header = (arr.shape, False, arr.dtype)
            shape, _, dtype = header
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file (corrupt or truncated?): {e}") from e
    npz = ImageNpz(path=path, shape=tuple(shape), dtype=np.dtype(dtype), members=members)
    name = f"{path}:{IMAGES_KEY}"
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{name} must be uint8 images [N, H, W, 3] (NHWC, RGB); got shape {shape}."
        )
    if npz.dtype != np.uint8:
        # Read one batch to say which range the values are in and how to convert them.
        check_images(next(npz.iter_batches(256)), name)
    return npz
