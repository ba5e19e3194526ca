"""Converts a released guided-diffusion `.pt` checkpoint into an Orbax checkpoint.

  python -m launch.convert_checkpoint --config=configs/imagenet256.py \
    --torch_checkpoint=256x256_diffusion.pt --output=/path/to/imagenet256_converted

The output directory holds `params/` (Orbax) and `config.json`, which the sampling
launcher restores. The config must describe the checkpoint's architecture; a mismatch
is refused with the offending keys and the config fields to check.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax.checkpoints import openai

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the checkpoint's model.")
_TORCH_CHECKPOINT = flags.DEFINE_string("torch_checkpoint", None, "The .pt file to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write (must not hold params/).")
flags.mark_flags_as_required(["config", "torch_checkpoint", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        out = openai.convert_to_orbax(_TORCH_CHECKPOINT.value, _CONFIG.value, _OUTPUT.value)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")  # bad input: the message names the key/file and the fix
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
