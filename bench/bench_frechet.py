"""Frechet distance: the eigenvalue form (`evaluation.frechet_distance`) against scipy's sqrtm.

  PYTHONPATH=. python bench/bench_frechet.py --dim=2048 --num_samples=1000,10000 --repeats=3

Statistics of random features with a decaying spectrum, as Inception pool features have,
from `num_samples` rows per set (fewer rows than dimensions gives the rank-deficient
covariances of a small evaluation). For each size: median seconds of both forms and their
relative difference. The sqrtm form is the reference evaluator's (sqrtm of sigma1 sigma2,
eps added to both diagonals when the root is not finite, real part kept).
"""

import functools
import statistics
import time
import warnings

import numpy as np
from absl import app, flags
from scipy import linalg

from diffusion_jax import evaluation

_DIM = flags.DEFINE_integer("dim", 2048, "Feature dimension.")
_NUM = flags.DEFINE_list("num_samples", ["1000", "10000"], "Rows per set, one run each.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")


def sqrtm_distance(mu1, s1, mu2, s2, eps=1e-6):
    """The reference evaluator's formula, restated for the comparison."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _statistics(rng, n, dim, shift):
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim))  # decaying spectrum
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    x = (rng.normal(size=(n, dim)) * scales) @ (np.eye(dim) + 0.3 * mix) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def _median_time(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    print("| dim | rows per set | eigh form (s) | sqrtm form (s) | relative difference |")
    print("|----:|-------------:|--------------:|---------------:|--------------------:|")
    for n in map(int, _NUM.value):
        mu1, s1 = _statistics(rng, n, _DIM.value, 0.0)
        mu2, s2 = _statistics(rng, n, _DIM.value, 0.05)
        evaluation.frechet_distance(mu1, s1, mu2, s2)  # warm-up (BLAS threads, page faults)
        stats = (mu1, s1, mu2, s2)
        t_eig, fid_eig = _median_time(
            functools.partial(evaluation.frechet_distance, *stats), _REPEATS.value
        )
        t_sqrtm, fid_sqrtm = _median_time(functools.partial(sqrtm_distance, *stats), _REPEATS.value)
        rel = abs(fid_eig - fid_sqrtm) / abs(fid_sqrtm)
        print(f"| {_DIM.value} | {n} | {t_eig:.2f} | {t_sqrtm:.1f} | {rel:.1e} |", flush=True)


if __name__ == "__main__":
    app.run(main)
