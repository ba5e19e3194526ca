"""Inception features of image batches: the callable `load_inception` returns, sharded.

`compute_features` is the library entry point for training-time FID and the table
reproducer: one batched pass over in-memory (or streamed) uint8 images, the batch dimension
sharded over the mesh's `'data'` axis, returning the three feature sets the paper's
evaluator uses. `compute_statistics` turns features into FID statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import parallel
from diffusion_jax.evaluation import inception, inception_weights

FEATURE_KEYS = ("pool", "spatial", "logits")
# Bump when a change to the preprocessing or the network changes the features, so that
# activations cached by older code are recomputed (`Inception.cache_id`).
FEATURES_VERSION = 1


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Validates a batch of images for the evaluator and returns it unchanged.

    Args:
      images: expected `[N, H, W, 3]` uint8 (the paper's sample-file layout).
      name: how to call the array in error messages (e.g. the npz file and key).

    Raises:
      ValueError: on a wrong rank, channel count, dtype or value range, saying how to fix.
    """
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{name} must be uint8 images of shape [N, H, W, 3] (NHWC, RGB); got shape {shape}."
        )
    if dtype != np.uint8:
        lo = hi = None
        if np.issubdtype(dtype, np.number) and np.size(images):
            lo, hi = float(np.min(images)), float(np.max(images))
        hint = ""
        if lo is not None and lo >= -1.0 and hi <= 1.0:
            hint = (
                " Values look like [-1, 1] or [0, 1] floats: convert with "
                "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) (or x * 255 for [0, 1])."
            )
        elif lo is not None and (lo < 0 or hi > 255):
            hint = " Values are outside [0, 255]."
        raise ValueError(
            f"{name} must have dtype uint8 with values in [0, 255]; got {dtype} "
            f"with range [{lo}, {hi}].{hint}"
        )
    return images


@functools.partial(jax.jit, static_argnums=0)
def _network(module: inception.InceptionV3FID, params: dict, x: jax.Array) -> dict:
    # Its own jit (inputs always [B, 299, 299, 3]) so one compilation serves every image
    # resolution; only the batch size and the sharding select a new one.
    return module.apply({"params": params}, x)


_preprocess = jax.jit(inception.preprocess)


@dataclasses.dataclass(frozen=True, eq=False)
class Inception:
    """The FID Inception-v3 with its weights: `inception(images_uint8) -> features`.

    Attributes:
      params: the converted parameter tree (numpy float32, or device arrays).
      fingerprint: a hash of the weights; with the module's settings it keys cached
        activations (`cache_id`).
      module: the Flax network.
    """

    params: dict
    fingerprint: str
    module: inception.InceptionV3FID = dataclasses.field(default_factory=inception.InceptionV3FID)

    def __call__(self, images: np.ndarray | jax.Array) -> dict[str, jax.Array]:
        """Maps `[N, H, W, 3]` uint8 images to `{"pool": [N, 2048], "spatial": [N, 2023],
        "logits": [N, 1008]}` float32 arrays (unsharded; see `compute_features`)."""
        if not isinstance(images, jax.Array):
            images = check_images(np.asarray(images))
        elif images.dtype != jnp.uint8:
            raise ValueError(f"images must be uint8 in [0, 255]; got {images.dtype}.")
        return _network(self.module, self.params, _preprocess(images))

    @property
    def cache_id(self) -> str:
        """Identifies the features this callable computes, for keying cached activations.

        The weights' `fingerprint` plus every setting of the network module (its
        `precision`: features at `Precision.DEFAULT` are TF32/bfloat16 on accelerators
        and must not be reused by a HIGHEST run) and a version of the feature code.
        """
        settings = ",".join(
            f"{f.name}={getattr(self.module, f.name)!r}"
            for f in dataclasses.fields(self.module)
            if f.name not in ("parent", "name")
        )
        return f"{self.fingerprint}|{type(self.module).__name__}({settings})|v{FEATURES_VERSION}"


def _fingerprint(params: dict) -> str:
    h = hashlib.sha1()
    for path, leaf in sorted(inception.flatten_names(params).items()):
        h.update("/".join(path).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:16]


def load_inception(
    weights_path: str | epath.PathLike | None = None,
    *,
    cache_dir: str | epath.PathLike = inception_weights.DEFAULT_CACHE_DIR,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> Inception:
    """Loads the FID Inception-v3 of the paper's evaluator.

    Args:
      weights_path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or an `.npz`
        from `save_inception_npz`. None: the cached copy in `cache_dir`, downloaded once
        from pytorch-fid's release URL when there is network.
      cache_dir: where the default weights are cached.
      precision: conv/matmul precision (HIGHEST: float32 as in the TF graph).

    Returns:
      An `Inception` callable mapping uint8 NHWC images to
      `{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}`.

    Raises:
      FileNotFoundError: if the weights are missing and cannot be downloaded.
      ValueError: if the file is not the FID Inception state dict.
    """
    if weights_path is None:
        weights_path = inception_weights.fetch_default_weights(cache_dir)
    state = inception_weights.read_state_dict(weights_path)
    params = inception_weights.state_dict_to_params(state)
    return Inception(
        params=params,
        fingerprint=_fingerprint(params),
        module=inception.InceptionV3FID(precision=precision),
    )


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(images, np.ndarray):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
    else:
        yield from images


class _Progress:
    """Logs images/s and the ETA every `every_s` seconds during long feature passes."""

    def __init__(self, total: int | None, every_s: float = 30.0):
        self.total, self.every_s = total, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = f", ETA {(self.total - self.done) / rate:.0f}s" if self.total else ""
        logging.info("Inception features: %d images, %.1f images/s%s", self.done, rate, eta)


def compute_features(
    images: np.ndarray | Iterable[np.ndarray],
    inception_model: Inception,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    num_images: int | None = None,
) -> dict[str, np.ndarray]:
    """Inception features of a set of images in one batched pass, sharded over devices.

    Each batch is padded to `batch_size` (so one compilation serves all batches, the last
    short one included), split over the mesh's `'data'` axis, and the padding dropped.

    Args:
      images: `[N, H, W, 3]` uint8 array, or an iterable of such batches (any sizes).
      inception_model: from `load_inception`.
      mesh: device mesh with a `'data'` axis; default all local devices.
      batch_size: global batch size; rounded up to a multiple of the device count.
      num_images: total for the progress ETA when `images` is an iterable.

    Returns:
      `{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}` float32 numpy.

    Raises:
      ValueError: on a batch that is not uint8 `[B, H, W, 3]`, or no images at all.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    shards = parallel.num_data_shards(mesh)
    batch_size = -(-batch_size // shards) * shards
    params = jax.device_put(inception_model.params, parallel.replicated_sharding(mesh))
    sharding = parallel.data_sharding(mesh)
    total = images.shape[0] if isinstance(images, np.ndarray) else num_images
    progress = _Progress(total)
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
    for batch in _batches(images, batch_size):
        check_images(batch)
        for start in range(0, batch.shape[0], batch_size):  # iterables may exceed batch_size
            chunk, n = parallel.pad_batch(np.asarray(batch[start : start + batch_size]), batch_size)
            x = jax.device_put(chunk, sharding)
            feats = _network(inception_model.module, params, _preprocess(x))
            for k in FEATURE_KEYS:
                outputs[k].append(np.asarray(feats[k])[:n])
            progress.update(n)
    if not outputs["pool"]:
        raise ValueError("compute_features got no images.")
    return {k: np.concatenate(v, axis=0) for k, v in outputs.items()}


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of `[N, D]` features: float64 mean `[D]` and covariance `[D, D]`.

    Raises:
      ValueError: with fewer than 2 rows (no covariance).
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need [N >= 2, D] features; got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)
