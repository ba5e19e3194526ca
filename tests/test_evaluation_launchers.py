"""`launch.make_reference` and `launch.evaluate` end to end on tiny data.

make_reference runs as a subprocess (PNG folder -> reference npz). evaluate runs in-process
through its absl main, with the Frechet distance replaced by a recorder: a 2048-d `sqrtm`
takes ~40 s on this 2-core machine, and the distance itself is tested in
test_evaluation_metrics.py; here we check which statistics reach it.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from absl import flags  # noqa: E402

from diffusion_jax.evaluation import (  # noqa: E402
    activations_and_statistics,
    compute_features,
    compute_statistics,
    evaluator,
    inception_score,
    load_inception,
    metrics,
    open_image_npz,
    precision_recall,
    save_inception_npz,
)

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


@pytest.fixture(scope="module")
def weights_npz(tmp_path_factory):
    from test_inception import build_random_fid_inception

    tmp = tmp_path_factory.mktemp("weights")
    torch.save(build_random_fid_inception(seed=1).state_dict(), tmp / "w.pth")
    save_inception_npz(tmp / "w.pth", tmp / "w.npz")
    return tmp / "w.npz"


@pytest.fixture(scope="module")
def inception(weights_npz):
    return load_inception(weights_npz)


def _smooth_images(n, size, seed):
    # Low-frequency images: plausible photos for a random-weight Inception.
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3))
    return np.clip(coarse.repeat(size // 4, 1).repeat(size // 4, 2), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(weights_npz, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    images = _smooth_images(12, 32, seed=0)
    (tmp / "pngs").mkdir()
    for i, image in enumerate(images):
        PIL.fromarray(image).save(tmp / "pngs" / f"img_{i:02d}.png")
    (tmp / "pngs" / "img_99.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # skipped, counted
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable, "-m", "launch.make_reference", f"--images={tmp / 'pngs'}",
        f"--output={tmp / 'ref.npz'}", "--image_size=32", f"--inception_weights={weights_npz}",
        f"--batch_size={BATCH}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        f"Wrote a reference batch of 12 images to {tmp / 'ref.npz'} (1 unreadable image skipped)"
    )
    return tmp / "ref.npz", images


def test_make_reference_writes_paper_format(reference, inception):
    path, images = reference
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(data["arr_0"], images)  # center crop at own size
        stats = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (2023, 2023)
    assert stats["mu"].dtype == np.float64
    feats = compute_features(images, inception, batch_size=BATCH)
    mu, sigma = compute_statistics(feats["pool"])
    mu_s, sigma_s = compute_statistics(feats["spatial"])
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["mu_s"], mu_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma_s"], sigma_s, rtol=1e-4, atol=1e-5)


def test_evaluate_prints_reference_lines_and_caches(
    reference, inception, weights_npz, tmp_path, monkeypatch, capsys
):
    from launch import evaluate as evaluate_launcher

    ref_path, ref_images = reference
    samples = _smooth_images(10, 32, seed=1)
    sample_path = tmp_path / "samples.npz"
    np.savez(sample_path, samples, np.arange(10))

    recorded, printed_before = [], []

    def recording_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
        recorded.append((mu1, sigma1, mu2, sigma2))
        printed_before.append(capsys.readouterr().out)  # what was printed by now
        return float(len(recorded))  # FID -> 1.0, sFID -> 2.0

    monkeypatch.setattr(metrics, "frechet_distance", recording_distance)
    argv = flags.FLAGS(
        [
            "evaluate",
            str(ref_path),
            str(sample_path),
            f"--inception_weights={weights_npz}",
            "--is_split_size=4",
            f"--batch_size={BATCH}",
        ]
    )
    try:
        evaluate_launcher.main(argv)
    finally:
        flags.FLAGS.unparse_flags()
    out = ("".join(printed_before) + capsys.readouterr().out).strip().splitlines()

    ref_feats = compute_features(ref_images, inception, batch_size=BATCH)
    sample_feats = compute_features(samples, inception, batch_size=BATCH)
    precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"])
    # The paper's evaluator's lines, in its order (less its TF warm-up line).
    assert out == [
        "computing reference batch activations...",
        "computing/reading reference batch statistics...",
        "computing sample batch activations...",
        "computing/reading sample batch statistics...",
        "Computing evaluations...",
        f"Inception Score: {inception_score(sample_feats['logits'], 4)}",
        "FID: 1.0",
        "sFID: 2.0",
        f"Precision: {precision}",
        f"Recall: {recall}",
    ]
    # "Computing evaluations..." came out before the metrics were computed.
    assert printed_before[0].strip().splitlines()[-1] == "Computing evaluations..."
    # FID gets (samples, reference-from-file) pool statistics; sFID the spatial ones.
    with np.load(ref_path) as ref_data:
        for (mu1, sigma1, mu2, sigma2), key, suffix in zip(
            recorded, ("pool", "spatial"), ("", "_s")
        ):
            mu, sigma = compute_statistics(sample_feats[key])
            np.testing.assert_allclose(mu1, mu, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sigma1, sigma, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(mu2, ref_data["mu" + suffix])
            np.testing.assert_array_equal(sigma2, ref_data["sigma" + suffix])

    # Activations were cached beside both files; a second read does no Inception pass.
    def no_pass(*args, **kwargs):
        raise AssertionError("activations should come from the cache")

    monkeypatch.setattr(evaluator, "compute_features", no_pass)
    for path, feats in ((ref_path, ref_feats), (sample_path, sample_feats)):
        assert (path.parent / (path.name + ".inception.npz")).exists()
        cached, _ = activations_and_statistics(open_image_npz(path), inception)
        for key in ("pool", "spatial", "logits"):
            np.testing.assert_allclose(cached[key], feats[key], rtol=1e-5, atol=1e-6)
    # New contents (same shape, same second) invalidate the cache.
    np.savez(sample_path, samples[::-1])
    with pytest.raises(AssertionError, match="from the cache"):
        activations_and_statistics(open_image_npz(sample_path), inception)


def test_evaluate_reports_corrupt_member_as_error(weights_npz, tmp_path, monkeypatch):
    from test_evaluation_npz import _corrupt, _fake_compute_features

    from launch import evaluate as evaluate_launcher

    # The feature pass reads every batch (that is where a bad CRC shows) but runs no network.
    monkeypatch.setattr(evaluator, "compute_features", _fake_compute_features([]))
    rng = np.random.default_rng(0)
    for name in ("ref", "samples"):
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (8, 64, 64, 3), np.uint8))
    _corrupt(tmp_path / "samples.npz")
    argv = flags.FLAGS(
        [
            "evaluate",
            str(tmp_path / "ref.npz"),
            str(tmp_path / "samples.npz"),
            f"--inception_weights={weights_npz}",
            "--is_split_size=4",
            "--nocache",
        ]
    )
    try:
        # A ValueError, which launch.common.run_main prints as one `error:` line.
        with pytest.raises(ValueError) as error:
            evaluate_launcher.main(argv)
    finally:
        flags.FLAGS.unparse_flags()
    message = str(error.value)
    assert message.startswith("member 'arr_0.npy' of "), message
    assert "samples.npz is corrupt or truncated" in message and "Bad CRC-32" in message
