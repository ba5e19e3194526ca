"""Image preprocessing with the paper code's PIL arithmetic.

The paper's training loader (`image_datasets.py`) preprocesses every image it reads the
same way: halve it with BOX filtering while its short side is at least twice the
target, resize the short side to the target with BICUBIC, then crop (`center_crop_arr`).
ImageNet went through that loader as raw files. LSUN did not: the paper's
`datasets/lsun_bedroom.py` first wrote every LSUN image out already at the target size
(one BOX resize of the short side to the target, then a center crop: `lsun_crop_arr`),
and only those images went through the loader, whose crop is then a no-op. The
`preprocessing` modes below name the two routes (`STANDARD`, `LSUN`; `AUTO` picks by
dataset name).

Reproducing each step operation for operation (same PIL calls, same rounding) is what
makes our FID reference batches and training data match the paper's pixel for pixel;
any "equivalent" resize (antialiased bilinear, tf.image, BICUBIC for LSUN) shifts FID.
"""

from __future__ import annotations

import io
import math
from typing import Protocol

import numpy as np
from PIL import Image


class IntegerRng(Protocol):
    """The part of `numpy.random.Generator` the random crop needs."""

    def integers(self, low: int, high: int) -> int:
        """Returns an integer drawn uniformly from [low, high)."""
        ...


class UnreadableImageError(ValueError):
    """An image file or record that PIL cannot decode (corrupt, truncated, not an image)."""


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decodes image bytes (JPEG, PNG, GIF, ...) into a loaded RGB PIL image, as the paper.

    Raises:
      UnreadableImageError: naming the image `name` (a path or record id) if the bytes
        are not a complete, decodable image.
    """
    try:
        image = Image.open(io.BytesIO(data))
        # load() forces the full decode now, so a truncated file fails here rather
        # than later inside a resize.
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot decode image {name}: {e}") from e


def _resize_short_side(
    pil_image: Image.Image, short_side: int, resample=Image.BICUBIC, halve: bool = True
) -> Image.Image:
    if short_side <= 0:
        raise ValueError(f"image_size must be a positive number of pixels, got {short_side}.")
    # Halving with BOX first is what PIL's `reducing_gap` would do; the paper code does
    # it by hand (its PIL predates the argument), so we do too, to match its pixels.
    while halve and min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = short_side / min(*pil_image.size)
    # Python's round() (banker's rounding) as in the paper code, not np.round/int().
    new_size = tuple(round(s * scale) for s in pil_image.size)
    return pil_image.resize(new_size, resample=resample)


def _central_square(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The central `image_size` square (offsets rounded down), uint8 [S, S, C]."""
    arr = np.asarray(pil_image)  # [H, W, C]
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return np.array(arr[top : top + image_size, left : left + image_size])


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resizes the short side to `image_size` and takes the central square, uint8 [S, S, 3].

    Pixel-identical to the paper code's `center_crop_arr`.
    """
    return _central_square(_resize_short_side(pil_image, image_size), image_size)


def lsun_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The paper's LSUN preparation: one BOX resize of the short side, then a center crop.

    What `datasets/lsun_bedroom.py` of the paper code does to each LSUN image before
    writing it out as PNG: scale both sides by `image_size / short side`, rounded with
    Python's `round()`, in a single `Image.BOX` resize (no halving steps, no BICUBIC),
    then cut out the central `image_size` square (offsets rounded down). It differs
    from `center_crop_arr` in most pixels of a typical photograph. Returns uint8 [S, S, 3].
    """
    resized = _resize_short_side(pil_image, image_size, Image.BOX, halve=False)
    return _central_square(resized, image_size)


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    rng: IntegerRng,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """The paper code's random-crop augmentation with an explicit random generator.

    The short side is resized to a random length in
    [ceil(image_size / max_crop_frac), ceil(image_size / min_crop_frac)], then a random
    `image_size` square is cut out. Draws are made in the paper code's order (short side,
    then row, then column), each `rng.integers(low, high)` standing for its
    `random.randrange(low, high)` (rng: e.g. `numpy.random.default_rng(seed)`).
    Returns uint8 [image_size, image_size, 3].
    """
    low = math.ceil(image_size / max_crop_frac)
    high = math.ceil(image_size / min_crop_frac)
    short_side = int(rng.integers(low, high + 1))
    arr = np.asarray(_resize_short_side(pil_image, short_side))  # [H', W', C]
    top = int(rng.integers(0, arr.shape[0] - image_size + 1))
    left = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return np.array(arr[top : top + image_size, left : left + image_size])


AUTO = "auto"
STANDARD = "standard"
LSUN = "lsun"
PREPROCESSING_MODES = (AUTO, STANDARD, LSUN)


def is_lsun_dataset(dataset: str) -> bool:
    """Whether `dataset` names a tfds LSUN category ('lsun/bedroom', 'lsun/cat:3.1.0')."""
    return dataset.split(":")[0].split("/")[0] == "lsun"


def resolve_preprocessing(preprocessing: str, dataset: str) -> str:
    """Turns a `config.data.preprocessing` value into the route taken: 'standard' or 'lsun'.

    'standard' is the paper's training loader on the source images (ImageNet and any
    other data); 'lsun' first applies the paper's LSUN preparation (`lsun_crop_arr`) at
    the target size, then the same loader. 'auto' is 'lsun' for tfds LSUN names
    ('lsun/<category>', `dataset` as passed to `open_source`) and 'standard' otherwise,
    including folders and 'mnist_5k'. Another value raises ValueError.
    """
    if preprocessing not in PREPROCESSING_MODES:
        raise ValueError(
            f"config.data.preprocessing={preprocessing!r} is not one of {PREPROCESSING_MODES}."
        )
    if preprocessing == AUTO:
        return LSUN if is_lsun_dataset(dataset) else STANDARD
    return preprocessing


def prepare_source_image(
    pil_image: Image.Image, image_size: int, preprocessing: str
) -> Image.Image:
    """Applies the dataset-preparation step of a resolved route to one source image.

    For 'lsun' this is the image the paper's `datasets/lsun_bedroom.py` wrote to disk
    (`lsun_crop_arr`, as an RGB image: its PNG round trip is lossless); the training
    crop (`center_crop_arr` or `random_crop_arr`) is then applied to it, as the paper's
    loader did to those files. For 'standard' the image is returned unchanged; any
    other (unresolved) value raises ValueError.
    """
    if preprocessing == LSUN:
        return Image.fromarray(lsun_crop_arr(pil_image, image_size))
    if preprocessing != STANDARD:
        raise ValueError(f"unresolved preprocessing {preprocessing!r}; use resolve_preprocessing.")
    return pil_image


def to_float(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to float32 in [-1, 1] with the paper code's `x / 127.5 - 1`."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _area_matrix(in_size: int, out_size: int) -> np.ndarray:
    # Row o averages input pixels [floor(o * in / out), ceil((o + 1) * in / out)), the
    # bins of torch's adaptive average pooling that F.interpolate(mode="area") uses.
    m = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        start = (o * in_size) // out_size
        end = -((-(o + 1) * in_size) // out_size)
        m[o, start:end] = 1.0 / (end - start)
    return m


def area_downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Downsamples a batch with area averaging, as the paper's super-resolution data.

    The paper code builds the low-resolution conditioning image with
    `F.interpolate(high_res, small_size, mode="area")` on the [-1, 1] float batch after
    augmentation; this computes the same averages in float32: [B, H, W, C] -> [B, size,
    size, C].
    """
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [B, H, W, C], got shape {images.shape}.")
    if size <= 0 or size > min(images.shape[1:3]):
        raise ValueError(
            f"low-resolution size {size} must be in [1, {min(images.shape[1:3])}] for images "
            f"of shape {images.shape}."
        )
    rows = _area_matrix(images.shape[1], size)  # [size, H]
    cols = _area_matrix(images.shape[2], size)  # [size, W]
    x = images.astype(np.float32)
    if images.shape[1] % size == 0 and images.shape[2] % size == 0:
        # Integer factor: block means, summed in the same order as torch's pooling.
        b, h, w, c = x.shape
        fh, fw = h // size, w // size
        return x.reshape(b, size, fh, size, fw, c).mean(axis=(2, 4), dtype=np.float32)
    return np.einsum("oh,bhwc,pw->bopc", rows, x, cols).astype(np.float32)
