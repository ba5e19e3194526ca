"""The paper's networks: ADM UNet, super-resolution UNet, noise-aware classifier.

`create_model(model_config)` / `create_classifier(model_config)` turn a
`config.model` section (field names as the paper code's flags) into Flax modules.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.models.attention import AttentionBlock, AttentionPool2d, qkv_attention
from diffusion_jax.models.classifier import POOLS, EncoderUNet
from diffusion_jax.models.layers import GroupNorm32, timestep_embedding
from diffusion_jax.models.registry import MODEL_SPECS, ModelSpec, model_spec
from diffusion_jax.models.unet import ResBlock, SuperResUNet, UNet

__all__ = [
    "MODEL_SPECS",
    "POOLS",
    "AttentionBlock",
    "AttentionPool2d",
    "EncoderUNet",
    "GroupNorm32",
    "ModelSpec",
    "ResBlock",
    "SuperResUNet",
    "UNet",
    "create_classifier",
    "create_model",
    "default_channel_mult",
    "model_spec",
    "null_label",
    "qkv_attention",
    "resolve_compute_dtype",
    "timestep_embedding",
    "validate_model_config",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_AUTO_DTYPE = "auto"


def resolve_compute_dtype(dtype_name: str, backend: str | None = None) -> Any:
    """The jnp compute dtype for `model.dtype` (parameters stay float32 whatever it is).

    'float32', 'bfloat16', 'float16', or 'auto': bfloat16 on accelerators (GPU/TPU: bf16
    matmuls run at full rate there and need no loss scaling) and float32 on CPU (where
    bf16 is emulated and slower), for `backend` (default `jax.default_backend()`).
    """
    if dtype_name == _AUTO_DTYPE:
        backend = jax.default_backend() if backend is None else backend
        return jnp.float32 if backend == "cpu" else jnp.bfloat16
    if dtype_name not in _DTYPES:
        choices = [*sorted(_DTYPES), _AUTO_DTYPE]
        raise ValueError(f"model.dtype must be one of {choices}, got {dtype_name!r}.")
    return _DTYPES[dtype_name]


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default) if hasattr(cfg, name) else default


def default_channel_mult(image_size: int, kind: str = "unet") -> tuple[float, ...]:
    """The paper code's channel_mult for `image_size` (the large size for upsamplers) and
    `kind` ('unet', 'superres' or 'classifier') when the config leaves it empty."""
    table = model_spec(kind).channel_mult
    if image_size not in table:
        raise ValueError(
            f"model.channel_mult is empty and image_size={image_size} has no paper default "
            f"for kind={kind!r} (defaults exist for {sorted(table)}): set model.channel_mult, "
            "e.g. --config.model.channel_mult='(1, 2, 2)'."
        )
    return table[image_size]


def null_label(model_config: Any) -> int | None:
    """The null class of a model trained for classifier-free guidance, else None.

    The one place that says what `label_dropout > 0` means for a network: a
    class-conditional model trained with label dropout (`model.label_dropout`, linked
    to `training.label_dropout`) has one more label-embedding row, index num_classes,
    standing for "no label". Models without the field (converted paper checkpoints,
    older configs) have none.
    """
    num_classes = _get(model_config, "num_classes", None)
    if num_classes is None or not float(_get(model_config, "label_dropout", 0.0) or 0.0) > 0:
        return None
    return int(num_classes)


def validate_model_config(model_config: Any) -> dict[str, Any]:
    """Checks a `config.model` section (ConfigDict or mapping) and resolves its defaults.

    Returns a dict of resolved settings: kind, channel_mult (tuple), attention_resolutions
    (tuple of ints), dtype (a jnp dtype), out_channels and the remaining fields. Raises
    ValueError naming the offending field and how to fix it.
    """
    kind = _get(model_config, "kind", "unet")
    spec = model_spec(kind)
    image_size = int(_get(model_config, "image_size"))
    channel_mult = tuple(_get(model_config, "channel_mult", ()) or ())
    if not channel_mult:
        channel_mult = default_channel_mult(image_size, kind)
    if any(m <= 0 for m in channel_mult):
        raise ValueError(f"model.channel_mult entries must be positive, got {channel_mult}.")
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ValueError(
            f"model.image_size={image_size} cannot be halved {levels - 1} times "
            f"(channel_mult={channel_mult}): change image_size or channel_mult."
        )
    attn = _get(model_config, "attention_resolutions", ())
    if isinstance(attn, str):  # the paper code's "32,16,8" flag form
        attn = tuple(int(r) for r in attn.split(",") if r.strip())
    attn = tuple(int(r) for r in attn)
    reachable = {image_size // 2**i for i in range(levels)}
    for res in attn:
        if res not in reachable:
            raise ValueError(
                f"model.attention_resolutions contains {res}, but the feature maps are "
                f"{sorted(reachable, reverse=True)} pixels for image_size={image_size} and "
                f"channel_mult={channel_mult}: attention_resolutions are in pixels, "
                "e.g. (32, 16, 8)."
            )
    num_channels = int(_get(model_config, "num_channels"))
    norm_groups = int(_get(model_config, "norm_groups", 32))
    if norm_groups < 1:
        raise ValueError(f"model.norm_groups must be >= 1 (32 in the paper), got {norm_groups}.")
    for mult in channel_mult:
        if int(mult * num_channels) % norm_groups:
            raise ValueError(
                f"model.num_channels={num_channels} x channel_mult {mult} = "
                f"{int(mult * num_channels)} is not a multiple of {norm_groups} "
                "(model.norm_groups, the GroupNorm groups)."
            )
    num_head_channels = int(_get(model_config, "num_head_channels", -1))
    num_heads = int(_get(model_config, "num_heads", 1))
    if num_head_channels == -1 and num_heads < 1:
        raise ValueError("model.num_heads must be >= 1 when model.num_head_channels is -1.")
    dtype = resolve_compute_dtype(str(_get(model_config, "dtype", _AUTO_DTYPE)))
    num_classes = _get(model_config, "num_classes", None)
    learn_sigma = bool(_get(model_config, "learn_sigma", False))
    in_channels = int(_get(model_config, "in_channels", 3))
    pool = _get(model_config, "pool", "attention")
    if spec.check is not None:
        spec.check(dict(pool=pool, num_head_channels=num_head_channels, num_classes=num_classes))
    dropout = float(_get(model_config, "dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}.")
    label_dropout = float(_get(model_config, "label_dropout", 0.0) or 0.0)
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(
            f"training.label_dropout (= model.label_dropout) must be in [0, 1), got "
            f"{label_dropout}."
        )
    if label_dropout > 0 and (num_classes is None or not spec.takes_labels):
        raise ValueError(
            f"training.label_dropout={label_dropout} needs a class-conditional diffusion "
            "model: set model.num_classes (and data.class_cond=True), or "
            "training.label_dropout=0.0."
        )
    return dict(
        kind=kind,
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=int(_get(model_config, "num_res_blocks")),
        attention_resolutions=attn,
        channel_mult=channel_mult,
        dropout=dropout,
        conv_resample=bool(_get(model_config, "conv_resample", True)),
        num_classes=None if num_classes is None else int(num_classes),
        null_class=null_label(model_config) is not None,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=int(_get(model_config, "num_heads_upsample", -1)),
        use_scale_shift_norm=bool(_get(model_config, "use_scale_shift_norm", False)),
        resblock_updown=bool(_get(model_config, "resblock_updown", False)),
        use_new_attention_order=bool(_get(model_config, "use_new_attention_order", False)),
        pool=pool,
        dtype=dtype,
        remat=bool(_get(model_config, "remat", False)),
        norm_groups=norm_groups,
    )


def create_model(model_config: Any) -> UNet:
    """The unbound diffusion UNet (kind 'unet') or upsampler (kind 'superres') of
    `config.model`; call `module.apply({'params': p}, x, t, y=...)` or `module.apply(p,
    ...)` (upsamplers also take `low_res=`)."""
    return _build(model_config, "diffusion", "use create_classifier(model_config).")


def create_classifier(model_config: Any) -> EncoderUNet:
    """The unbound noise-aware classifier (the paper code's EncoderUNetModel) `EncoderUNet`;
    `module.apply({'params': p}, x, t)` (or `apply(p, ...)`) gives logits.

    In a classifier config's `model` section num_channels is the paper's
    classifier_width, num_res_blocks its classifier_depth, num_classes the number of
    logits, plus `pool`.
    """
    advice = (
        "create_classifier needs a classifier config (model.kind='classifier', e.g. "
        "configs/classifier256.py); use create_model for diffusion models."
    )
    return _build(model_config, "classifier", advice)


def _build(model_config: Any, trainer: str, advice: str):
    settings = validate_model_config(model_config)
    spec = model_spec(settings["kind"])
    if spec.trainer != trainer:
        raise ValueError(f"model.kind is {spec.kind!r}: {advice}")
    return spec.build(settings)
