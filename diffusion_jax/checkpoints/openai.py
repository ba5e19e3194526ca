"""Loads the paper's released PyTorch checkpoints (guided-diffusion state dicts).

Flax parameter paths are named after the PyTorch keys (see `diffusion_jax.models`), so
the mapping is a rename plus a layout change per tensor kind:

  PyTorch key                         Flax leaf                   layout
  `*.weight` of Conv2d [O, I, kh, kw] `.../kernel` [kh, kw, I, O]  transpose
  `*.weight` of Linear [O, I]         `.../kernel` [I, O]          transpose
  `qkv / proj_out / qkv_proj / c_proj` Conv1d [O, I, 1]  -> Dense kernel [I, O]
  GroupNorm `*.weight` / `*.bias`     `.../scale` / `.../bias`     as is
  `label_emb.weight` [classes, D]     `label_emb/embedding`        as is
  `out.2.positional_embedding` [C, T+1] -> [T+1, C]                transpose

The qkv channel order (legacy [head][q|k|v][ch] or new [q|k|v][head][ch]) is kept as
stored; `model.use_new_attention_order` tells the network how to split it, so it must
match the checkpoint (True only for 64x64_diffusion.pt).
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from diffusion_jax import models
from diffusion_jax.checkpoints import torch_files
from diffusion_jax.checkpoints.orbax_io import save_params

# Flax module names whose Dense kernels were Conv1d(kernel_size=1) weights in PyTorch.
_CONV1D_NAMES = frozenset({"qkv", "proj_out", "qkv_proj", "c_proj"})
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_MAX_LISTED = 8


def abstract_params(model_config: Any) -> dict:
    """The params tree of `model_config`'s network as ShapeDtypeStructs (no allocation)."""
    settings = models.validate_model_config(model_config)
    spec = models.model_spec(settings["kind"])
    module, (args, kwargs) = spec.build(settings), spec.example_inputs(settings)
    variables = jax.eval_shape(lambda a, k: module.init(jax.random.key(0), *a, **k), args, kwargs)
    return variables["params"]


def torch_key(flax_path: tuple[str, ...]) -> str:
    """Maps a Flax param path to its guided-diffusion state-dict key.

    `('input_blocks_4', 'layers_1', 'qkv', 'kernel')` -> `'input_blocks.4.1.qkv.weight'`.
    """
    parts = []
    for name in flax_path[:-1]:
        match = re.fullmatch(r"(.*?)_(\d+)", name)
        if match is None:
            parts.append(name)
        elif match.group(1) == "layers":  # BlockSequence children are bare indices
            parts.append(match.group(2))
        else:
            parts.extend(match.groups())
    leaf = flax_path[-1]
    parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
    return ".".join(parts)


def _torch_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf (inverse of `_to_flax`)."""
    leaf = flax_path[-1]
    if leaf == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if leaf == "kernel":
        cin, cout = shape
        return (cout, cin, 1) if flax_path[-2] in _CONV1D_NAMES else (cout, cin)
    if leaf == "positional_embedding":
        return tuple(reversed(shape))
    return tuple(shape)


def _to_flax(flax_path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Converts one PyTorch tensor (as float32 numpy) to its Flax layout."""
    leaf = flax_path[-1]
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if leaf == "kernel":
        return np.transpose(value.reshape(value.shape[0], value.shape[1]))  # [O, I(, 1)] -> [I, O]
    if leaf == "positional_embedding":
        return np.transpose(value)  # [C, T] -> [T, C]
    return value


def _hint(key: str, spec: models.ModelSpec) -> str:
    """The config fields a bad key most likely comes from."""
    if key.startswith("label_emb"):
        return "model.num_classes (None = unconditional, 1000 = the paper's class_cond=True)"
    if key.startswith("input_blocks.0.0"):
        return (
            "model.num_channels / channel_mult / in_channels / kind (upsamplers: 2 x in_channels)"
        )
    if key.startswith("out."):
        return spec.output_hint
    if key.startswith("time_embed"):
        return "model.num_channels"
    if ".emb_layers." in key:
        return "model.use_scale_shift_norm (doubles emb_layers) / num_channels"
    if any(f".{n}." in key for n in ("qkv", "proj_out", "norm")):
        return "model.attention_resolutions / num_channels / channel_mult"
    if ".op." in key or re.search(r"\.\d+\.conv\.", key):
        return "model.resblock_updown / conv_resample"
    return (
        "model.num_channels / channel_mult / num_res_blocks / attention_resolutions / "
        "resblock_updown"
    )


def _network_order(key: str) -> list:
    """Sort key that puts `input_blocks.2` before `input_blocks.10`."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor from a caller's own torch.load
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def read_torch_state_dict(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """Reads a guided-diffusion `.pt` file without torch, as numpy float32.

    The file is read by `diffusion_jax.checkpoints.torch_files`, which admits only a plain state
    dict of tensors (as strict as `torch.load(weights_only=True)`) and needs no torch.
    `path` may be remote (`gs://...`). Returns {key: float32 array in PyTorch layout}.

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: (`torch_files.TorchFileError`) if the file is not a torch file, is
        truncated, or holds anything but a flat state dict of tensors; one line naming
        the file.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"torch checkpoint {path} does not exist.")
    state = torch_files.load_state_dict(path)
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def convert_state_dict(state_dict: Mapping[str, Any], model_config: Any) -> dict:
    """Converts a guided-diffusion state dict ({key: tensor/array} in PyTorch layout) to the
    Flax params tree (float32 numpy) of `model_config`, the same architecture's `config.model`.

    Raises:
      ValueError: on missing, unexpected or mis-shaped keys, naming each key and the
        config fields that probably disagree with the checkpoint.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}  # DDP-wrapped
    abstract = abstract_params(model_config)
    expected = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        flax_path = tuple(p.key for p in path)
        expected[torch_key(flax_path)] = (flax_path, _torch_shape(flax_path, leaf.shape))

    spec = models.model_spec(models.validate_model_config(model_config)["kind"])
    problems = []  # (key, message)
    for key in state_dict:
        if key not in expected:
            shape = list(np.shape(state_dict[key]))
            problems.append((key, f"unexpected key {key} {shape}: check {_hint(key, spec)}"))
    converted = {}
    for key, (flax_path, shape) in expected.items():
        if key not in state_dict:
            problems.append((key, f"missing key {key} {list(shape)}: check {_hint(key, spec)}"))
            continue
        value = _as_numpy(state_dict[key])
        if tuple(value.shape) != shape:
            given = f"{key} has shape {list(value.shape)} but the config gives {list(shape)}"
            problems.append((key, f"{given}: check {_hint(key, spec)}"))
            continue
        converted[flax_path] = _to_flax(flax_path, value)
    if problems:
        # Network order: the first entries show where the two architectures part.
        problems.sort(key=lambda item: _network_order(item[0]))
        listed = [message for _, message in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            listed.append(f"... and {len(problems) - _MAX_LISTED} more")
        raise ValueError(
            f"the checkpoint does not match the model config: {len(problems)} tensors "
            f"missing, extra or mis-shaped (the config expects {len(expected)}):\n  "
            + "\n  ".join(listed)
        )
    return traverse_util.unflatten_dict(converted)


def load_openai_checkpoint(
    path_or_state_dict: str | epath.PathLike | Mapping[str, Any], model_config: Any
) -> dict:
    """Loads a guided-diffusion checkpoint (a `.pt` path or a state dict) for Flax.

    Args:
      path_or_state_dict: path of a released `.pt` file (read without torch, see
        `read_torch_state_dict`), or a mapping of key -> tensor/array.
      model_config: `config.model` of the matching config (e.g. configs/imagenet256.py).

    Returns:
      The Flax params tree (float32 numpy leaves): `module.apply({'params': params},
      x, t, y=...)`; our networks' `apply` also takes the tree directly.

    Raises:
      FileNotFoundError: if the `.pt` file does not exist.
      ValueError: naming each missing, unexpected or mis-shaped key and the config
        fields that probably disagree with the checkpoint; or, in one line naming the
        file, that the file is not a readable flat state dict (`read_torch_state_dict`).

    Note: the two attention layouts (`model.use_new_attention_order`) have the same
    shapes, so a wrong value there cannot be detected from the file: the released
    64x64_diffusion.pt uses the new order, every other released model the legacy one
    (the configs set it).
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict = path_or_state_dict
    else:
        state_dict = read_torch_state_dict(path_or_state_dict)
    return convert_state_dict(state_dict, model_config)


def convert_to_orbax(
    torch_checkpoint: str | epath.PathLike, config: Any, output: str | epath.PathLike
) -> epath.Path:
    """Converts a released `.pt` file into an Orbax params checkpoint plus the full
    `config` (whose `model` section matches it) in directory `output` (returned; layout:
    `orbax_io.save_params`)."""
    params = load_openai_checkpoint(torch_checkpoint, config.model)
    return save_params(output, params, config)
