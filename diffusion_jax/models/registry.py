"""The model registry: each network kind is one `ModelSpec`, asked by every caller.

A spec says how to build its kind from validated settings, its example inputs, which
settings a checkpoint must match, its kind-specific config checks and which training
loop trains it. Training, the converter, the sampling job and the config checks ask
the spec instead of branching on `model.kind`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.models.classifier import POOLS, EncoderUNet
from diffusion_jax.models.unet import SuperResUNet, UNet

# The paper code's channel multipliers per resolution (script_util.create_model /
# create_classifier); its upsamplers use 6 levels at 512 (sr_create_model).
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
_SUPERRES_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
# Resolved settings that decide the parameters' shapes (every kind).
_SHAPE_FIELDS = (
    "kind",
    "image_size",
    "in_channels",
    "model_channels",
    "out_channels",
    "num_res_blocks",
    "attention_resolutions",
    "channel_mult",
    "num_classes",
    "null_class",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "conv_resample",
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One network kind.

    Attributes:
      kind: `model.kind`.
      module: the Flax module class it builds.
      trainer: the training loop that trains it ('diffusion' | 'classifier').
      takes_labels: takes `y=` labels when model.num_classes is set.
      takes_low_res: takes `low_res=` (an upsampler: needs data.low_res_size).
      channel_mult: the paper's channel_mult per image_size, for an empty config field.
      architecture: resolved settings a checkpoint must match.
      output_hint: the config fields that decide the output layer (converter messages).
      check: kind-specific checks of the resolved settings (raise ValueError), or None.
      renames: module field -> the setting it takes (default: the same name).
    """

    kind: str
    module: type
    trainer: str
    takes_labels: bool
    takes_low_res: bool = False
    channel_mult: dict = dataclasses.field(default_factory=lambda: _DEFAULT_CHANNEL_MULT)
    architecture: tuple[str, ...] = _SHAPE_FIELDS
    output_hint: str = "model.learn_sigma (6 output channels when True) / num_channels"
    check: Callable[[dict], None] | None = None
    renames: dict = dataclasses.field(default_factory=dict)

    def build(self, settings: dict[str, Any]):
        """The unbound Flax module for resolved settings (`validate_model_config`)."""
        names = (
            f.name for f in dataclasses.fields(self.module) if f.name not in ("parent", "name")
        )
        return self.module(**{n: settings[self.renames.get(n, n)] for n in names})

    def example_inputs(
        self, settings: dict[str, Any], batch: int = 1, low_res_size=None, abstract=True
    ) -> tuple[tuple, dict]:
        """`(args, kwargs)` of `module.init`/`apply`: zeros, or ShapeDtypeStructs if abstract.

        `low_res_size` is an upsampler's low_res side (data.low_res_size; default
        image_size // 4).
        """
        make = jax.ShapeDtypeStruct if abstract else jnp.zeros
        size, channels = settings["image_size"], settings["in_channels"]
        args = (make((batch, size, size, channels), jnp.float32), make((batch,), jnp.int32))
        kwargs = {}
        if self.takes_labels and settings["num_classes"] is not None:
            kwargs["y"] = make((batch,), jnp.int32)
        if self.takes_low_res:
            low = int(low_res_size or size // 4)
            kwargs["low_res"] = make((batch, low, low, channels), jnp.float32)
        return args, kwargs


def _check_classifier(s: dict[str, Any]) -> None:
    if s["pool"] not in POOLS:
        raise ValueError(f"model.pool must be one of {POOLS}, got {s['pool']!r}.")
    if s["pool"] == "attention" and s["num_head_channels"] == -1:
        raise ValueError(
            "model.pool='attention' needs model.num_head_channels (64 in the paper), not -1."
        )
    if not s["num_classes"]:
        raise ValueError("model.num_classes must be set for a classifier (1000 for ImageNet).")


MODEL_SPECS: dict[str, ModelSpec] = {
    s.kind: s
    for s in (
        ModelSpec("unet", UNet, "diffusion", takes_labels=True),
        ModelSpec(
            "superres",
            SuperResUNet,
            "diffusion",
            takes_labels=True,
            takes_low_res=True,
            channel_mult=_SUPERRES_CHANNEL_MULT,
        ),
        ModelSpec(
            "classifier",
            EncoderUNet,
            "classifier",
            takes_labels=False,
            architecture=(*_SHAPE_FIELDS, "pool"),
            output_hint="model.pool / num_classes / num_channels",
            check=_check_classifier,
            renames={"out_channels": "num_classes"},
        ),
    )
}


def model_spec(kind: str) -> ModelSpec:
    """The spec of `model.kind`.

    Raises:
      ValueError: naming model.kind when no spec has it.
    """
    if kind not in MODEL_SPECS:
        raise ValueError(f"model.kind must be one of {tuple(MODEL_SPECS)}, got {kind!r}.")
    return MODEL_SPECS[kind]


__all__ = ["MODEL_SPECS", "ModelSpec", "model_spec"]
