"""The paper's ADM UNet and its super-resolution variant, in Flax (NHWC).

Submodule names follow the paper code's state-dict keys so the checkpoint converter
is a systematic rename: `input_blocks_4/layers_1/qkv` holds `input_blocks.4.1.qkv`.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.attention import AttentionBlock
from diffusion_jax.models.layers import (
    BlockSequence,
    Downsample,
    GroupNorm32,
    ParamsTreeApply,
    Upsample,
    conv,
    dense,
    downsample_avg,
    timestep_embedding,
    upsample_nearest,
)

Dtype = Any


def _check_channels(x: jnp.ndarray, channels: int, name: str = "x") -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{name} must be NHWC with {channels} channels (model.in_channels), got shape "
            f"{x.shape}."
        )


def _check_labels(y, batch: int, num_classes: int, null_class: bool = False) -> None:
    """Labels must be [B] ints in [0, num_classes) (or num_classes itself, the null
    class, when the model has one); the range is checked when concrete.

    Out-of-range labels would index the embedding table silently (NaN or wrapped rows).
    Under jit the values are traced and only the shape can be checked.
    """
    if jnp.shape(y) != (batch,):
        raise ValueError(f"y must have shape [B] = ({batch},), got {jnp.shape(y)}.")
    try:
        values = np.asarray(y)
    except jax.errors.TracerArrayConversionError:
        return
    rows = num_classes + int(null_class)
    if values.size and (values.min() < 0 or values.max() >= rows):
        null = f" or {num_classes}, the null class" if null_class else ""
        raise ValueError(
            f"y holds labels in [{values.min()}, {values.max()}] but the model has "
            f"num_classes={num_classes}: labels must lie in [0, {num_classes}){null}."
        )


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep (and class) embedding.

    Attributes:
      dropout: dropout rate before the last convolution.
      use_scale_shift_norm: AdaGN (norm(h) * (1 + scale) + shift) instead of h + emb.
      up: BigGAN-style nearest x2 upsampling inside the block.
      down: BigGAN-style average-pool x2 downsampling inside the block.
    """

    channels: int
    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray) -> jnp.ndarray:
        h = nn.silu(GroupNorm32(self.norm_groups, name="in_layers_0")(x))
        if self.up or self.down:
            resample = upsample_nearest if self.up else downsample_avg
            h, x = resample(h), resample(x)
        h = conv(self.out_channels, 3, name="in_layers_2", dtype=self.dtype)(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(emb_width, name="emb_layers_1", dtype=self.dtype)(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]  # [B, 1, 1, C or 2C]
        norm = GroupNorm32(self.norm_groups, name="out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + emb_out)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=self.deterministic)
        h = conv(self.out_channels, 3, name="out_layers_3", dtype=self.dtype, zero=True)(h)

        if self.out_channels != self.channels:
            x = conv(self.out_channels, 1, name="skip_connection", dtype=self.dtype)(x)
        return x + h


# Rematerialised variants (same parameters): activations are recomputed in the backward
# pass instead of stored, trading compute for memory (`model.remat`).
RematResBlock = nn.remat(ResBlock)
RematAttentionBlock = nn.remat(AttentionBlock)


def block_factories(module: nn.Module, train: bool) -> tuple[Any, Any]:
    """ResBlock / AttentionBlock factories bound to `module`'s options.

    Shared by the UNet and the classifier; the blocks are rematerialised when
    `module.remat` is set. The attention factory's `num_heads` can be overridden per
    call (the UNet's decoder uses `num_heads_upsample`).
    """
    res_cls = RematResBlock if module.remat else ResBlock
    attn_cls = RematAttentionBlock if module.remat else AttentionBlock
    res = functools.partial(
        res_cls,
        dropout=module.dropout,
        use_scale_shift_norm=module.use_scale_shift_norm,
        deterministic=not train,
        dtype=module.dtype,
        norm_groups=module.norm_groups,
    )
    attn = functools.partial(
        attn_cls,
        num_heads=module.num_heads,
        num_head_channels=module.num_head_channels,
        use_new_attention_order=module.use_new_attention_order,
        dtype=module.dtype,
        norm_groups=module.norm_groups,
    )
    return res, attn


def time_embedding(t: jnp.ndarray, model_channels: int) -> jnp.ndarray:
    """The timestep MLP's input half: sinusoids -> dense -> SiLU -> dense, [B, 4 mc]."""
    emb = timestep_embedding(t, model_channels)  # [B, mc], float32
    emb = dense(4 * model_channels, name="time_embed_0", dtype=jnp.float32)(emb)
    return dense(4 * model_channels, name="time_embed_2", dtype=jnp.float32)(nn.silu(emb))


class Encoder(ParamsTreeApply):
    """The settings of the encoder half (the paper code's flags), shared by the UNet and
    the classifier; `attention_resolutions` are feature-map sizes in pixels and
    `channel_mult` is already resolved (no empty default here)."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    channel_mult: Sequence[float]
    dropout: float = 0.0
    conv_resample: bool = True
    num_heads: int = 1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    norm_groups: int = 32


def middle_block(res, attn, ch: int) -> tuple:
    """The middle block's layer factories: ResBlock, attention, ResBlock at `ch` channels."""
    res_block = functools.partial(res, ch, ch)
    return res_block, functools.partial(attn, ch), res_block


def encoder_blocks(module: nn.Module, res, attn) -> list[tuple[tuple, int]]:
    """The encoder half's blocks: [(layer factories of input_blocks_i, out channels)].

    One list serves the UNet (which keeps every block's output as a skip) and the
    classifier (the same blocks, then a pooling head), so both map onto the paper
    code's `input_blocks.*` keys identically.
    """
    mc = module.model_channels
    ch = int(module.channel_mult[0] * mc)
    blocks = [((functools.partial(conv, ch, 3, dtype=module.dtype),), ch)]
    res_px = module.image_size
    for level, mult in enumerate(module.channel_mult):
        for _ in range(module.num_res_blocks):
            layers = [functools.partial(res, ch, int(mult * mc))]
            ch = int(mult * mc)
            if res_px in module.attention_resolutions:
                layers.append(functools.partial(attn, ch))
            blocks.append((tuple(layers), ch))
        if level != len(module.channel_mult) - 1:
            if module.resblock_updown:
                down = functools.partial(res, ch, ch, down=True)
            else:
                down = functools.partial(Downsample, ch, module.conv_resample, dtype=module.dtype)
            blocks.append(((down,), ch))
            res_px //= 2
    return blocks


class UNet(Encoder):
    """The ADM UNet (Dhariwal & Nichol 2021), optionally class-conditional.

    Attributes mirror the paper code's flags (`Encoder`'s, plus num_classes, null_class
    and num_heads_upsample).
    Called as `module.apply(variables, x, t, y=None, train=False)` with x [B, H, W, C]
    in [-1, 1] and t [B] (int or float); returns [B, H, W, out_channels] in float32.
    With `null_class` (a model trained with label dropout for classifier-free
    guidance) the label embedding has num_classes + 1 rows, label num_classes being
    "no label".
    """

    num_classes: int | None = None
    null_class: bool = False
    num_heads_upsample: int = -1

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None, train: bool = False
    ) -> jnp.ndarray:
        _check_channels(x, self.in_channels)
        return self._forward(x, t, y, train)

    def _forward(self, x, t, y, train):
        """The network body, shared with SuperResUNet (which prepends its input)."""
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "pass y (class labels [B]) if and only if the model is class-conditional "
                f"(num_classes={self.num_classes})."
            )
        if y is not None:
            _check_labels(y, x.shape[0], self.num_classes, self.null_class)
        res, attn = block_factories(self, train)
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        mc = self.model_channels

        emb = time_embedding(t, mc)
        if self.num_classes is not None:
            label_emb = nn.Embed(
                self.num_classes + int(self.null_class),
                4 * mc,
                param_dtype=jnp.float32,
                embedding_init=nn.initializers.normal(1.0),
                name="label_emb",
            )
            emb = emb + label_emb(jnp.asarray(y, jnp.int32))
        emb = emb.astype(self.dtype)  # [B, 4 mc]

        h = x.astype(self.dtype)
        skips, skip_channels = [], []
        for i, (layers, ch) in enumerate(encoder_blocks(self, res, attn)):
            h = BlockSequence(layers, name=f"input_blocks_{i}")(h, emb)
            skips.append(h)
            skip_channels.append(ch)
        res_px = self.image_size // 2 ** (len(self.channel_mult) - 1)
        h = BlockSequence(middle_block(res, attn, ch), name="middle_block")(h, emb)

        block = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                skip_ch = skip_channels.pop()
                layers = [functools.partial(res, ch + skip_ch, int(mc * mult))]
                ch = int(mc * mult)
                if res_px in self.attention_resolutions:
                    layers.append(functools.partial(attn, ch, num_heads=heads_up))
                if level and i == self.num_res_blocks:
                    if self.resblock_updown:
                        layers.append(functools.partial(res, ch, ch, up=True))
                    else:
                        layers.append(
                            functools.partial(Upsample, ch, self.conv_resample, dtype=self.dtype)
                        )
                    res_px *= 2
                h = jnp.concatenate([h, skips.pop()], axis=-1)  # [B, H, W, ch + skip]
                h = BlockSequence(tuple(layers), name=f"output_blocks_{block}")(h, emb)
                block += 1

        # The output head runs in float32, as the paper code's.
        h = nn.silu(GroupNorm32(self.norm_groups, name="out_0")(h.astype(jnp.float32)))
        return conv(self.out_channels, 3, name="out_2", dtype=jnp.float32, zero=True)(h)


class SuperResUNet(UNet):
    """UNet conditioned on a low-resolution image (the paper's upsamplers).

    `in_channels` is the channel count of x alone; the low-resolution image is
    upsampled bilinearly to x's size and concatenated, so the first convolution sees
    twice as many channels. Called as `apply(variables, x, t, low_res=..., y=...)`.
    """

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        t: jnp.ndarray,
        y: jnp.ndarray | None = None,
        train: bool = False,
        *,
        low_res: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        if low_res is None:
            raise ValueError("SuperResUNet needs low_res=, the [B, h, w, C] low-resolution image.")
        _check_channels(x, self.in_channels)
        _check_channels(low_res, self.in_channels, "low_res")
        batch, height, width, _ = x.shape
        # Half-pixel-centred bilinear upsampling, PyTorch's align_corners=False.
        up = jax.image.resize(
            jnp.asarray(low_res, x.dtype),
            (batch, height, width, low_res.shape[-1]),
            method="bilinear",
            antialias=False,
        )
        return self._forward(jnp.concatenate([x, up], axis=-1), t, y, train)
