"""The evaluator with a classifier as its feature network, against a numpy restatement.

A tiny random classifier is saved as a checkpoint; its penultimate features are taken
independently (the input of its last linear layer, `c_proj`, captured with
`nn.intercept_methods` while the plain logits path runs), and FID (scipy sqrtm),
precision/recall (explicit pairwise distances and k-NN radii) and the Inception-Score
analogue (softmax) are computed from them in numpy; the library and `launch.evaluate
--features` must give the same numbers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from scipy import linalg

from diffusion_jax import evaluation
from diffusion_jax.checkpoints import save_params
from diffusion_jax.evaluation import evaluator

SIZE, SPLIT = 8, 8


def _config(seed_channels=32):
    from configs.base import get_base_config

    config = get_base_config()
    m = config.model
    m.kind, m.image_size, m.num_channels, m.num_res_blocks = "classifier", SIZE, seed_channels, 1
    m.channel_mult, m.attention_resolutions, m.dtype = (1, 2), (4,), "float32"
    m.num_classes, m.num_head_channels = 5, 32
    return config


def _random_params(module, seed):
    rng = np.random.default_rng(seed)
    x, t = jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, t)["params"]
    return jax.tree.map(lambda s: np.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusion_jax.models import create_classifier

    root = tmp_path_factory.mktemp("clf")
    config = _config()
    module = create_classifier(config.model)
    params = _random_params(module, 0)
    save_params(root / "clf", params, config)
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    np.savez(root / "ref.npz", ref)
    np.savez(root / "samples.npz", samples)
    return root, module, params, ref, samples


def _brute_force(module, params, ref, samples):
    def run(images):
        captured = []

        def grab_c_proj_input(next_fun, args, kwargs, context):
            if context.module.name == "c_proj" and context.method_name == "__call__":
                captured.append(np.asarray(args[0])[:, 0])  # the pooled token [B, C]
            return next_fun(*args, **kwargs)

        x = images.astype(np.float32) / 127.5 - 1.0
        with nn.intercept_methods(grab_c_proj_input):
            logits = module.apply({"params": params}, x, np.zeros(len(x), np.int32))
        return captured[0].astype(np.float64), np.asarray(logits, np.float64)

    (f_ref, _), (f_s, logits) = run(ref), run(samples)

    def fid(a, b):
        mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a.T), np.cov(b.T)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            off = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
        d = mu1 - mu2
        return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)

    def radii(f):
        d = ((f[:, None] - f[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, 3]  # 3rd neighbour, self (0) at index 0

    cross = ((f_ref[:, None] - f_s[None]) ** 2).sum(-1)  # [N_ref, N_s]
    precision = np.mean((cross <= radii(f_ref)[:, None]).any(0))
    recall = np.mean((cross <= radii(f_s)[None, :]).any(1))
    scores = []
    for s in range(0, len(logits), SPLIT):
        p = np.exp(logits[s : s + SPLIT] - logits[s : s + SPLIT].max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), 1))))
    return {
        "fid": fid(f_s, f_ref),
        "precision": precision,
        "recall": recall,
        "is": np.mean(scores),
        "dim": f_s.shape[1],
    }


@pytest.fixture(scope="module")
def expected(setup):
    _, module, params, ref, samples = setup
    return _brute_force(module, params, ref, samples)


def _check(result, want):
    assert result.fid == pytest.approx(want["fid"], rel=1e-4, abs=1e-6)
    assert result.inception_score == pytest.approx(want["is"], rel=1e-5)
    assert (result.precision, result.recall) == pytest.approx((want["precision"], want["recall"]))
    assert np.isnan(result.sfid)


def test_classifier_features_match_brute_force_and_cache_by_checkpoint(
    setup, expected, tmp_path, monkeypatch
):
    root, module, _, _, _ = setup
    net = evaluation.load_classifier_features(root / "clf")
    assert expected["dim"] == 64  # the attention pool's channels, not the 5 classes
    assert expected["fid"] > 100 and expected["is"] > 2  # features that tell images apart
    kw = dict(batch_size=8, split_size=SPLIT, distance_dtype="float32")
    result = evaluation.evaluate_npz(root / "ref.npz", root / "samples.npz", net, **kw)
    _check(result, expected)
    assert "sFID: not applicable (the feature network has no spatial features)" in result.lines()
    assert (root / "ref.npz.classifier.npz").exists()

    # The cache serves the same checkpoint; another checkpoint recomputes.
    def no_pass(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(evaluator, "compute_features", no_pass)
    _check(evaluation.evaluate_npz(root / "ref.npz", root / "samples.npz", net, **kw), expected)
    config = _config()
    save_params(tmp_path / "other", _random_params(module, 7), config)
    other = evaluation.load_classifier_features(tmp_path / "other")
    assert other.cache_id != net.cache_id
    with pytest.raises(AssertionError, match="recomputed"):
        evaluation.evaluate_npz(root / "ref.npz", root / "samples.npz", other, **kw)


def test_bad_feature_directories_and_resolution(setup, tmp_path):
    root = setup[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.load_classifier_features(tmp_path / "missing")
    config = _config()
    config.model.kind = "unet"
    save_params(tmp_path / "unet", {"w": np.zeros(3, np.float32)}, config)
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        evaluation.load_classifier_features(tmp_path / "unet")
    np.savez(tmp_path / "big.npz", np.zeros((16, 2 * SIZE, 2 * SIZE, 3), np.uint8))
    net = evaluation.load_classifier_features(root / "clf")
    with pytest.raises(ValueError, match="takes 8x8 images; got 16x16"):
        evaluation.evaluate_npz(tmp_path / "big.npz", tmp_path / "big.npz", net, split_size=SPLIT)


def test_evaluate_launcher_features_flag(setup, expected, capsys):
    from launch import evaluate as evaluate_launcher

    root = setup[0]
    argv = flags.FLAGS(
        ["evaluate", str(root / "ref.npz"), str(root / "samples.npz"), f"--features={root / 'clf'}",
         f"--is_split_size={SPLIT}", "--batch_size=8", "--pr_distance_dtype=float32",
         "--nocache"]
    )  # fmt: skip
    try:
        evaluate_launcher.main(argv)
    finally:
        flags.FLAGS.unparse_flags()
    lines = dict(
        line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line
    )
    assert float(lines["FID"]) == pytest.approx(expected["fid"], rel=1e-4, abs=1e-6)
    assert float(lines["Inception Score"]) == pytest.approx(expected["is"], rel=1e-5)
    assert float(lines["Precision"]) == pytest.approx(expected["precision"])
    assert float(lines["Recall"]) == pytest.approx(expected["recall"])
    assert lines["sFID"].startswith("not applicable")
