"""Checkpoint conversion: refusals that name the key, the .pt reader, Orbax I/O, launcher."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from diffusion_jax.checkpoints import (
    load_openai_checkpoint,
    restore_params,
    save_params,
    torch_key,
)
from diffusion_jax.models import create_model

torch = pytest.importorskip("torch")
gd_unet = pytest.importorskip("guided_diffusion.unet")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(**fields) -> ml_collections.ConfigDict:
    cfg = base.get_base_config().model
    defaults = dict(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_heads=2,
        use_scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
    )
    defaults.update(fields)
    num_classes = defaults.pop("num_classes", 10)
    cfg.update(defaults)
    cfg.num_classes = num_classes
    return cfg


def reference_unet(cfg, **overrides):
    kwargs = dict(
        image_size=cfg.image_size,
        in_channels=3,
        model_channels=cfg.num_channels,
        out_channels=6 if cfg.learn_sigma else 3,
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
        channel_mult=tuple(cfg.channel_mult),
        num_classes=cfg.num_classes,
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order,
    )
    kwargs.update(overrides)
    return gd_unet.UNetModel(**kwargs)


@pytest.fixture(scope="module")
def state_dict():
    """A reference state dict of the default `model_config()` architecture."""
    torch.manual_seed(0)
    return reference_unet(model_config()).state_dict()


def test_torch_keys_follow_the_paper_code():
    assert (
        torch_key(("input_blocks_4", "layers_1", "qkv", "kernel")) == "input_blocks.4.1.qkv.weight"
    )
    assert torch_key(("out_0", "scale")) == "out.0.weight"
    assert torch_key(("label_emb", "embedding")) == "label_emb.weight"
    assert (
        torch_key(("output_blocks_2", "layers_0", "out_layers_3", "bias"))
        == "output_blocks.2.0.out_layers.3.bias"
    )
    assert torch_key(("out_2", "positional_embedding")) == "out.2.positional_embedding"


def test_every_tensor_is_mapped_once_in_flax_layout(state_dict):
    params = load_openai_checkpoint(state_dict, model_config())
    leaves = jax.tree.leaves(params)
    assert len(leaves) == len(state_dict)
    assert sum(leaf.size for leaf in leaves) == sum(t.numel() for t in state_dict.values())
    conv = state_dict["input_blocks.1.0.in_layers.2.weight"].numpy()  # [O, I, 3, 3]
    got = params["input_blocks_1"]["layers_0"]["in_layers_2"]["kernel"]  # [3, 3, I, O]
    np.testing.assert_array_equal(got, conv.transpose(2, 3, 1, 0))
    qkv = state_dict["input_blocks.3.1.qkv.weight"].numpy()  # Conv1d [3C, C, 1]
    np.testing.assert_array_equal(
        params["input_blocks_3"]["layers_1"]["qkv"]["kernel"], qkv[:, :, 0].T
    )


@pytest.mark.parametrize(
    "fields, key, hint",
    [
        # Another width: every tensor changes shape; the first conv is named.
        (dict(num_channels=64), "input_blocks.0.0.weight", "num_channels"),
        # The checkpoint is class-conditional, the config is not.
        (dict(num_classes=None), "label_emb.weight", "num_classes"),
        # learned sigma doubles the output channels.
        (dict(learn_sigma=False), "out.2.weight", "learn_sigma"),
        # AdaGN doubles the embedding projection.
        (dict(use_scale_shift_norm=False), "emb_layers.1.weight", "use_scale_shift_norm"),
        # Without BigGAN up/down the resampling blocks are convolutions named `op`.
        (dict(resblock_updown=False), "input_blocks.2.0.op.weight", "resblock_updown"),
        # A different depth moves every block index.
        (dict(num_res_blocks=2), "input_blocks.3.0", "num_res_blocks"),
    ],
)
def test_other_architecture_is_refused_naming_key_and_field(state_dict, fields, key, hint):
    with pytest.raises(ValueError) as info:
        load_openai_checkpoint(state_dict, model_config(**fields))
    message = str(info.value)
    assert key in message
    assert hint in message


def test_pt_file_is_read_safely(tmp_path, state_dict):
    path = tmp_path / "model.pt"
    torch.save(state_dict, path)
    from_file = load_openai_checkpoint(str(path), model_config())
    from_dict = load_openai_checkpoint(state_dict, model_config())
    for a, b in zip(jax.tree.leaves(from_file), jax.tree.leaves(from_dict)):
        np.testing.assert_array_equal(a, b)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": state_dict, "step": 3}, wrapped)
    with pytest.raises(ValueError, match="flat state dict"):
        load_openai_checkpoint(str(wrapped), model_config())
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_openai_checkpoint(str(tmp_path / "missing.pt"), model_config())


def test_orbax_round_trip_keeps_params_and_config(tmp_path, state_dict):
    config = base.get_base_config()
    config.model = model_config()
    params = load_openai_checkpoint(state_dict, config.model)
    save_params(tmp_path / "ckpt", params, config)
    restored, restored_config = restore_params(tmp_path / "ckpt")
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert restored_config.model.num_channels == 32
    assert tuple(restored_config.model.attention_resolutions) == (8,)
    with pytest.raises(FileExistsError):
        save_params(tmp_path / "ckpt", params, config)
    with pytest.raises(FileNotFoundError):
        restore_params(tmp_path / "nothing")


def test_convert_checkpoint_launcher_end_to_end(tmp_path):
    """`python -m launch.convert_checkpoint` on the tiny imagenet64 variant."""
    from configs import imagenet64

    config = imagenet64.get_config("tiny")
    cfg = config.model
    torch.manual_seed(1)
    ref = reference_unet(cfg, use_new_attention_order=True, dropout=cfg.dropout)
    with torch.no_grad():  # no zero-initialised layers, so the output check below can fail
        for p in ref.parameters():
            p.copy_(0.2 * torch.randn(p.shape))
    torch.save(ref.state_dict(), tmp_path / "tiny64.pt")
    out = tmp_path / "converted"
    cmd = [
        sys.executable,
        "-m",
        "launch.convert_checkpoint",
        "--config=configs/imagenet64.py:tiny",
        f"--torch_checkpoint={tmp_path / 'tiny64.pt'}",
        f"--output={out}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    restored, restored_config = restore_params(out)
    want = load_openai_checkpoint(ref.state_dict(), cfg)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert restored_config.model.image_size == cfg.image_size
    assert restored_config.model.use_new_attention_order

    # The restored config rebuilds the network, and the restored params reproduce the
    # reference's output (what the sampling launcher does with this directory).
    module = create_model(restored_config.model)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    t, y = np.array([500]), np.array([7])
    ref.eval()
    with torch.no_grad():
        want = ref(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y)
        )
    got = jax.jit(module.apply)({"params": restored}, x, t, y=y)
    scale = float(np.abs(want.numpy()).max())
    assert scale > 0.1
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-5 * scale)

    # A checkpoint of another architecture is refused with the key named.
    bad = [c if not c.startswith("--output") else f"--output={tmp_path / 'bad'}" for c in cmd]
    bad.append("--config.model.num_channels=64")
    result = subprocess.run(bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "input_blocks.0.0.weight" in result.stderr
    # A clear one-line error, not a traceback.
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_checkpoints_import_without_ml_collections():
    # The GPU image has no ml_collections: converting and restoring params must work there.
    code = (
        "import sys; sys.modules['ml_collections'] = None\n"
        "import diffusion_jax.checkpoints as c; print(c.load_openai_checkpoint.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
