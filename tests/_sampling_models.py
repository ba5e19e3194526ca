"""Tiny random guided-diffusion models saved as `.pt` by the reference package, converted.

`make_checkpoints(directory)` builds the paper code's UNet and noise-aware classifier for
`configs/imagenet64.py:tiny` / `configs/classifier64.py:tiny` (upsampler:
`configs/upsample64_256.py:tiny`), overwrites every parameter with random values (the
reference zero-initialises its output layers, which would make every sample the same),
saves their state dicts with `torch.save` and converts them with `convert_to_orbax`,
as a user converts the released files.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from diffusion_jax.checkpoints import openai

BASE = "configs/imagenet64.py:tiny"
CLASSIFIER = "configs/classifier64.py:tiny"
UPSAMPLER = "configs/upsample64_256.py:tiny"
REPO = pathlib.Path(__file__).resolve().parent.parent


def load(spec: str):
    """The config of `path[:variant]`, as the launchers load it."""
    from launch import common

    path, _, variant = spec.partition(":")
    config, problem = common.load_config_file(f"{REPO / path}:{variant}")
    assert problem is None, problem
    return config


def reference_kwargs(model) -> dict:
    """The reference constructor's arguments for our `config.model`."""
    from diffusion_jax import models

    s = models.validate_model_config(model)
    return dict(
        image_size=s["image_size"],
        in_channels=s["in_channels"],
        model_channels=s["model_channels"],
        num_res_blocks=s["num_res_blocks"],
        attention_resolutions=tuple(s["image_size"] // r for r in s["attention_resolutions"]),
        channel_mult=tuple(s["channel_mult"]),
        conv_resample=s["conv_resample"],
        num_heads=s["num_heads"],
        num_head_channels=s["num_head_channels"],
        use_scale_shift_norm=s["use_scale_shift_norm"],
        resblock_updown=s["resblock_updown"],
        use_new_attention_order=s["use_new_attention_order"],
        dropout=0.0,
    )


def randomize_(module, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and "label_emb" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("norm.weight") or (".0.weight" in name and p.ndim == 1):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def reference_model(config, seed: int):
    """The paper code's network for `config.model` (eval mode, random parameters)."""
    from guided_diffusion import unet as gd_unet

    model = config.model
    kwargs = reference_kwargs(model)
    if model.kind == "classifier":
        net = gd_unet.EncoderUNetModel(out_channels=model.num_classes, pool=model.pool, **kwargs)
    else:
        cls = gd_unet.SuperResModel if model.kind == "superres" else gd_unet.UNetModel
        out = 6 if model.learn_sigma else 3
        net = cls(out_channels=out, num_classes=model.num_classes, **kwargs)
    randomize_(net, seed)
    return net.eval()


def save_and_convert(config, directory: pathlib.Path, name: str, seed: int):
    """Saves a random reference model as NAME.pt, converts it to NAME/; returns (net, dir)."""
    import torch

    net = reference_model(config, seed)
    directory.mkdir(parents=True, exist_ok=True)
    pt = directory / f"{name}.pt"
    torch.save(net.state_dict(), pt)
    out = directory / name
    if not out.exists():
        openai.convert_to_orbax(pt, config, out)
    return net, out


def make_checkpoints(directory: pathlib.Path) -> dict:
    """Base model + classifier (and their reference nets), converted under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    base, classifier = load(BASE), load(CLASSIFIER)
    base_net, base_dir = save_and_convert(base, directory, "base", 1)
    cls_net, cls_dir = save_and_convert(classifier, directory, "classifier", 2)
    return {
        "base_config": base,
        "classifier_config": classifier,
        "base_net": base_net,
        "classifier_net": cls_net,
        "base_dir": base_dir,
        "classifier_dir": cls_dir,
    }


def read_npz(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


UNCOND = "configs/imagenet256_uncond.py:tiny"


def make_uncond(directory: pathlib.Path):
    """An unconditional 16x16 model (imagenet256_uncond:tiny), converted; returns its dir."""
    return save_and_convert(load(UNCOND), directory, "uncond", 3)[1]


def make_stack(directory: pathlib.Path) -> dict:
    """An 8x8 class-conditional base model and the 8 -> 32 upsampler (upsample64_256:tiny)."""
    base = load(BASE)
    base.model.image_size = 8
    base.model.attention_resolutions = (4,)
    upsampler = load(UPSAMPLER)
    return {
        "base_config": base,
        "base_dir": save_and_convert(base, directory, "base8", 4)[1],
        "upsampler_config": upsampler,
        "upsampler_dir": save_and_convert(upsampler, directory, "upsampler", 5)[1],
    }
