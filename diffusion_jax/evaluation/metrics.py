"""FID/sFID, Inception Score and k-NN Precision/Recall as the paper's evaluator defines them.

Semantics follow guided-diffusion's `evaluations/evaluator.py`:
  * Frechet distance in float64. The reference takes scipy's `sqrtm` of sigma1 sigma2 (with
    an eps retry for singular products); here tr((sigma1 sigma2)^(1/2)) comes exactly from
    the eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2) (same value to ~1e-9 relative at
    2048-d, ~40x faster; see `frechet_distance`).
  * Inception Score: `exp(mean_x KL(p(y|x) || p(y)))` per split of `split_size` images
    (the last split may be shorter), averaged over splits; softmax of the unbiased logits.
  * Precision/Recall (Kynkaanniemi et al. 2019): each set's manifold is the union of
    balls around its points with radius = squared distance to the k-th nearest neighbour
    (k = 3, the point itself not counted); precision = fraction of samples inside the
    reference manifold, recall = fraction of reference points inside the sample manifold.
    Squared distances come from `|u|^2 - 2 u.v + |v|^2` clamped at 0, computed in float16
    as the reference's TF graph does (float32 for a block whose float16 result overflows);
    `distance_dtype="float32"` computes everything in float32 instead. The float16 mode
    rounds every op's result to float16; the dot products are accumulated in float32 and
    rounded once, as cuBLAS does for TF's float16 matmul on GPU (where the paper ran its
    evaluator); the squared norms are likewise summed in float32 and rounded once. That
    is not bit-exact to any TF run: TF's GPU `reduce_sum` kernel keeps float16 partial
    sums in cub's tree order (its source gives only the float16 *mean* a float32
    accumulator) and TF-CPU sums in Eigen's order, so single norms differ from a TF run
    by a float16 ulp or so (a reviewer found ~28% of rows differing from TF-CPU). At
    Inception-feature scales the float16 grid creates ties that `<=` counts as inside,
    so these ulps move precision/recall: expect about +-0.005 against a TF-CPU run of
    the paper's evaluator at a few thousand samples (measured: recall 0.003-0.004 at
    2k-2.5k samples); the gap to TF-GPU has not been measured and is expected to be of
    the same order. The float16 and float32 modes differ by ~0.01 on the same features.
Distance blocks are `[row_batch, col_batch]` jitted JAX computations, so 50k x 50k never
materialises; the k-NN radius keeps a running top-(k+1) per row across column blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    `tr((sigma1 sigma2)^(1/2))` comes from eigenvalues, not from scipy's `sqrtm`: with
    `R = sigma1^(1/2)` (eigh of sigma1; negative eigenvalues, and positive ones below
    `D * eps * max` (rounding noise), count as 0),
    `sigma1 sigma2 = R (R sigma2 R) R^-1` is similar to the symmetric PSD `R sigma2 R`, so
    the trace of its square root is the sum of the square roots of that matrix's (clipped)
    eigenvalues. One `eigh` of sigma1 and one `eigvalsh` of a rank x rank matrix: over
    10x faster than `sqrtm` at 2048-d (bench/RESULTS.md), real by construction, and exact
    for rank-deficient covariances (fewer samples than dimensions), where the reference's
    `sqrtm` needs its eps retry.

    Args:
      mu1, sigma1: mean `[D]` and covariance `[D, D]` of the first set (e.g. samples).
      mu2, sigma2: the same for the second set (e.g. the reference batch).
      eps: kept for the reference's signature; the eigenvalue form needs no diagonal
        offset for singular covariances, so it is not used.

    Returns:
      `|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`.

    Raises:
      ValueError: on mismatched shapes or non-finite statistics.
    """
    del eps
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            "Frechet distance needs statistics of the same dimension: got mu "
            f"{mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} (were both "
            "computed with the same feature network and layer: Inception pool 2048-d for FID, "
            "spatial 2023-d for sFID?)."
        )
    for name, x in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(x).all():
            raise ValueError(f"Frechet distance: {name} has non-finite entries.")
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    # S1^1/2 = V_r diag(sqrt w_r) V_r^T over the numerically nonzero eigenvalues (negative
    # and rounding-noise ones count as 0). The nonzero eigenvalues of S1^1/2 S2 S1^1/2 are
    # those of the r x r matrix diag(w_r^1/2) V_r^T S2 V_r diag(w_r^1/2) (AB and BA share
    # them), so with a covariance of n < D samples the second eigen-solve is r = n - 1.
    keep = w > w.max(initial=0.0) * w.shape[0] * np.finfo(np.float64).eps
    factor = v[:, keep] * np.sqrt(w[keep])[None, :]  # [D, r]: S1^1/2 = factor V_r^T
    product = factor.T @ sigma2 @ factor  # [r, r]
    # Symmetrised: eigh reads one triangle, and rounding leaves the product a hair asymmetric.
    eig = np.linalg.eigvalsh(0.5 * (product + product.T))
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of `[N, C]` classifier logits (the unbiased 1008-way head).

    The mean over splits of `split_size` images (the reference's 5000; the last split
    may be short) of `exp(mean_i KL(p(y|x_i) || mean_i p(y|x_i)))`, softmax in float64.

    Raises:
      ValueError: if there are fewer than `split_size` images.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < split_size:
        raise ValueError(
            f"Inception Score needs at least split_size={split_size} images (the reference "
            f"evaluator uses splits of 5000); got logits of shape {logits.shape}. Evaluate "
            "more samples or lower split_size (--is_split_size), noting the result is then "
            "not comparable with published numbers."
        )
    scores = []
    for start in range(0, logits.shape[0], split_size):
        part = logits[start : start + split_size]
        # log-softmax so a vanishing probability gives 0 * finite, not 0 * log(0).
        log_p = part - np.logaddexp.reduce(part, axis=1, keepdims=True)
        p = np.exp(log_p)
        log_marginal = np.log(np.mean(p, axis=0, keepdims=True))
        kl = np.sum(p * (log_p - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


def _round16(x: jax.Array) -> jax.Array:
    # Emulates an op whose result the TF graph stores in float16.
    return x.astype(jnp.float16).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="half")
def _distance_block(u: jax.Array, v: jax.Array, half: bool) -> jax.Array:
    """Squared distances `[R, C]` between `u` `[R, D]` and `v` `[C, D]` (float32 result)."""
    u = jnp.asarray(u, jnp.float32)
    v = jnp.asarray(v, jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    if half:
        u, v = _round16(u), _round16(v)
        norm_u = _round16(jnp.sum(_round16(u * u), axis=1))[:, None]
        norm_v = _round16(jnp.sum(_round16(v * v), axis=1))[None, :]
        dots = _round16(jnp.dot(u, v.T, precision=hp))
        d = _round16(_round16(norm_u - _round16(2.0 * dots)) + norm_v)
        return jnp.maximum(d, 0.0)
    norm_u = jnp.sum(u * u, axis=1)[:, None]
    norm_v = jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(norm_u - 2.0 * jnp.dot(u, v.T, precision=hp) + norm_v, 0.0)


def pairwise_distances(u: np.ndarray, v: np.ndarray, distance_dtype: str = "float16") -> jax.Array:
    """`[R, C]` float32 squared distances of `[R, D]` u and `[C, D]` v as the reference.

    distance_dtype: "float16" (the reference's graph; a block with a non-finite float16
    result is recomputed in float32, as its `tf.cond` does) or "float32".
    """
    if distance_dtype not in ("float16", "float32"):
        raise ValueError(f"distance_dtype must be 'float16' or 'float32'; got {distance_dtype!r}.")
    if distance_dtype == "float16":
        d = _distance_block(u, v, True)
        if bool(jnp.all(jnp.isfinite(d))):
            return d
    return _distance_block(u, v, False)


@functools.partial(jax.jit, static_argnames="k")
def _merge_smallest(best: jax.Array, block: jax.Array, k: int) -> jax.Array:
    # Running k smallest per row: [R, k] best so far merged with a new [R, C] block.
    neg, _ = jax.lax.top_k(-jnp.concatenate([best, block], axis=1), k)
    return -neg  # ascending


def manifold_radii(
    features: np.ndarray,
    *,
    nhood_size: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    distance_dtype: str = "float16",
) -> np.ndarray:
    """Squared distance of each point to its `nhood_size`-th nearest neighbour (self excluded).

    `[N]` float32 radii (squared, as the reference compares them) of `[N, D]` features;
    nhood_size is the reference's `nhood_sizes=[3]`, row/col_batch_size the block shape
    of the distance computation.
    """
    features = np.asarray(features, np.float32)
    n = features.shape[0]
    if n <= nhood_size:
        raise ValueError(
            f"Precision/recall with k={nhood_size} needs more than {nhood_size} images; got {n}."
        )
    radii = np.empty([n], np.float32)
    for r0 in range(0, n, row_batch_size):
        rows = features[r0 : r0 + row_batch_size]
        best = jnp.full((rows.shape[0], nhood_size + 1), jnp.inf, jnp.float32)
        for c0 in range(0, n, col_batch_size):
            block = pairwise_distances(rows, features[c0 : c0 + col_batch_size], distance_dtype)
            best = _merge_smallest(best, block, nhood_size + 1)
        # Index k of the ascending row is the k-th neighbour: index 0 is the point itself.
        radii[r0 : r0 + rows.shape[0]] = np.asarray(best[:, nhood_size])
    return radii


@jax.jit
def _in_balls(d: jax.Array, radii_rows: jax.Array, radii_cols: jax.Array):
    # row i inside some column ball; column j inside some row ball.
    return jnp.any(d <= radii_cols[None, :], axis=1), jnp.any(d <= radii_rows[:, None], axis=0)


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    *,
    nhood_size: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    distance_dtype: str = "float16",
) -> tuple[float, float]:
    """k-NN manifold `(precision, recall)` of `[N2, D]` samples against `[N1, D]` reference
    features: the fraction of samples within the reference manifold, and of reference
    points within the sample manifold (keywords: see `manifold_radii`)."""
    ref = np.asarray(ref_features, np.float32)
    sample = np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(
            f"Precision/recall needs [N, D] features of equal D; got {ref.shape}, {sample.shape}."
        )
    kw = dict(nhood_size=nhood_size, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    radii_ref = manifold_radii(ref, distance_dtype=distance_dtype, **kw)
    radii_sample = manifold_radii(sample, distance_dtype=distance_dtype, **kw)
    ref_in = np.zeros([ref.shape[0]], bool)  # reference point in the sample manifold
    sample_in = np.zeros([sample.shape[0]], bool)  # sample in the reference manifold
    for r0 in range(0, ref.shape[0], row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, sample.shape[0], col_batch_size):
            c1 = c0 + col_batch_size
            d = pairwise_distances(ref[r0:r1], sample[c0:c1], distance_dtype)
            rows_in, cols_in = _in_balls(d, radii_ref[r0:r1], radii_sample[c0:c1])
            ref_in[r0:r1] |= np.asarray(rows_in)
            sample_in[c0:c1] |= np.asarray(cols_in)
    return float(sample_in.mean()), float(ref_in.mean())
