"""Reading the paper's `.npz` image batches: validated, streamed, with optional statistics.

Sample and reference files hold `arr_0` (uint8 `[N, H, W, 3]`) and, for reference batches,
precomputed FID statistics `mu`, `sigma` (pool, 2048-d) and `mu_s`, `sigma_s` (spatial,
2023-d). Images are streamed from the zip member batch by batch (as the paper's evaluator
does), so a 50k x 256 x 256 batch never has to fit in memory twice.

Everything a file can get wrong is reported as a `ValueError` naming the file (and the
member, for a damaged one): a partial or misshapen set of statistics when the file is
opened, before any Inception pass; a corrupt member (bad CRC, broken deflate stream,
truncated data) when it is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np
from etils import epath

from diffusion_jax.evaluation.features import check_images
from diffusion_jax.evaluation.inception import POOL_DIM, SPATIAL_DIM

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# Shapes of the statistics in the paper's reference batches.
STAT_SHAPES = {
    "mu": (POOL_DIM,),
    "sigma": (POOL_DIM, POOL_DIM),
    "mu_s": (SPATIAL_DIM,),
    "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
}


class NpzReadError(ValueError):
    """A batch file that cannot be read; the message names the file and the member."""


@contextlib.contextmanager
def _reading(path: epath.Path, member: str | None = None) -> Iterator[None]:
    """Turns low-level read failures inside the block into an `NpzReadError`.

    zipfile raises `BadZipFile` for a bad CRC or header, zlib `zlib.error` for a broken
    deflate stream (`np.savez_compressed`), and numpy `ValueError`/`EOFError` for a
    damaged `.npy` header or short data; none of them says which file it was.
    """
    try:
        yield
    except NpzReadError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        where = f"member '{member}.npy' of {path}" if member else str(path)
        raise NpzReadError(
            f"{where} is corrupt or truncated and cannot be read ({type(e).__name__}: {e}). "
            "Re-create or re-download the file."
        ) from e


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
        """Yields `[<=batch_size, H, W, 3]` uint8 batches of `arr_0` in file order.

        Raises:
          NpzReadError: (a ValueError) if the member is corrupt or truncated; a bad CRC
            is only detectable once the whole member has been read.
        """
        with contextlib.ExitStack() as stack:
            with _reading(self.path, IMAGES_KEY):
                f = stack.enter_context(self.path.open("rb"))
                zf = stack.enter_context(zipfile.ZipFile(f))
                m = stack.enter_context(zf.open(f"{IMAGES_KEY}.npy"))
                header = _read_header(m)
            if header is None or header[1] or header[2].hasobject:
                # Not a plain C-order buffer we can stream: load the array whole.
                stack.close()
                x = self._load_member(IMAGES_KEY)
                yield from (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size))
                return
            shape, _, dtype = header
            per_image = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                with _reading(self.path, IMAGES_KEY):
                    data = m.read(n * per_image)
                    if len(data) != n * per_image:
                        raise EOFError(f"expected {n * per_image} bytes, got {len(data)}")
                yield np.frombuffer(data, dtype).reshape(n, *shape[1:])

    def read_statistics(self) -> dict[str, np.ndarray] | None:
        """Returns the precomputed `mu`, `sigma`, `mu_s`, `sigma_s` (float64), or None.

        `open_image_npz` has already checked that all four (or none) are present with the
        reference batches' shapes.

        Raises:
          ValueError: if only some of the four are present; NpzReadError (a ValueError)
            if a member is corrupt.
        """
        if not _check_statistics(self.path, self.members, {}):
            return None
        stats = {k: np.asarray(self._load_member(k), np.float64) for k in STAT_KEYS}
        check_finite_statistics(stats, self.path)
        return stats

    def _load_member(self, key: str) -> np.ndarray:
        with (
            _reading(self.path, key),
            self.path.open("rb") as f,
            np.load(f, allow_pickle=False) as data,
        ):
            return data[key]


def check_finite_statistics(stats: dict[str, np.ndarray], path: str | epath.PathLike) -> None:
    """Raises ValueError naming `path` if a FID statistic holds NaN or infinity.

    A non-finite mean or covariance makes every FID against it `nan`, printed as if it
    were a result.
    """
    for key in STAT_KEYS:
        if key in stats and not np.all(np.isfinite(stats[key])):
            raise ValueError(
                f"{path}: the FID statistic '{key}' holds NaN or infinite values; rebuild "
                "the file (make_reference for a reference batch) or check its images."
            )


def _check_statistics(
    path: epath.Path, members: tuple[str, ...], shapes: dict[str, tuple[int, ...]]
) -> bool:
    """Whether `members` (names without `.npy`) hold FID statistics; raises, naming `path`,
    if only some, or ones misshapen in `shapes` (read from the headers; others unchecked)."""
    present = [k for k in STAT_KEYS if k in members]
    if not present:
        return False
    if len(present) != len(STAT_KEYS):
        missing = sorted(set(STAT_KEYS) - set(present))
        raise ValueError(
            f"{path} has FID statistics {present} but lacks {missing}; a reference "
            "batch needs all of mu, sigma, mu_s, sigma_s (rebuild it with make_reference)."
        )
    for key, expected in STAT_SHAPES.items():
        if key in shapes and tuple(shapes[key]) != expected:
            raise ValueError(
                f"{path}: '{key}' has shape {tuple(shapes[key])}, but the paper's reference "
                f"batches store {expected} (mu/sigma: {POOL_DIM}-d pool_3 features, "
                f"mu_s/sigma_s: {SPATIAL_DIM}-d spatial features); rebuild it with "
                "make_reference."
            )
    return True


def _read_header(member) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """`(shape, fortran_order, dtype)` of an open .npy member (None: unknown format version)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    return None


def _member_shape_dtype(path: epath.Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of member `key` from its `.npy` header (the data is not read)."""
    with _reading(path, key):
        with path.open("rb") as f, zipfile.ZipFile(f) as zf, zf.open(f"{key}.npy") as m:
            header = _read_header(m)
        if header is None:  # a format version we do not parse: let numpy load it
            with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
                arr = data[key]
            return arr.shape, arr.dtype
        return tuple(header[0]), header[2]


def open_image_npz(path: str | epath.PathLike) -> ImageNpz:
    """An `ImageNpz` describing a validated `.npz` with `arr_0` uint8 `[N, H, W, 3]` (the
    paper's sample/reference layout), without reading the images.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if it is not a readable npz, lacks `arr_0`, `arr_0` is not uint8
        NHWC RGB images, or it holds only some of `mu`, `sigma`, `mu_s`, `sigma_s` or
        misshapen ones (the message names the file and what to change). Checked here,
        so `evaluate_npz` fails before any Inception pass.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Image batch {path} does not exist.")
    try:
        with path.open("rb") as f, zipfile.ZipFile(f) as zf:
            members = tuple(n.removesuffix(".npy") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file (corrupt or truncated?): {e}") from e
    if IMAGES_KEY not in members:
        raise ValueError(
            f"{path} has no '{IMAGES_KEY}' array (it has {list(members)}); sample files "
            f"store images as np.savez(path, images) so they land in '{IMAGES_KEY}'."
        )
    shape, dtype = _member_shape_dtype(path, IMAGES_KEY)
    stat_shapes = {k: _member_shape_dtype(path, k)[0] for k in STAT_KEYS if k in members}
    _check_statistics(path, members, stat_shapes)
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
