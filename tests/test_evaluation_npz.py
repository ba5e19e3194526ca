"""Reading and validating the paper's `.npz` batches: clear errors on bad input."""

import numpy as np
import pytest

from diffusion_jax.evaluation import check_images, evaluate_npz, open_image_npz


def _images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_streamed_batches_equal_file_contents(tmp_path):
    images = _images(10)
    np.savez(tmp_path / "s.npz", images, np.arange(10))
    npz = open_image_npz(tmp_path / "s.npz")
    assert (npz.num_images, npz.resolution, npz.dtype) == (10, (8, 8), np.uint8)
    batches = list(npz.iter_batches(4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert npz.read_statistics() is None
    # A Fortran-ordered array cannot be streamed; it is loaded whole, same result.
    np.savez(tmp_path / "f.npz", np.asfortranarray(images))
    np.testing.assert_array_equal(
        np.concatenate(list(open_image_npz(tmp_path / "f.npz").iter_batches(3))), images
    )


def test_missing_arr_0(tmp_path):
    np.savez(tmp_path / "s.npz", images=_images(2))
    with pytest.raises(ValueError, match=r"has no 'arr_0' array \(it has \['images'\]\)"):
        open_image_npz(tmp_path / "s.npz")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (_images(3).astype(np.float32) / 127.5 - 1, r"float32 with range \[-1.0, .*127.5"),
        (np.full((2, 8, 8, 3), 300, np.int16), r"int16 .*outside \[0, 255\]"),
        (_images(2)[..., 0], r"\[N, H, W, 3\].*\(2, 8, 8\)"),
        (_images(2)[..., :1].repeat(4, -1), r"\[N, H, W, 3\].*\(2, 8, 8, 4\)"),
    ],
)
def test_wrong_dtype_range_or_shape(tmp_path, array, message):
    np.savez(tmp_path / "s.npz", array)
    with pytest.raises(ValueError, match=message):
        open_image_npz(tmp_path / "s.npz")
    with pytest.raises(ValueError, match=message):
        check_images(array)


def test_corrupt_or_missing_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        open_image_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "ok.npz", _images(4))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        open_image_npz(tmp_path / "cut.npz")
    with pytest.raises(FileNotFoundError, match=r"missing\.npz does not exist"):
        open_image_npz(tmp_path / "missing.npz")


def test_partial_reference_statistics(tmp_path):
    np.savez(tmp_path / "r.npz", _images(2), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=r"lacks \['mu_s', 'sigma_s'\]"):
        open_image_npz(tmp_path / "r.npz").read_statistics()


def test_evaluate_checks_split_and_resolution_before_computing(tmp_path):
    # No Inception is needed: these checks run before any feature pass.
    np.savez(tmp_path / "ref.npz", _images(6, size=32))
    np.savez(tmp_path / "s16.npz", _images(6, size=16))
    np.savez(tmp_path / "s32.npz", _images(6, size=32))
    with pytest.raises(ValueError, match=r"\(32, 32\) images but samples .* have \(16, 16\)"):
        evaluate_npz(tmp_path / "ref.npz", tmp_path / "s16.npz", None, split_size=4)
    with pytest.raises(ValueError, match=r"6 images, fewer than one Inception Score split"):
        evaluate_npz(tmp_path / "ref.npz", tmp_path / "s32.npz", None)
    with pytest.raises(ValueError, match="split_size=5000"):
        evaluate_npz(
            tmp_path / "ref.npz", tmp_path / "s16.npz", None, allow_resolution_mismatch=True
        )


# --- statistics checked up front, cache keys, corrupt members, reference-batch memory ---


def _fake_compute_features(calls):
    """A stand-in for `compute_features` that reads every batch but runs no network."""

    def fake(images, inception_model, *, mesh=None, batch_size=256, num_images=None):
        batches = [images] if isinstance(images, np.ndarray) else images
        n = sum(int(np.asarray(b).shape[0]) for b in batches)  # consumes (reads) the file
        calls.append(n)
        rng = np.random.default_rng(len(calls))
        return {
            "pool": rng.normal(size=(n, 3)).astype(np.float32),
            "spatial": rng.normal(size=(n, 2)).astype(np.float32),
            "logits": rng.normal(size=(n, 5)).astype(np.float32),
        }

    return fake


def _fake_inception(precision=None):
    import jax

    from diffusion_jax.evaluation import Inception, InceptionV3FID

    precision = jax.lax.Precision.HIGHEST if precision is None else precision
    return Inception(params={}, fingerprint="w0", module=InceptionV3FID(precision=precision))


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, r"lacks \['mu_s', 'sigma_s'\]"),
        ({"mu_s": np.zeros(2023)}, r"lacks \['mu', 'sigma', 'sigma_s'\]"),
        (
            {"mu": np.zeros(16), "sigma": np.eye(16), "mu_s": np.zeros(7), "sigma_s": np.eye(7)},
            r"'mu' has shape \(16,\), but the paper's reference batches store \(2048,\)",
        ),
    ],
)
def test_bad_reference_statistics_fail_before_any_feature_pass(
    tmp_path, monkeypatch, stats, message
):
    from diffusion_jax.evaluation import evaluator

    def no_pass(*args, **kwargs):
        raise AssertionError("no Inception pass should run for a bad reference batch")

    monkeypatch.setattr(evaluator, "compute_features", no_pass)
    np.savez(tmp_path / "ref.npz", _images(6), **stats)
    np.savez(tmp_path / "s.npz", _images(6))
    with pytest.raises(ValueError, match=message):
        open_image_npz(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match=message):
        evaluate_npz(tmp_path / "ref.npz", tmp_path / "s.npz", _fake_inception(), split_size=2)


def test_activation_cache_is_keyed_by_precision(tmp_path, monkeypatch):
    import jax

    from diffusion_jax.evaluation import activations_and_statistics, evaluator

    calls = []
    monkeypatch.setattr(evaluator, "compute_features", _fake_compute_features(calls))
    np.savez(tmp_path / "s.npz", _images(6))
    npz = open_image_npz(tmp_path / "s.npz")
    highest, default = _fake_inception(), _fake_inception(jax.lax.Precision.DEFAULT)
    feats, _ = activations_and_statistics(npz, highest)
    assert calls == [6]
    cached, _ = activations_and_statistics(npz, highest)  # same settings: from the cache
    assert calls == [6]
    np.testing.assert_array_equal(cached["pool"], feats["pool"])
    activations_and_statistics(npz, default)  # other precision: recomputed, not reused
    assert calls == [6, 6]
    other_weights = _fake_inception()
    object.__setattr__(other_weights, "fingerprint", "w1")
    activations_and_statistics(npz, other_weights)
    assert calls == [6, 6, 6]


def _corrupt(path):
    # Flips bytes in the middle of the first member's (possibly deflated) data.
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    middle = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    for i in range(middle, middle + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_corrupt_member_is_a_clear_error(tmp_path, save):
    save(tmp_path / "s.npz", _images(20, size=64))  # larger than one zip read chunk
    _corrupt(tmp_path / "s.npz")
    npz = open_image_npz(tmp_path / "s.npz")  # the header is intact
    message = r"member 'arr_0\.npy' of .*s\.npz is corrupt or truncated"
    with pytest.raises(ValueError, match=message):
        list(npz.iter_batches(4))
    # A reference batch whose statistics are damaged.
    np.savez(
        tmp_path / "r.npz",
        mu=np.zeros(2048),
        sigma=np.eye(2048),
        mu_s=np.zeros(2023),
        sigma_s=np.eye(2023),
        arr_0=_images(4),
    )
    _corrupt(tmp_path / "r.npz")  # 'mu' is the first member
    with pytest.raises(ValueError, match=r"member 'mu\.npy' of .*r\.npz is corrupt"):
        open_image_npz(tmp_path / "r.npz").read_statistics()


@pytest.mark.parametrize("hint", [None, 8, 64, 200])
def test_write_reference_batch_contents_for_any_count_hint(tmp_path, monkeypatch, hint):
    from diffusion_jax.evaluation import evaluator, write_reference_batch

    monkeypatch.setattr(evaluator, "compute_features", _fake_compute_features([]))
    images = _images(64)
    batches = (images[i : i + 5] for i in range(0, 64, 5))
    n = write_reference_batch(batches, tmp_path / "r.npz", _fake_inception(), num_images=hint)
    assert n == 64
    with np.load(tmp_path / "r.npz") as data:
        assert data.files == ["arr_0", "mu", "sigma", "mu_s", "sigma_s"]
        np.testing.assert_array_equal(data["arr_0"], images)
    mixed = iter([_images(2, size=8), _images(2, size=16)])
    with pytest.raises(ValueError, match="needs one resolution"):
        write_reference_batch(mixed, tmp_path / "m.npz", _fake_inception())


def test_write_reference_batch_holds_images_once(tmp_path, monkeypatch):
    # Peak traced memory while collecting and writing ~96 MB of images stays near 1x
    # (a list of batches plus np.concatenate needs 2x).
    import tracemalloc

    from diffusion_jax.evaluation import evaluator, write_reference_batch

    monkeypatch.setattr(evaluator, "compute_features", _fake_compute_features([]))
    num_batches, batch_shape = 96, (16, 128, 128, 3)  # 96 x 786 KB
    total = num_batches * int(np.prod(batch_shape))

    def batches():
        for i in range(num_batches):
            yield np.full(batch_shape, i, np.uint8)

    tracemalloc.start()
    try:
        write_reference_batch(batches(), tmp_path / "r.npz", _fake_inception())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * total, f"peak {peak / total:.2f}x the images"
    with np.load(tmp_path / "r.npz") as data:
        arr = data["arr_0"]
    assert arr.shape == (num_batches * 16, 128, 128, 3)
    assert arr[::16, 0, 0, 0].tolist() == list(range(num_batches))
