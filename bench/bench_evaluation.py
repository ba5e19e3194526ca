"""Evaluator throughput: Inception features (images/s), precision/recall and FID timings.

  PYTHONPATH=. python bench/bench_evaluation.py --num_images=2048 --batch_size=256 \
      --pr_num=50000 --fid_dim=2048

Random Inception weights (same graph and cost as the real ones; nothing is downloaded),
random uint8 images at --image_size. Compilation is excluded (one warm-up batch);
figures are medians of --repeats runs. On a 2-core CPU use tiny settings, e.g.
`--num_images=16 --batch_size=8 --pr_num=2000 --fid_dim=256 --repeats=1`.
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from diffusion_jax import evaluation, parallel
from diffusion_jax.evaluation import inception as inception_lib

_NUM = flags.DEFINE_integer("num_images", 2048, "Images in the timed feature pass.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch of the feature pass.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Side of the input images.")
_PR_NUM = flags.DEFINE_integer("pr_num", 50000, "Feature rows per set for precision/recall.")
_PR_BLOCK = flags.DEFINE_integer("pr_block", 10000, "Row/column block of the distances.")
_FID_DIM = flags.DEFINE_integer("fid_dim", 2048, "Dimension of the Frechet-distance timing.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_COMPARE = flags.DEFINE_string(
    "compare_precision", "", "Also time features at this jax.lax.Precision (e.g. DEFAULT) and "
    "report |FID(halves) - FID(halves) at HIGHEST|; random weights, so a proxy only.",
)  # fmt: skip


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    module = inception_lib.InceptionV3FID()
    shapes = inception_lib.init_params_shapes(module)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) * 0.05 + (s.ndim == 1)).astype(np.float32), shapes
    )
    model = evaluation.Inception(params=params, fingerprint="bench", module=module)
    mesh = parallel.create_mesh()
    images = rng.integers(0, 256, (_NUM.value, _SIZE.value, _SIZE.value, 3), dtype=np.uint8)
    evaluation.compute_features(images[: _BATCH.value], model, mesh=mesh, batch_size=_BATCH.value)
    t_feat = _median_time(
        lambda: evaluation.compute_features(images, model, mesh=mesh, batch_size=_BATCH.value),
        _REPEATS.value,
    )
    rows = []
    rows.append(("Inception features", f"{_NUM.value / t_feat:.1f} images/s"))
    rows.append(("  -> 50,000 images", f"{50000 / (_NUM.value / t_feat):.0f} s"))
    if _COMPARE.value:
        precision = getattr(jax.lax.Precision, _COMPARE.value.upper())
        fast = evaluation.Inception(
            params=params, fingerprint="bench-fast", module=inception_lib.InceptionV3FID(
                precision=precision)
        )  # fmt: skip
        evaluation.compute_features(
            images[: _BATCH.value], fast, mesh=mesh, batch_size=_BATCH.value
        )
        t_fast = _median_time(
            lambda: evaluation.compute_features(images, fast, mesh=mesh, batch_size=_BATCH.value),
            _REPEATS.value,
        )
        rows.append(
            (f"Inception features, {_COMPARE.value}", f"{_NUM.value / t_fast:.1f} images/s")
        )
        fids = []
        for m in (model, fast):
            pool = evaluation.compute_features(images, m, mesh=mesh, batch_size=_BATCH.value)
            pool = np.asarray(pool["pool"], np.float64)
            half = len(pool) // 2
            mu_a, sig_a = evaluation.compute_statistics(pool[:half])
            mu_b, sig_b = evaluation.compute_statistics(pool[half:])
            fids.append(evaluation.frechet_distance(mu_a, sig_a, mu_b, sig_b))
        rows.append((f"FID(halves) HIGHEST vs {_COMPARE.value}", f"{fids[0]:.5f} vs {fids[1]:.5f}"
                     f" (|diff| {abs(fids[0] - fids[1]):.2e})"))  # fmt: skip
    feats = np.abs(rng.standard_normal((2, _PR_NUM.value, 2048))).astype(np.float32)
    for dtype in ("float16", "float32"):
        kw = dict(row_batch_size=_PR_BLOCK.value, col_batch_size=_PR_BLOCK.value)
        evaluation.precision_recall(feats[0, :100], feats[1, :100], distance_dtype=dtype, **kw)
        t = _median_time(
            lambda d=dtype, k=kw: evaluation.precision_recall(
                feats[0], feats[1], distance_dtype=d, **k
            ),
            _REPEATS.value,
        )
        rows.append((f"precision/recall {_PR_NUM.value}x{_PR_NUM.value} ({dtype})", f"{t:.2f} s"))
    x = rng.standard_normal((2 * _FID_DIM.value, _FID_DIM.value))
    mu, sigma = evaluation.compute_statistics(x)
    t_fid = _median_time(lambda: evaluation.frechet_distance(mu, sigma, mu + 0.1, sigma), 1)
    rows.append((f"Frechet distance, D={_FID_DIM.value} (scipy sqrtm)", f"{t_fid:.2f} s"))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        rows.append(("peak device memory", f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB"))
    print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    app.run(main)
