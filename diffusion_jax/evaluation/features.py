"""Feature networks of the evaluator and their sharded pass over image batches.

A feature network maps uint8 NHWC images to named float32 features: `"pool"` (the Frechet
distance and precision/recall), `"logits"` (the Inception Score) and, for Inception only,
`"spatial"` (sFID). Two implementations: `Inception` (`load_inception`, the paper's) and
`ClassifierFeatures` (`load_classifier_features`: a classifier this project trained, its
penultimate features and softmax). Both expose `params`, `apply(params, images)`,
`feature_keys`, `cache_id`, `cache_suffix` and `stored_statistics`.

`compute_features` (training-time FID, the table reproducer) runs one sharded pass over
in-memory or streamed uint8 images; `compute_statistics` turns features into FID
statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh

from diffusion_jax import models, parallel
from diffusion_jax.evaluation import inception, inception_weights, multihost
from diffusion_jax.progress import Progress

FEATURE_KEYS = ("pool", "spatial", "logits")
# Bump when a change to the preprocessing or the network changes the features, so that
# activations cached by older code are recomputed (`Inception.cache_id`).
FEATURES_VERSION = 1


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Returns `images` unchanged if `[N, H, W, 3]` uint8 (the paper's sample-file layout).

    Raises:
      ValueError: calling the array `name` (e.g. the npz file and key), on a wrong rank,
        channel count, dtype or value range, saying how to fix.
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

    `fingerprint` (a hash of the weights) and the module's settings key cached
    activations (`cache_id`).
    """

    params: dict
    fingerprint: str
    module: inception.InceptionV3FID = dataclasses.field(default_factory=inception.InceptionV3FID)
    feature_keys = FEATURE_KEYS
    # Reference batches store Inception statistics (mu, sigma, mu_s, sigma_s): use them.
    stored_statistics = True
    cache_suffix = ".inception.npz"
    name = "Inception"

    def apply(self, params: dict, images: jax.Array) -> dict[str, jax.Array]:
        """The features of uint8 `[B, H, W, 3]` images under `params` (jitted)."""
        return _network(self.module, params, _preprocess(images))

    def check_resolution(self, resolution: tuple[int, int]) -> None:
        """Any resolution runs: images are resized to 299x299 inside."""
        del resolution

    def __call__(self, images: np.ndarray | jax.Array) -> dict[str, jax.Array]:
        """Maps `[N, H, W, 3]` uint8 images to `{"pool": [N, 2048], "spatial": [N, 2023],
        "logits": [N, 1008]}` float32 arrays (unsharded; see `compute_features`)."""
        return self.apply(self.params, _checked(images))

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


def _checked(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    if not isinstance(images, jax.Array):
        return check_images(np.asarray(images))
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 in [0, 255]; got {images.dtype}.")
    return images


@functools.partial(jax.jit, static_argnums=0)
def _classifier_network(module: nn.Module, params: dict, images: jax.Array) -> dict:
    x = images.astype(jnp.float32) / 127.5 - 1.0  # the training data's [-1, 1]
    t = jnp.zeros((x.shape[0],), jnp.int32)  # clean images: timestep 0
    logits, pool = module.apply({"params": params}, x, t, return_features=True)
    return {"pool": pool.astype(jnp.float32), "logits": logits.astype(jnp.float32)}


@dataclasses.dataclass(frozen=True, eq=False)
class ClassifierFeatures:
    """A trained classifier as the evaluator's feature network.

    `"pool"`: its penultimate features (the input of its last linear layer, see
    `EncoderUNet`), for the Frechet distance and precision/recall; `"logits"`: its class
    logits, whose softmax gives the Inception-Score analogue. No `"spatial"` features, so
    sFID is not applicable (reported as NaN). Images must have the classifier's
    `image_size` (no resizing: resizing would measure the resampling, and the samples of
    a model the classifier guides have its resolution anyway). Statistics stored in a
    reference batch are Inception's, so they are never used: the reference's are
    computed from its images and cached (`cache_suffix`).

    `fingerprint` hashes the parameters and the model config (keying cached
    activations); `source` is where it was loaded from (for messages).
    """

    params: dict
    fingerprint: str
    module: nn.Module
    source: str = ""
    feature_keys = ("pool", "logits")
    stored_statistics = False
    cache_suffix = ".classifier.npz"
    name = "classifier"

    @property
    def image_size(self) -> int:
        return int(self.module.image_size)

    def check_resolution(self, resolution: tuple[int, int]) -> None:
        """Raises ValueError unless images of `resolution` (H, W) fit the classifier."""
        if tuple(resolution) != (self.image_size, self.image_size):
            raise ValueError(
                f"The classifier feature network {self.source} takes {self.image_size}x"
                f"{self.image_size} images; got {resolution[0]}x{resolution[1]}."
            )

    def apply(self, params: dict, images: jax.Array) -> dict[str, jax.Array]:
        """The features of uint8 `[B, H, W, 3]` images under `params` (jitted)."""
        self.check_resolution(images.shape[1:3])
        return _classifier_network(self.module, params, images)

    def __call__(self, images: np.ndarray | jax.Array) -> dict[str, jax.Array]:
        """Maps `[N, S, S, 3]` uint8 images to `{"pool": [N, D], "logits": [N, classes]}`."""
        return self.apply(self.params, _checked(images))

    @property
    def cache_id(self) -> str:
        """The parameters' and config's fingerprint and the feature-code version."""
        return f"classifier:{self.fingerprint}|v{FEATURES_VERSION}"


def load_classifier_features(
    directory: str | epath.PathLike, *, ema_rate: float | None = None
) -> ClassifierFeatures:
    """Loads a classifier checkpoint this project trained as a feature network.

    `directory`: a `launch.train_classifier` workdir (its latest checkpoint, `ema_rate`
    picking an EMA copy) or a converted / `save_params` directory of a classifier. The
    result serves wherever the evaluator takes `load_inception`'s.

    Raises:
      FileNotFoundError: `directory` is missing or holds no checkpoint.
      ValueError: the checkpoint is not a classifier's.
    """
    # checkpoints sits on this floor too; imported lazily, one way (it imports no evaluation).
    from diffusion_jax import checkpoints

    path = epath.Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"Feature network checkpoint {path} does not exist.")
    try:
        params, config = checkpoints.restore_params(path, ema_rate=ema_rate)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} holds no checkpoint to use as features: {e}") from e
    kind = config.get("model", {}).get("kind", None) if hasattr(config, "get") else None
    try:
        module = models.create_classifier(config.model)  # refuses the other kinds
        settings = models.validate_model_config(config.model)
        args, _ = models.model_spec(settings["kind"]).example_inputs(settings)
        # The parameter tree must be this classifier's (a UNet's would not bind).
        jax.eval_shape(
            functools.partial(module.apply, return_features=True), {"params": params}, *args
        )
    except Exception as e:
        raise ValueError(
            f"{path} is not a classifier checkpoint (model kind {kind!r}): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    h = hashlib.sha1(config.model.to_json(sort_keys=True).encode())
    h.update(_fingerprint(params).encode())
    return ClassifierFeatures(
        params=params, fingerprint=h.hexdigest()[:16], module=module, source=str(path)
    )


def _fingerprint(params: dict) -> str:
    h = hashlib.sha1()
    for path, leaf in sorted(traverse_util.flatten_dict(params).items()):
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


# What the evaluator takes wherever it says `inception_model`.
FeatureNetwork = Inception | ClassifierFeatures


def _local_chunks(images: np.ndarray | Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """This process's images as checked, non-empty chunks of at most `size` rows.

    An array is cut into `size`-row slices; each batch of an iterable is checked and cut
    the same way (so a short batch stays a short chunk: one padded step, as before).
    """
    batches = (
        (images[i : i + size] for i in range(0, images.shape[0], size))
        if isinstance(images, np.ndarray)
        else images
    )
    for batch in batches:
        check_images(batch)
        for start in range(0, batch.shape[0], size):  # iterables may exceed the size
            yield np.asarray(batch[start : start + size])


def _next_chunk(chunks: Iterator[np.ndarray]) -> tuple[np.ndarray | None, Exception | None]:
    # A failure (bad batch, broken iterator) is reported to the other processes before it
    # is raised, so they raise too instead of waiting in the next collective.
    try:
        return next(chunks, None), None
    except Exception as e:
        return None, e


def compute_features(
    images: np.ndarray | Iterable[np.ndarray],
    inception_model: FeatureNetwork,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    num_images: int | None = None,
    source: str | None = None,
) -> dict[str, np.ndarray]:
    """Features (Inception's or a classifier's) of images in one batched pass, sharded.

    Each step every process feeds up to its share of `batch_size` of its own images
    (padded to that share, so one compilation serves all steps, the last short one
    included); the global batch is split over the mesh's devices and the padding
    dropped.

    Multi-process (a mesh spanning every process, the default there) this is a
    collective: every process calls it, with the same `batch_size`, passing its own
    images. Counts may differ between processes (a process may have none); all images
    must have one resolution. Every process gets the features of all images, process 0's
    first, so FID comes out identical everywhere; bad input on one process raises on all
    (none is left waiting). The features do not depend on how many processes or devices
    share a batch. A mesh of only this process's devices computes its features alone.

    Args:
      images: this process's `[N, H, W, 3]` uint8 array, or an iterable of such batches
        (any sizes).
      mesh: a `parallel.create_mesh` mesh; default all devices of all processes.
      batch_size: global batch size; rounded up to a multiple of the device count.
      num_images: this process's image count, for the progress ETA, when `images` is an
        iterable.
      source: where the images come from (a file name), for error messages.

    Returns:
      `{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}` float32 numpy for
      Inception (`{"pool", "logits"}` for a classifier: its `feature_keys`), N the images
      of all processes of the mesh, in process order.

    Raises:
      ValueError: on a batch that is not uint8 `[B, H, W, 3]`, processes with different
        resolutions in one step, or no images at all (on every process alike).
      RuntimeError: on the other processes, when one failed (bad input, broken iterator).
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    shards = parallel.num_data_shards(mesh)
    batch_size = -(-batch_size // shards) * shards
    params = jax.device_put(inception_model.params, parallel.replicated_sharding(mesh))
    keys = inception_model.feature_keys
    features = functools.partial(inception_model.apply, params)
    run = multihost.PadShardUnpad(features, mesh, batch_size)
    procs = multihost.mesh_processes(mesh)
    chunks = _local_chunks(images, run.local_batch_size)
    local_total = images.shape[0] if isinstance(images, np.ndarray) else num_images
    outputs: list[dict[str, list[np.ndarray]]] = [{k: [] for k in keys} for _ in procs]
    progress = None
    while True:
        chunk, error = _next_chunk(chunks)
        shape = (0, 0) if chunk is None else chunk.shape[1:3]
        total = -1 if local_total is None else local_total
        # One small exchange a step: [count, height, width, failed, total] of each process.
        header = multihost.allgather_host(
            np.array([0 if chunk is None else len(chunk), *shape, error is not None, total]), mesh
        )
        if header[:, 3].any():
            if error is not None:
                raise error
            failed = [procs[i] for i in np.flatnonzero(header[:, 3])]
            raise RuntimeError(f"compute_features failed on process(es) {failed}; see their logs.")
        counts = header[:, 0]
        if not counts.any():
            break
        if progress is None:
            everyone = int(header[:, 4].sum()) if (header[:, 4] >= 0).all() else None
            progress = Progress("Inception features", everyone, every_s=30.0)
        sizes = sorted({(int(h), int(w)) for n, h, w in header[:, :3] if n})
        if len(sizes) > 1:
            raise ValueError(
                "compute_features: the processes' images must have one resolution in each "
                f"step; got (height, width) {sizes} (per process: {header[:, 1:3].tolist()})."
            )
        if chunk is None:
            chunk = np.zeros((0, *sizes[0], 3), np.uint8)
        for out, feats in zip(outputs, run(chunk, counts)):
            for k in keys:
                out[k].append(feats[k])
        progress.update(int(counts.sum()))
    if progress is None:
        raise ValueError(f"compute_features got no images from {source or 'its input'}.")
    return {k: np.concatenate([v for out in outputs for v in out[k]], axis=0) for k in keys}


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of `[N, D]` features: float64 mean `[D]` and covariance `[D, D]`.

    Raises:
      ValueError: with fewer than 2 rows (no covariance).
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need [N >= 2, D] features; got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)
