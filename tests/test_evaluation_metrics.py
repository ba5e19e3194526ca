"""FID, Inception Score and Precision/Recall against independent computations."""

import warnings

import numpy as np
import pytest
from scipy import linalg

from diffusion_jax.evaluation import (
    compute_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_distances,
    precision_recall,
)


def _scipy_fid(mu1, s1, mu2, s2):
    # Textbook formula with an eigen-decomposition route to tr(sqrt(s1 s2)):
    # tr((s1 s2)^1/2) = sum sqrt(eig(s1^1/2 s2 s1^1/2)).
    r1 = linalg.sqrtm(s1).real
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sum(np.sqrt(np.clip(eig, 0, None)))
    )


def test_fid_matches_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    np.testing.assert_allclose(mu1, a.mean(0))
    np.testing.assert_allclose(s1, np.cov(a.T))
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert fid == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-8)
    assert fid == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)  # symmetric
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        expected, rel=1e-10
    )


def _sqrtm_fid(mu1, s1, mu2, s2, eps=1e-6):
    # The paper's evaluator's form: sqrtm of the product, eps retry, real part.
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_fid_matches_sqrtm_form_rank_deficient():
    # 320-d covariances of 120 and 200 samples (ranks 119 and 199, so the product is
    # singular), features with a decaying spectrum as Inception's: the eigenvalue form
    # agrees with the reference's sqrtm to 1e-6 relative (bench_frechet: 2048-d, measured
    # 9e-8 from 1000 samples).
    rng = np.random.default_rng(3)
    dim, scales = 320, 1.0 / np.sqrt(1.0 + np.arange(320))
    mix = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = (rng.normal(size=(120, dim)) * scales) @ mix
    b = (rng.normal(size=(200, dim)) * scales) @ mix + 0.02
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's near-singular warnings
        expected = _sqrtm_fid(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fid_closed_form_commuting_rank_deficient():
    # Covariances sharing eigenvectors: tr((s1 s2)^1/2) = sum sqrt(a_i b_i) exactly. Rank
    # deficient (zero eigenvalues in each, at different places), Inception-like decaying
    # spectra, rounding noise from the rotation. (2048-d costs seconds on a loaded 2-core
    # CPU; bench_frechet covers that scale.)
    rng = np.random.default_rng(4)
    dim = 384
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = rng.uniform(0, 2, dim) / np.sqrt(1.0 + np.arange(dim))
    b = rng.uniform(0, 2, dim) / np.sqrt(1.0 + np.arange(dim))
    a[180:], b[150:270] = 0.0, 0.0  # ranks 180 and 264
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    fid = frechet_distance(mu1, s1, mu2, s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a) + np.sum(b) - 2 * np.sum(np.sqrt(a * b))
    assert fid == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(3), np.eye(3) * np.nan, np.zeros(3), np.eye(3))


def _is_by_definition(logits, split):
    scores = []
    for s in range(0, len(logits), split):
        z = logits[s : s + split]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        scores.append(np.exp(np.mean([np.sum(pi * np.log(pi / py)) for pi in p])))
    return np.mean(scores)


def test_inception_score_by_definition():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 10)) * 3
    assert inception_score(logits, split_size=20) == pytest.approx(
        _is_by_definition(logits, 20), rel=1e-10
    )  # splits of 20, 20 and a short 10, as the reference
    # Confident, evenly spread predictions over C classes give IS = C; constant ones 1.
    confident = np.eye(10)[np.arange(50) % 10] * 200.0
    assert inception_score(confident, split_size=50) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.tile(logits[:1], (50, 1)), split_size=50) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="split_size=5000"):
        inception_score(logits)


def _brute_force_pr(ref, sample, k=3):
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((sample[:, None] - sample[None]) ** 2).sum(-1)
    d_rs = ((ref[:, None] - sample[None]) ** 2).sum(-1)
    r_ref = np.sort(d_rr, axis=1)[:, k]
    r_sample = np.sort(d_ss, axis=1)[:, k]
    precision = np.mean(np.any(d_rs <= r_ref[:, None], axis=0))
    recall = np.mean(np.any(d_rs <= r_sample[None, :], axis=1))
    return r_ref, precision, recall


@pytest.mark.parametrize("batch", [(7, 5), (100, 100)])
def test_precision_recall_matches_brute_force(batch):
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(37, 6)).astype(np.float32)
    sample = (rng.normal(size=(29, 6)) * 0.8 + 0.7).astype(np.float32)
    r_ref, precision, recall = _brute_force_pr(ref.astype(np.float64), sample.astype(np.float64))
    rows, cols = batch
    kw = dict(row_batch_size=rows, col_batch_size=cols, distance_dtype="float32")
    np.testing.assert_allclose(manifold_radii(ref, **kw), r_ref, rtol=1e-4)
    p, r = precision_recall(ref, sample, **kw)
    assert 0 < p < 1 and 0 < r < 1
    assert (p, r) == (pytest.approx(precision), pytest.approx(recall))


def test_float16_distances_follow_reference_rounding_and_fall_back():
    rng = np.random.default_rng(4)
    u = rng.uniform(0, 2, size=(9, 64)).astype(np.float32)
    v = rng.uniform(0, 2, size=(5, 64)).astype(np.float32)
    # The TF graph: float16 inputs, |u|^2 - 2 u.v + |v|^2, each op rounded to float16.
    h = lambda x: np.asarray(x, np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
    u16, v16 = h(u), h(v)
    nu = h(np.sum(h(u16 * u16), 1))[:, None]
    nv = h(np.sum(h(v16 * v16), 1))[None, :]
    expected = np.maximum(h(h(nu - h(2 * h(u16 @ v16.T))) + nv), 0)
    got = np.asarray(pairwise_distances(u, v, "float16"))
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-2)
    exact = ((u[:, None] - v[None]) ** 2).sum(-1)
    assert np.max(np.abs(got - exact)) > 1e-3  # float16 rounding is really applied
    # Norms beyond float16's range overflow; the block is recomputed in float32.
    big_u, big_v = u * 100, v * 100
    np.testing.assert_allclose(
        np.asarray(pairwise_distances(big_u, big_v, "float16")),
        np.asarray(pairwise_distances(big_u, big_v, "float32")),
    )
    np.testing.assert_allclose(
        np.asarray(pairwise_distances(u, v, "float32")), exact, rtol=1e-4, atol=1e-3
    )
    with pytest.raises(ValueError, match="distance_dtype"):
        pairwise_distances(u, v, "bfloat16")


def test_precision_recall_identical_sets_and_errors():
    feats = np.random.default_rng(5).normal(size=(20, 4)).astype(np.float32)
    assert precision_recall(feats, feats, row_batch_size=6, col_batch_size=6) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3 images"):
        manifold_radii(feats[:3])
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(feats, feats[:, :3])
