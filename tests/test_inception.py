"""The Flax FID Inception against pytorch-fid's port of the same TF graph, on random weights.

pytorch-fid's FID Inception is assembled from its own blocks without its weight download,
every parameter and batch-norm statistic is filled with seeded random values, the state
dict is saved as a `.pth`, and `load_inception` reads that file. Both sides then see the
same TF-normalised 299x299 input; pytorch-fid's own resize/normalisation differ from the
TF1 graph's, so the torch reference runs its blocks directly.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")
tf_interp = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")

import jax  # noqa: E402

from diffusion_jax import parallel  # noqa: E402
from diffusion_jax.evaluation import (  # noqa: E402
    FID_WEIGHTS_FILENAME,
    compute_features,
    fetch_default_weights,
    load_inception,
    read_state_dict,
    resize_bilinear_tf1,
    save_inception_npz,
)

RTOL = 1e-4


def build_random_fid_inception(seed: int = 0):
    """pytorch-fid's FID Inception-v3 (as `fid_inception_v3` builds it) with random weights."""
    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):  # He scaling keeps activations O(1) through ReLUs
                new = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
            elif name.endswith(("running_var", "bn.weight")):  # positive
                new = torch.rand(value.shape, generator=gen) + 0.5
            elif name.endswith(("running_mean", "bn.bias", "fc.bias")):
                new = torch.randn(value.shape, generator=gen) * 0.1
            elif name == "fc.weight":
                new = torch.randn(value.shape, generator=gen) / 2048**0.5
            else:
                raise KeyError(f"unexpected parameter {name}")
            value.copy_(new)
    return net.eval()


_TORCH_BLOCKS = [
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
]


def torch_reference_features(net, x_nchw):
    """pool_3, mixed_6/conv[..., :7] (NHWC-flattened) and unbiased logits of the torch net."""
    captured = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(s=o))
    with torch.no_grad():
        x = x_nchw
        for name in _TORCH_BLOCKS:
            x = getattr(net, name)(x)
        hook.remove()
        pool = x.flatten(1)
        spatial = captured["s"].permute(0, 2, 3, 1)[..., :7].reshape(len(x), -1)
        return {
            "pool": pool.numpy(),
            "spatial": spatial.numpy(),
            "logits": (pool @ net.fc.weight.T).numpy(),
        }


def tf1_input(images_uint8):
    """The TF graph's preprocessing, built from torch-fidelity's TF1 resize."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    x = tf_interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    return (x - 128) / 128


@pytest.fixture(scope="module")
def torch_net():
    return build_random_fid_inception()


@pytest.fixture(scope="module")
def weights_path(torch_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    torch.save(torch_net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(weights_path):
    return load_inception(weights_path)


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("size", [299, 64])
def test_features_match_pytorch_fid(inception, torch_net, size):
    images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    ref = torch_reference_features(torch_net, tf1_input(images))
    ours = inception(images)
    assert {k: v.shape for k, v in ours.items()} == {
        "pool": (2, 2048),
        "spatial": (2, 7 * 17 * 17),
        "logits": (2, 1008),
    }
    for key in ("pool", "spatial", "logits"):
        assert np.std(ref[key]) > 0.1, key  # random weights still give informative features
        assert _rel_err(ours[key], ref[key]) < RTOL, key


@pytest.mark.parametrize("size", [(64, 64), (128, 128), (256, 256), (37, 300)])
def test_resize_matches_torch_fidelity_tf1(size):
    rng = np.random.default_rng(sum(size))
    images = rng.integers(0, 256, (2, *size, 3)).astype(np.float32)
    ref = tf_interp.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299), align_corners=False
    )
    ours = np.asarray(resize_bilinear_tf1(images))
    # Same float32 operations in the same order: bit-identical.
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())
    # The TF1 legacy grid differs from a half-pixel-centred bilinear resize.
    plain = np.asarray(jax.image.resize(images, (2, 299, 299, 3), "bilinear"))
    assert np.max(np.abs(plain - ours)) > 1.0


def test_npz_weights_load_identically(weights_path, inception, tmp_path):
    npz = tmp_path / "weights.npz"
    save_inception_npz(weights_path, npz)
    state = read_state_dict(npz)
    assert "fc.weight" in state and state["fc.weight"].shape == (1008, 2048)
    from_npz = load_inception(npz)
    assert from_npz.fingerprint == inception.fingerprint
    jax.tree.map(np.testing.assert_array_equal, from_npz.params, inception.params)


def test_wrong_state_dict_is_rejected(tmp_path, torch_net):
    state = dict(torch_net.state_dict())
    del state["Mixed_6d.branch1x1.conv.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['Mixed_6d.branch1x1.kernel'\].*extra.weight"):
        load_inception(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_inception(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth is not a PyTorch file"):
        load_inception(tmp_path / "junk.pth")
    # An image batch passed as weights is recognised by its names, before any conversion.
    np.savez(tmp_path / "images.npz", np.zeros((2, 8, 8, 3), np.uint8), np.arange(2))
    with pytest.raises(ValueError, match=r"images\.npz is not the FID Inception weights.*arr_0"):
        load_inception(tmp_path / "images.npz")


def test_offline_download_names_file_and_destination(tmp_path):
    calls = []

    def offline(url, dest, timeout_s):
        calls.append(url)
        raise OSError("network unreachable")

    with pytest.raises(FileNotFoundError) as err:
        fetch_default_weights(tmp_path / "cache", download=offline)
    message = str(err.value)
    assert FID_WEIGHTS_FILENAME in message
    assert str(tmp_path / "cache" / FID_WEIGHTS_FILENAME) in message
    assert "--inception_weights" in message
    assert calls == [
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth"
    ]
    # A cached file is used without any download.
    (tmp_path / "cache" / FID_WEIGHTS_FILENAME).write_bytes(b"x")
    assert fetch_default_weights(tmp_path / "cache", download=offline).name == FID_WEIGHTS_FILENAME
    assert len(calls) == 1


def test_sharded_features_equal_single_device(inception):
    assert jax.device_count() == 8
    images = np.random.default_rng(1).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    sharded = compute_features(images, inception, mesh=parallel.create_mesh(), batch_size=8)
    single = compute_features(
        images, inception, mesh=parallel.create_mesh(jax.devices()[:1]), batch_size=2
    )
    # Streamed batches of uneven sizes give the same rows in the same order, also on a
    # 2-D mesh (the batch split over data=2 x fsdp=4).
    mesh = parallel.create_mesh(data=2, fsdp=4)
    streamed = compute_features(iter([images[:3], images[3:]]), inception, mesh=mesh, batch_size=8)
    for key in ("pool", "spatial", "logits"):
        assert sharded[key].shape[0] == 11
        np.testing.assert_allclose(sharded[key], single[key], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(streamed[key], single[key], rtol=1e-5, atol=1e-5)
    direct = inception(images[:2])
    np.testing.assert_allclose(single["pool"][:2], direct["pool"], rtol=1e-5, atol=1e-5)
