"""The paper's evaluator on `.npz` batches: IS, FID, sFID, Precision, Recall.

Mirrors guided-diffusion's `evaluations/evaluator.py` (same features, statistics and
metric definitions) without TensorFlow. Activations of every batch it reads are cached
beside the file (`<name>.npz.inception.npz`, keyed by the file's size, mtime and a hash of
its ends, by `Inception.cache_id`: weights, network precision, feature-code version, and
by the platform), so re-evaluating against the same reference batch is cheap. All checks
on the files run before the first Inception pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
import zlib
from collections.abc import Callable, Iterable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax.evaluation import metrics
from diffusion_jax.evaluation.features import (
    FeatureNetwork,
    check_images,
    compute_features,
    compute_statistics,
)
from diffusion_jax.evaluation.npz_io import (
    IMAGES_KEY,
    STAT_KEYS,
    ImageNpz,
    check_finite_statistics,
    open_image_npz,
)
from diffusion_jax.files import atomic_write

_HASHED_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """The five numbers the paper's evaluator prints.

    With a classifier feature network (`load_classifier_features`) `inception_score` is
    the score of its softmax, `fid`/`precision`/`recall` use its penultimate features,
    and `sfid` is NaN: a classifier has no spatial features (printed "not applicable").
    """

    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float

    def lines(self) -> list[str]:
        """The evaluator's output lines ("Inception Score: ...", "FID: ...", ...)."""
        return [
            f"Inception Score: {self.inception_score}",
            f"FID: {self.fid}",
            f"sFID: {self.sfid}"
            if self.sfid == self.sfid
            else "sFID: not applicable (the feature network has no spatial features)",
            f"Precision: {self.precision}",
            f"Recall: {self.recall}",
        ]


def _cache_key(
    npz: ImageNpz, inception_model: FeatureNetwork, mesh: Mesh | None
) -> dict[str, np.ndarray]:
    # The file: size, mtime (whole seconds on some filesystems) and a hash of its first and
    # last MiB: cheap for 10 GB batches, yet a rewrite within the same second is caught.
    # The features: weights, network settings (precision) and feature-code version
    # (`Inception.cache_id`), and the platform, whose matmul/conv arithmetic differs.
    stat = npz.path.stat()
    digest = hashlib.sha1()
    with npz.path.open("rb") as f:
        digest.update(f.read(_HASHED_BYTES))
        if stat.length > 2 * _HASHED_BYTES:
            f.seek(stat.length - _HASHED_BYTES)
        digest.update(f.read())
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return {
        "cache_model": np.asarray(f"{inception_model.cache_id}|{platform}"),
        "cache_source": np.asarray(f"{stat.length}:{stat.mtime}:{digest.hexdigest()}"),
    }


def _read_cache(path: epath.Path, key: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            if all(k in data.files and str(data[k]) == str(v) for k, v in key.items()):
                return {k: data[k] for k in data.files if k not in key}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        logging.warning("Ignoring unreadable activation cache %s: %s", path, e)
    return None


def _write_cache(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:  # a read-only directory only costs the cache
        logging.warning("Could not write activation cache %s: %s", path, e)


@dataclasses.dataclass
class _Activations:
    """Features of one batch file and what is needed to cache them."""

    features: dict[str, np.ndarray]
    cached_stats: dict[str, np.ndarray] | None  # statistics found in the cache
    cache_path: epath.Path | None  # where to write the cache; None: don't
    cache_key: dict[str, np.ndarray]


def _activations(
    npz: ImageNpz,
    inception_model: FeatureNetwork,
    *,
    mesh: Mesh | None,
    batch_size: int,
    cache: bool,
    cache_path: epath.Path | None = None,
) -> _Activations:
    """The file's features, from the cache (default `<file>` + the network's
    `cache_suffix`, e.g. `.inception.npz`) when that matches, else computed."""
    if cache_path is None:
        cache_path = npz.path.parent / (npz.path.name + inception_model.cache_suffix)
    key = _cache_key(npz, inception_model, mesh) if cache else {}
    cached = _read_cache(cache_path, key) if cache else None
    keys = inception_model.feature_keys
    if cached is not None and all(k in cached for k in keys):
        logging.info("Using cached activations %s", cache_path)
        # pool -> mu, sigma (FID); spatial -> mu_s, sigma_s (sFID), for networks that have it.
        stat_keys = STAT_KEYS if "spatial" in keys else STAT_KEYS[:2]
        stats = {k: cached[k] for k in stat_keys} if all(k in cached for k in stat_keys) else None
        return _Activations({k: cached[k] for k in keys}, stats, None, key)
    if npz.num_images == 0:  # named here: compute_features knows no file names
        raise ValueError(f"{npz.path} holds no images (arr_0 is empty).")
    kw = dict(mesh=mesh, batch_size=batch_size, num_images=npz.num_images)
    feats = compute_features(npz.iter_batches(batch_size), inception_model, **kw)
    return _Activations(feats, None, cache_path if cache else None, key)


def _statistics(
    npz: ImageNpz, acts: _Activations, stored_statistics: bool = True
) -> dict[str, np.ndarray]:
    """Statistics stored in the file (a reference batch, when they are the feature
    network's: `stored_statistics`), else cached, else computed.

    Writes the activation cache when the features were just computed (with the
    statistics, when they had to be computed too).
    """
    stats = npz.read_statistics() if stored_statistics else None
    computed = {}
    if stats is None:
        stats = acts.cached_stats
    if stats is None:
        mu, sigma = compute_statistics(acts.features["pool"])
        stats = computed = {"mu": mu, "sigma": sigma}
        if "spatial" in acts.features:
            mu_s, sigma_s = compute_statistics(acts.features["spatial"])
            stats.update(mu_s=mu_s, sigma_s=sigma_s)
        check_finite_statistics(stats, npz.path)
    if acts.cache_path is not None:
        _write_cache(acts.cache_path, {**acts.features, **computed, **acts.cache_key})
    return stats


def activations_and_statistics(
    npz: ImageNpz,
    inception_model: FeatureNetwork,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    cache: bool = True,
    cache_path: str | epath.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features of a batch file and its FID statistics, cached beside the file.

    Statistics stored in the file (`mu`, `sigma`, `mu_s`, `sigma_s`: a reference batch)
    are used as they are, as the paper's evaluator does; otherwise they are computed.
    The cache (`<file>.inception.npz`) is keyed by the file's size, mtime and a hash of
    its ends, and by `Inception.cache_id` (weights, precision) and the platform.

    Args:
      npz: from `open_image_npz`.
      mesh, batch_size: of the feature pass (default mesh: all devices).
      cache: read/write `<file>.inception.npz` beside the batch file.
      cache_path: the cache file instead (e.g. in a run's workdir, when the batch file
        lives in read-only storage); same key, so a mismatch recomputes and overwrites.

    Returns:
      `(features, stats)`: `{"pool", "spatial", "logits"}` float32 and
      `{"mu", "sigma", "mu_s", "sigma_s"}` float64.
    """
    where = None if cache_path is None else epath.Path(cache_path)
    acts = _activations(
        npz, inception_model, mesh=mesh, batch_size=batch_size, cache=cache, cache_path=where
    )
    return acts.features, _statistics(npz, acts, inception_model.stored_statistics)


def evaluate_npz(
    ref_path: str | epath.PathLike,
    sample_path: str | epath.PathLike,
    inception_model: FeatureNetwork,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    split_size: int = 5000,
    allow_resolution_mismatch: bool = False,
    distance_dtype: str = "float16",
    pr_batch_size: int = 10000,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Evaluates a sample batch against a reference batch, as the paper's evaluator.

    Both files are resized to 299x299 inside Inception, so any resolution runs; but FID
    between different resolutions measures the resizing, not the model, so a mismatch is
    an error unless `allow_resolution_mismatch`. Every check on the files (layout,
    statistics, resolution, sample count) runs before the first Inception pass.

    Args:
      ref_path: reference batch (`VIRTUAL_imagenet256_labeled.npz` or from make_reference).
      sample_path: sample batch (`arr_0` uint8 NHWC).
      inception_model: from `load_inception` (or `load_classifier_features`).
      mesh, batch_size: of the feature pass.
      split_size: Inception Score split (5000 in the paper; the sample count must reach it).
      allow_resolution_mismatch: evaluate files of different image sizes anyway.
      distance_dtype: precision/recall distance precision ("float16" as the reference).
      pr_batch_size: row/column block of the precision/recall distance computation.
      cache: cache activations beside both files.
      progress: called with the paper's evaluator's progress lines ("computing reference
        batch activations...", ..., "Computing evaluations..."), each just before that
        step starts; e.g. `print`.

    Returns:
      The `EvaluationResult`.

    Raises:
      FileNotFoundError / ValueError: bad files, too few samples, mismatched resolutions.
    """
    say = progress if progress is not None else (lambda line: None)
    ref, sample = open_image_npz(ref_path), open_image_npz(sample_path)
    if ref.resolution != sample.resolution and not allow_resolution_mismatch:
        raise ValueError(
            f"Reference {ref.path} has {ref.resolution} images but samples {sample.path} have "
            f"{sample.resolution}. Inception resizes both to 299x299, so this would run, but "
            "the FID would then measure the resolution gap; compare samples with the "
            "reference batch of their resolution, or pass allow_resolution_mismatch "
            "(--allow_resolution_mismatch) if this is intended."
        )
    for npz in (ref, sample):  # before any Inception pass: FID needs a covariance
        if npz.num_images < 2:
            raise ValueError(
                f"{npz.path} has {npz.num_images} image(s); FID needs at least 2 (a mean and "
                "a covariance)."
            )
    if sample.num_images < split_size:
        raise ValueError(
            f"{sample.path} has {sample.num_images} images, fewer than one Inception Score "
            f"split (split_size={split_size}, 5000 in the paper). Provide more samples or "
            "lower split_size (--is_split_size)."
        )
    for npz in (ref, sample):  # a classifier takes its own image size only
        inception_model.check_resolution(npz.resolution)
    kw = dict(mesh=mesh, batch_size=batch_size, cache=cache)
    feats, stats = [], []
    for name, npz in (("reference", ref), ("sample", sample)):
        say(f"computing {name} batch activations...")
        feats.append(_activations(npz, inception_model, **kw))
        say(f"computing/reading {name} batch statistics...")
        stats.append(_statistics(npz, feats[-1], inception_model.stored_statistics))

    say("Computing evaluations...")
    return _evaluations(
        feats[0].features, stats[0], feats[1].features, stats[1],
        split_size=split_size, distance_dtype=distance_dtype, pr_batch_size=pr_batch_size,
    )  # fmt: skip


def _evaluations(
    ref_feats, ref_stats, sample_feats, sample_stats, *, split_size, distance_dtype, pr_batch_size
) -> EvaluationResult:
    """The five metrics from both batches' features and statistics."""
    inception_score = metrics.inception_score(sample_feats["logits"], split_size)
    fid = metrics.frechet_distance(
        sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]
    )
    sfid = float("nan")  # no spatial features (a classifier feature network)
    if "mu_s" in sample_stats and "mu_s" in ref_stats:
        sfid = metrics.frechet_distance(
            sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"]
        )
    blocks = dict(row_batch_size=pr_batch_size, col_batch_size=pr_batch_size)
    precision, recall = metrics.precision_recall(
        ref_feats["pool"], sample_feats["pool"], distance_dtype=distance_dtype, **blocks
    )
    return EvaluationResult(
        inception_score=inception_score, fid=fid, sfid=sfid, precision=precision, recall=recall
    )


def evaluation_sizes(num_samples: int | None, num_devices: int) -> tuple[int, int]:
    """`(split_size, batch_size)` for evaluating runs of `num_samples` samples.

    The paper's Inception Score split (5000) and a 256-image Inception batch, shrunk for
    quick runs of fewer samples (a batch of 8 samples need not be padded to 256).

    Args:
      num_samples: samples per file; None: the paper's 50,000.
      num_devices: devices of the feature pass (the batch is a multiple of them).
    """
    n = num_samples or 50_000
    return min(5000, n), min(256, -(-n // num_devices) * num_devices)


class ReferenceEvaluator:
    """One reference batch against many sample files, its activations read once.

    The reference's features and statistics are computed (or read from the activation
    cache at `cache_path`, keyed as the evaluator's: the file's size, mtime and a hash of
    its ends, the Inception's `cache_id` and the platform) on the first evaluation and
    kept; each sample file's activations are cached beside it. `key` names what the
    metrics depend on besides the samples, so results computed against another
    reference or other weights can be told apart.
    """

    def __init__(
        self,
        reference: str | epath.PathLike,
        inception_model: FeatureNetwork,
        *,
        cache_path: str | epath.PathLike | None = None,
        mesh: Mesh | None = None,
        batch_size: int = 256,
        split_size: int = 5000,
        distance_dtype: str = "float16",
        pr_batch_size: int = 10000,
    ):
        """Opens and checks the reference .npz (no Inception pass yet); `cache_path`: where
        its activations are cached (default beside it); the rest as `evaluate_npz`'s."""
        self.reference = open_image_npz(reference)
        inception_model.check_resolution(self.reference.resolution)
        self.inception_model = inception_model
        self.cache_path = None if cache_path is None else epath.Path(cache_path)
        self.mesh, self.batch_size, self.split_size = mesh, batch_size, split_size
        self.distance_dtype, self.pr_batch_size = distance_dtype, pr_batch_size
        key = _cache_key(self.reference, inception_model, mesh)
        self.key = f"{key['cache_source']}|{key['cache_model']}|split={split_size}"
        self.computed_reference: bool | None = None  # after the first evaluation
        self._reference: tuple[dict, dict] | None = None

    def reference_activations(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The reference's `(features, stats)`, computed or read on the first call."""
        if self._reference is None:
            kw = dict(mesh=self.mesh, batch_size=self.batch_size, cache=True)
            acts = _activations(
                self.reference, self.inception_model, cache_path=self.cache_path, **kw
            )
            self.computed_reference = acts.cache_path is not None
            stats = _statistics(self.reference, acts, self.inception_model.stored_statistics)
            self._reference = acts.features, stats
        return self._reference

    def __call__(self, sample_path: str | epath.PathLike) -> EvaluationResult:
        """Evaluates a sample file against the reference (as `evaluate_npz`).

        Raises:
          FileNotFoundError / ValueError: a bad sample file, a resolution other than the
            reference's, fewer samples than `split_size`.
        """
        sample = open_image_npz(sample_path)
        if sample.resolution != self.reference.resolution:
            raise ValueError(
                f"Samples {sample.path} have {sample.resolution} images but the reference "
                f"{self.reference.path} has {self.reference.resolution}."
            )
        if sample.num_images < self.split_size:
            raise ValueError(
                f"{sample.path} has {sample.num_images} images, fewer than one Inception "
                f"Score split (split_size={self.split_size})."
            )
        ref_feats, ref_stats = self.reference_activations()
        sample_feats, sample_stats = activations_and_statistics(
            sample, self.inception_model, mesh=self.mesh, batch_size=self.batch_size
        )
        return _evaluations(
            ref_feats, ref_stats, sample_feats, sample_stats, split_size=self.split_size,
            distance_dtype=self.distance_dtype, pr_batch_size=self.pr_batch_size,
        )  # fmt: skip


class _ImageBuffer:
    """Collects uint8 image batches into one array, growing it in place.

    `ndarray.resize` reallocates the single buffer (glibc `realloc` moves large blocks
    with `mremap`, without a copy), so collecting N images needs about N images of
    memory (at most 25% more while growing), not the 2x of a list plus `np.concatenate`.
    """

    def __init__(self, capacity: int | None = None):
        self._capacity_hint = capacity
        self._buffer: np.ndarray | None = None
        self.size = 0

    def append(self, batch: np.ndarray, name: str) -> None:
        if self._buffer is None:
            capacity = max(self._capacity_hint or 0, batch.shape[0])
            self._buffer = np.empty((capacity, *batch.shape[1:]), np.uint8)
        elif batch.shape[1:] != self._buffer.shape[1:]:
            raise ValueError(
                f"{name} has shape {batch.shape[1:]}, earlier ones "
                f"{self._buffer.shape[1:]}: a reference batch needs one resolution."
            )
        end = self.size + batch.shape[0]
        if end > self._buffer.shape[0]:
            self._resize(max(end, self._buffer.shape[0] * 5 // 4))
        self._buffer[self.size : end] = batch
        self.size = end

    def _resize(self, n: int) -> None:
        # No views of the buffer exist while collecting, so an unchecked resize is safe.
        self._buffer.resize((n, *self._buffer.shape[1:]), refcheck=False)

    def finish(self) -> np.ndarray:
        """The collected `[N, H, W, 3]` images (the buffer trimmed to N in place)."""
        if self._buffer is None:
            raise ValueError("write_reference_batch got no images.")
        if self._buffer.shape[0] != self.size:
            self._resize(self.size)
        return self._buffer


def write_reference_batch(
    image_batches: Iterable[np.ndarray],
    output_path: str | epath.PathLike,
    inception_model: FeatureNetwork,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    num_images: int | None = None,
) -> int:
    """Writes a reference batch in the paper's format for the given images.

    The images are collected into one buffer while their features are computed and
    written with `np.savez` (streamed to the file), so peak memory is about one copy of
    the images (50k x 256^2: 9.8 GB), plus the features.

    Args:
      image_batches: uint8 `[B, H, W, 3]` batches (e.g. `data.iterate_uint8_images`).
      output_path: the `.npz` to write: `arr_0` images, `mu`/`sigma` (pool features),
        `mu_s`/`sigma_s` (spatial features), all statistics float64.
      inception_model, mesh, batch_size: of the feature pass.
      num_images: expected number of images, if known (e.g. the `limit` given to the
        data source): the buffer is allocated once at that size. Only a hint; any count
        works.

    Returns:
      The number of images written.

    Raises:
      ValueError: on badly typed batches, mixed resolutions or fewer than 2 images.
    """
    images = _ImageBuffer(num_images)

    def collect() -> Iterable[np.ndarray]:
        for i, batch in enumerate(image_batches):
            check_images(batch, f"image batch {i}")
            images.append(batch, f"image batch {i}")
            yield batch

    output_path = epath.Path(output_path)
    feats = compute_features(collect(), inception_model, mesh=mesh, batch_size=batch_size)
    mu, sigma = compute_statistics(feats["pool"])
    mu_s, sigma_s = compute_statistics(feats["spatial"])
    del feats  # ~1 GB at 50k images; not needed while writing
    stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    check_finite_statistics(stats, f"the reference batch for {output_path}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a run killed while writing keeps the file it was to replace.
    with atomic_write(output_path, "wb") as f:
        np.savez(f, **{IMAGES_KEY: images.finish()}, **stats)
    return images.size
