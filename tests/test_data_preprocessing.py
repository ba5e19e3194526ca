"""Parity of the preprocessing with the paper code (guided-diffusion-sdk) on real photos."""

import importlib.util
import io
import sys
import types

import numpy as np
import pytest
from etils import epath
from PIL import Image

from diffusion_jax.data import area_downsample, center_crop_arr, decode_image, random_crop_arr
from diffusion_jax.data.preprocessing import UnreadableImageError, to_float


@pytest.fixture(scope="module")
def ref():
    """The paper code's image_datasets module (mpi4py stubbed: it is only imported)."""
    sys.modules.setdefault("mpi4py", types.SimpleNamespace(MPI=types.SimpleNamespace()))
    from guided_diffusion import image_datasets

    return image_datasets


def _sklearn_photo(name):
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (requirements-dev.txt) ships the test photographs")
    return epath.Path(spec.origin).parent / "datasets" / "images" / name


@pytest.fixture(scope="module")
def photos():
    """Real photographs as JPEG round trips, in many sizes and aspect ratios."""
    originals = [Image.open(_sklearn_photo(n)).convert("RGB") for n in ("china.jpg", "flower.jpg")]
    sizes = [
        (640, 427), (427, 640), (500, 375), (333, 500), (1280, 854), (1100, 300),
        (257, 311), (129, 97), (64, 64), (65, 300), (401, 353), (96, 2000),
    ]  # fmt: skip
    out = []
    for i, (w, h) in enumerate(sizes):
        src = originals[i % 2]
        # A crop of the right aspect ratio, resized: real photographic content at each size.
        cw = min(src.width, round(src.height * w / h))
        ch = min(src.height, round(src.width * h / w))
        img = src.crop((i * 7 % (src.width - cw + 1), 0, i * 7 % (src.width - cw + 1) + cw, ch))
        img = img.resize((w, h), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(decode_image(buf.getvalue()))
    return out


@pytest.mark.parametrize("image_size", [32, 63, 64, 128, 256])
def test_center_crop_matches_paper_code_pixel_exactly(ref, photos, image_size):
    box_reductions = 0
    for img in photos:
        ours = center_crop_arr(img, image_size)
        theirs = ref.center_crop_arr(img, image_size)
        assert ours.dtype == np.uint8 and ours.shape == (image_size, image_size, 3)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{img.size} -> {image_size}")
        box_reductions += min(img.size) >= 2 * image_size
    if image_size <= 128:
        assert box_reductions > 0  # the BOX-halving branch was exercised


def test_center_crop_is_sensitive_to_the_resize_path(photos):
    # Guards the parity test: a plain BICUBIC resize (no BOX halving) differs.
    img = photos[4]  # 1280x854
    direct = np.asarray(img.resize((96, 64), Image.BICUBIC))[:, 16:80]
    assert not np.array_equal(center_crop_arr(img, 64), direct)


class _Draws:
    """Replays one list of draws to our rng and to the paper code's `random`."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = []

    def integers(self, low, high):
        v = low + self.values.pop(0) % (high - low)
        self.calls.append(v)
        return v


def test_random_crop_matches_paper_code(ref, photos, monkeypatch):
    for seed, img in enumerate(photos):
        raw = np.random.default_rng(seed).integers(0, 10_000, size=3).tolist()
        ours_rng = _Draws(raw)
        ours = random_crop_arr(img, 56, ours_rng)
        replay = list(ours_rng.calls)
        monkeypatch.setattr(ref.random, "randrange", lambda *a, r=replay: r.pop(0))
        theirs = ref.random_crop_arr(img, 56)
        np.testing.assert_array_equal(ours, theirs)
        assert ours.shape == (56, 56, 3)


def test_area_downsample_matches_torch_interpolate_area():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for (h, w), size in [((64, 64), 16), ((32, 32), 8), ((30, 30), 7), ((12, 12), 12)]:
        x = rng.uniform(-1, 1, size=(2, h, w, 3)).astype(np.float32)  # [B, H, W, C]
        theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size, mode="area")
        ours = area_downsample(x, size)
        assert ours.dtype == np.float32 and ours.shape == (2, size, size, 3)
        np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=2e-7, rtol=0)


def test_to_float_is_the_paper_affine_map():
    x = np.array([0, 1, 127, 128, 255], np.uint8)
    np.testing.assert_array_equal(to_float(x), x.astype(np.float32) / 127.5 - 1)
    assert to_float(x).dtype == np.float32 and to_float(x)[[0, -1]].tolist() == [-1.0, 1.0]


def test_truncated_and_garbage_bytes_raise_unreadable(photos):
    buf = io.BytesIO()
    photos[0].save(buf, format="JPEG")
    with pytest.raises(UnreadableImageError, match=r"cannot decode image x\.jpg"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2], "x.jpg")
    with pytest.raises(UnreadableImageError):
        decode_image(b"not an image")


def test_bad_arguments_name_the_parameter():
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        center_crop_arr(img, 0)
    with pytest.raises(ValueError, match="low-resolution size"):
        area_downsample(np.zeros((1, 8, 8, 3), np.float32), 9)
