"""Sequential uint8 batches of a dataset, for FID reference statistics and previews."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import numpy as np
from absl import logging

from diffusion_jax.data.preprocessing import (
    UnreadableImageError,
    center_crop_arr,
    prepare_source_image,
    resolve_preprocessing,
)
from diffusion_jax.data.sources import open_source, resolve_source


def iterate_uint8_images(
    source: str,
    image_size: int,
    *,
    data_dir: str | None = None,
    split: str = "train",
    batch_size: int = 256,
    limit: int | None = None,
    num_threads: int = 4,
    preprocessing: str = "auto",
) -> Uint8ImageBatches:
    """Iterates over a dataset's images once, in order, center-cropped as the paper.

    tfds LSUN sources ('lsun/<category>') are by default first prepared as the paper's
    `datasets/lsun_bedroom.py` did (`lsun_crop_arr`: one BOX resize, center crop);
    everything else goes straight to `center_crop_arr`. `preprocessing` overrides it.

    Unreadable images are skipped and counted (`.skipped` of the result; logged at the
    end), so one bad file does not stop a reference-batch job.

    Args:
      source: an image directory path, a tfds name ('imagenet2012', 'lsun/bedroom',
        ...) or 'mnist_5k'; data_dir and split as `open_source`'s.
      batch_size: images per yielded batch; only the last batch may be smaller.
      limit: stop after this many images (None = all).
      num_threads: decoding threads (PIL releases the GIL while decoding/resizing).

    Returns:
      A lazy iterator (nothing is opened before the first batch) of uint8 arrays
      [B, image_size, image_size, 3], with the `skipped` count.
    """
    batches = Uint8ImageBatches()
    batches._iterator = _generate(
        batches, source, image_size, data_dir, split, batch_size, limit, num_threads, preprocessing
    )
    return batches


class Uint8ImageBatches:
    """Iterator of uint8 image batches that counts the unreadable images it skipped.

    Attributes:
      skipped: unreadable images skipped so far (final once the iterator is exhausted).
    """

    def __init__(self):
        self.skipped = 0
        self._iterator: Iterator[np.ndarray] = iter(())

    def __iter__(self) -> Uint8ImageBatches:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iterator)


def _generate(
    stats: Uint8ImageBatches,
    source: str,
    image_size: int,
    data_dir: str | None,
    split: str,
    batch_size: int,
    limit: int | None,
    num_threads: int,
    preprocessing: str,
) -> Iterator[np.ndarray]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}.")
    dataset, data_dir = resolve_source(source, data_dir)
    route = resolve_preprocessing(preprocessing, dataset)
    data = open_source(dataset, data_dir=data_dir, split=split)
    total = len(data) if limit is None else min(limit, len(data))

    def load(index: int) -> np.ndarray | None:
        try:
            image, _ = data[index]
        except UnreadableImageError as e:
            logging.warning("skipping unreadable image: %s", e)
            return None
        return center_crop_arr(prepare_source_image(image, image_size, route), image_size)

    skipped = emitted = 0
    pending: list[np.ndarray] = []
    with futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        start = 0
        while emitted + len(pending) < total and start < len(data):
            # Read only as many as are still needed, so `limit` costs no extra decodes.
            stop = min(start + batch_size, start + total - emitted - len(pending), len(data))
            loaded = list(pool.map(load, range(start, stop)))
            start = stop
            good = [a for a in loaded if a is not None]
            skipped += len(loaded) - len(good)
            stats.skipped = skipped
            pending.extend(good)
            while len(pending) >= batch_size:
                batch, pending = pending[:batch_size], pending[batch_size:]
                emitted += len(batch)
                yield np.stack(batch)  # [B, S, S, 3]
    if pending:
        yield np.stack(pending)
    if skipped:
        logging.warning("iterate_uint8_images(%r): skipped %d unreadable images", source, skipped)
