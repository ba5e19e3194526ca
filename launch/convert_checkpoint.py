"""Converts a released guided-diffusion `.pt` checkpoint into an Orbax checkpoint.

  python -m launch.convert_checkpoint --config=configs/imagenet256.py \
    --torch_checkpoint=256x256_diffusion.pt --output=/path/to/imagenet256_converted

The output directory holds `params/` (Orbax) and `config.json`, which the sampling
launcher restores. The `.pt` file is read without torch, admitting nothing but a plain
state dict of tensors. The config must describe the checkpoint's architecture; a
mismatch is refused with the offending keys and the config fields to check.
"""

from absl import flags

from diffusion_jax.checkpoints import openai
from launch import common

_CONFIG = common.define_config_flag("Config of the checkpoint's model.")
_TORCH_CHECKPOINT = flags.DEFINE_string("torch_checkpoint", None, "The .pt file to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write (must not hold params/).")
flags.mark_flags_as_required(["torch_checkpoint", "output"])


def main(argv: list[str]) -> None:
    out = openai.convert_to_orbax(_TORCH_CHECKPOINT.value, _CONFIG.value, _OUTPUT.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run_main(main)
