"""The paper's evaluator on `.npz` batches: IS, FID, sFID, Precision, Recall.

Mirrors guided-diffusion's `evaluations/evaluator.py` (same features, statistics and
metric definitions) without TensorFlow. Activations of every batch it reads are cached
beside the file (`<name>.npz.inception.npz`, keyed by the file's size/mtime and the
weights' fingerprint), so re-evaluating against the same reference batch is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax.evaluation import metrics
from diffusion_jax.evaluation.features import (
    FEATURE_KEYS,
    Inception,
    check_images,
    compute_features,
    compute_statistics,
)
from diffusion_jax.evaluation.npz_io import IMAGES_KEY, STAT_KEYS, ImageNpz, open_image_npz

CACHE_SUFFIX = ".inception.npz"
_HASHED_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """The five numbers the paper's evaluator prints."""

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
            f"sFID: {self.sfid}",
            f"Precision: {self.precision}",
            f"Recall: {self.recall}",
        ]


def _cache_key(npz: ImageNpz, inception_model: Inception) -> dict[str, np.ndarray]:
    # Size, mtime (whole seconds on some filesystems) and a hash of the file's first and
    # last MiB: cheap for 10 GB batches, yet a rewrite within the same second is caught.
    stat = npz.path.stat()
    digest = hashlib.sha1()
    with npz.path.open("rb") as f:
        digest.update(f.read(_HASHED_BYTES))
        if stat.length > 2 * _HASHED_BYTES:
            f.seek(stat.length - _HASHED_BYTES)
        digest.update(f.read())
    return {
        "cache_weights": np.asarray(inception_model.fingerprint),
        "cache_source": np.asarray(f"{stat.length}:{stat.mtime}:{digest.hexdigest()}"),
    }


def _read_cache(path: epath.Path, key: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            if all(k in data.files and str(data[k]) == str(v) for k, v in key.items()):
                return {k: data[k] for k in data.files if k not in key}
    except (ValueError, OSError, EOFError) as e:
        logging.warning("Ignoring unreadable activation cache %s: %s", path, e)
    return None


def _write_cache(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.parent / (path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.rename(path)
    except OSError as e:  # a read-only directory only costs the cache
        logging.warning("Could not write activation cache %s: %s", path, e)


def activations_and_statistics(
    npz: ImageNpz,
    inception_model: Inception,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    cache: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features of a batch file and its FID statistics, cached beside the file.

    Statistics stored in the file (`mu`, `sigma`, `mu_s`, `sigma_s`: a reference batch)
    are used as they are, as the paper's evaluator does; otherwise they are computed.

    Args:
      npz: from `open_image_npz`.
      inception_model: from `load_inception`.
      mesh: device mesh for the feature pass (default: all devices).
      batch_size: global batch size of the feature pass.
      cache: read/write `<file>.inception.npz` beside the batch file.

    Returns:
      `(features, stats)`: `{"pool", "spatial", "logits"}` float32 and
      `{"mu", "sigma", "mu_s", "sigma_s"}` float64.
    """
    cache_path = npz.path.parent / (npz.path.name + CACHE_SUFFIX)
    key = _cache_key(npz, inception_model)
    cached = _read_cache(cache_path, key) if cache else None
    if cached is not None:
        logging.info("Using cached activations %s", cache_path)
        feats = {k: cached[k] for k in FEATURE_KEYS}
        computed_stats = {k: cached[k] for k in STAT_KEYS}
    else:
        feats = compute_features(
            npz.iter_batches(batch_size),
            inception_model,
            mesh=mesh,
            batch_size=batch_size,
            num_images=npz.num_images,
        )
        mu, sigma = compute_statistics(feats["pool"])
        mu_s, sigma_s = compute_statistics(feats["spatial"])
        computed_stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        if cache:
            _write_cache(cache_path, {**feats, **computed_stats, **key})
    stored = npz.read_statistics()
    return feats, (stored if stored is not None else computed_stats)


def evaluate_npz(
    ref_path: str | epath.PathLike,
    sample_path: str | epath.PathLike,
    inception_model: Inception,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    split_size: int = 5000,
    allow_resolution_mismatch: bool = False,
    distance_dtype: str = "float16",
    pr_batch_size: int = 10000,
    cache: bool = True,
) -> EvaluationResult:
    """Evaluates a sample batch against a reference batch, as the paper's evaluator.

    Both files are resized to 299x299 inside Inception, so any resolution runs; but FID
    between different resolutions measures the resizing, not the model, so a mismatch is
    an error unless `allow_resolution_mismatch`.

    Args:
      ref_path: reference batch (`VIRTUAL_imagenet256_labeled.npz` or from make_reference).
      sample_path: sample batch (`arr_0` uint8 NHWC).
      inception_model: from `load_inception`.
      mesh: device mesh for the feature pass.
      batch_size: global batch size of the feature pass.
      split_size: Inception Score split (5000 in the paper; the sample count must reach it).
      allow_resolution_mismatch: evaluate files of different image sizes anyway.
      distance_dtype: precision/recall distance precision ("float16" as the reference).
      pr_batch_size: row/column block of the precision/recall distance computation.
      cache: cache activations beside both files.

    Returns:
      The `EvaluationResult`.

    Raises:
      FileNotFoundError / ValueError: bad files, too few samples, mismatched resolutions.
    """
    ref, sample = open_image_npz(ref_path), open_image_npz(sample_path)
    if ref.resolution != sample.resolution and not allow_resolution_mismatch:
        raise ValueError(
            f"Reference {ref.path} has {ref.resolution} images but samples {sample.path} have "
            f"{sample.resolution}. Inception resizes both to 299x299, so this would run, but "
            "the FID would then measure the resolution gap; compare samples with the "
            "reference batch of their resolution, or pass allow_resolution_mismatch "
            "(--allow_resolution_mismatch) if this is intended."
        )
    if sample.num_images < split_size:
        raise ValueError(
            f"{sample.path} has {sample.num_images} images, fewer than one Inception Score "
            f"split (split_size={split_size}, 5000 in the paper). Provide more samples or "
            "lower split_size (--is_split_size)."
        )
    kw = dict(mesh=mesh, batch_size=batch_size, cache=cache)
    ref_feats, ref_stats = activations_and_statistics(ref, inception_model, **kw)
    sample_feats, sample_stats = activations_and_statistics(sample, inception_model, **kw)
    precision, recall = metrics.precision_recall(
        ref_feats["pool"],
        sample_feats["pool"],
        row_batch_size=pr_batch_size,
        col_batch_size=pr_batch_size,
        distance_dtype=distance_dtype,
    )
    return EvaluationResult(
        inception_score=metrics.inception_score(sample_feats["logits"], split_size),
        fid=metrics.frechet_distance(
            sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]
        ),
        sfid=metrics.frechet_distance(
            sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"]
        ),
        precision=precision,
        recall=recall,
    )


def write_reference_batch(
    image_batches: Iterable[np.ndarray],
    output_path: str | epath.PathLike,
    inception_model: Inception,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
) -> int:
    """Writes a reference batch in the paper's format for the given images.

    Args:
      image_batches: uint8 `[B, H, W, 3]` batches (e.g. `data.iterate_uint8_images`).
      output_path: the `.npz` to write: `arr_0` images, `mu`/`sigma` (pool features),
        `mu_s`/`sigma_s` (spatial features), all statistics float64.
      inception_model: from `load_inception`.
      mesh: device mesh for the feature pass.
      batch_size: global batch size of the feature pass.

    Returns:
      The number of images written.

    Raises:
      ValueError: on badly typed batches, mixed resolutions or fewer than 2 images.
    """
    images = []

    def collect() -> Iterable[np.ndarray]:
        for i, batch in enumerate(image_batches):
            check_images(batch, f"image batch {i}")
            if images and batch.shape[1:] != images[0].shape[1:]:
                raise ValueError(
                    f"image batch {i} has shape {batch.shape[1:]}, earlier ones "
                    f"{images[0].shape[1:]}: a reference batch needs one resolution."
                )
            images.append(batch)
            yield batch

    feats = compute_features(collect(), inception_model, mesh=mesh, batch_size=batch_size)
    mu, sigma = compute_statistics(feats["pool"])
    mu_s, sigma_s = compute_statistics(feats["spatial"])
    output_path = epath.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("wb") as f:
        np.savez(
            f,
            **{IMAGES_KEY: np.concatenate(images)},
            mu=mu,
            sigma=sigma,
            mu_s=mu_s,
            sigma_s=sigma_s,
        )
    return int(feats["pool"].shape[0])
