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
    np.testing.assert_array_equal(npz.read_images(), images)
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
