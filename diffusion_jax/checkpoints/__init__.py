"""Checkpoints: the paper's PyTorch `.pt` files, and Orbax parameter checkpoints."""

from diffusion_jax.checkpoints.openai import (
    abstract_params,
    convert_state_dict,
    load_openai_checkpoint,
    read_torch_state_dict,
    torch_key,
)
from diffusion_jax.checkpoints.orbax_io import (
    check_param_shapes,
    restore_config,
    restore_params,
    save_params,
)

__all__ = [
    "abstract_params",
    "check_param_shapes",
    "convert_state_dict",
    "load_openai_checkpoint",
    "read_torch_state_dict",
    "restore_config",
    "restore_params",
    "save_params",
    "torch_key",
]
