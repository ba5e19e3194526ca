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

from diffusion_jax.models.attention import AttentionBlock
from diffusion_jax.models.layers import (
    BlockSequence,
    Downsample,
    GroupNorm32,
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


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep (and class) embedding.

    Attributes:
      channels: input channels.
      out_channels: output channels.
      dropout: dropout rate before the last convolution.
      use_scale_shift_norm: AdaGN (norm(h) * (1 + scale) + shift) instead of h + emb.
      up: BigGAN-style nearest x2 upsampling inside the block.
      down: BigGAN-style average-pool x2 downsampling inside the block.
      deterministic: disables dropout (inference).
      dtype: compute dtype.
    """

    channels: int
    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray) -> jnp.ndarray:
        h = nn.silu(GroupNorm32(name="in_layers_0")(x))
        if self.up or self.down:
            resample = upsample_nearest if self.up else downsample_avg
            h, x = resample(h), resample(x)
        h = conv(self.out_channels, 3, name="in_layers_2", dtype=self.dtype)(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(emb_width, name="emb_layers_1", dtype=self.dtype)(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]  # [B, 1, 1, C or 2C]
        norm = GroupNorm32(name="out_layers_0")
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


class UNet(nn.Module):
    """The ADM UNet (Dhariwal & Nichol 2021), optionally class-conditional.

    Attributes mirror the paper code's flags; `attention_resolutions` are feature-map
    sizes in pixels and `channel_mult` is already resolved (no empty default here).
    Called as `module.apply(variables, x, t, y=None, train=False)` with x [B, H, W, C]
    in [-1, 1] and t [B] (int or float); returns [B, H, W, out_channels] in float32.
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    channel_mult: Sequence[float]
    dropout: float = 0.0
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False

    def _block_factories(self, train: bool):
        """Factories for ResBlock / AttentionBlock, rematerialised when asked."""
        res_cls = RematResBlock if self.remat else ResBlock
        attn_cls = RematAttentionBlock if self.remat else AttentionBlock
        res = functools.partial(
            res_cls,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            deterministic=not train,
            dtype=self.dtype,
        )
        attn = functools.partial(
            attn_cls,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
            dtype=self.dtype,
        )
        return res, attn

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        t: jnp.ndarray,
        y: jnp.ndarray | None = None,
        train: bool = False,
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
        res, attn = self._block_factories(train)
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        mc = self.model_channels
        emb_dim = 4 * mc

        emb = timestep_embedding(t, mc)  # [B, mc], float32
        emb = dense(emb_dim, name="time_embed_0", dtype=jnp.float32)(emb)
        emb = dense(emb_dim, name="time_embed_2", dtype=jnp.float32)(nn.silu(emb))
        if self.num_classes is not None:
            label_emb = nn.Embed(
                self.num_classes,
                emb_dim,
                param_dtype=jnp.float32,
                embedding_init=nn.initializers.normal(1.0),
                name="label_emb",
            )
            emb = emb + label_emb(jnp.asarray(y, jnp.int32))
        emb = emb.astype(self.dtype)  # [B, 4 mc]

        ch = int(self.channel_mult[0] * mc)
        first = functools.partial(conv, ch, 3, dtype=self.dtype)
        h = x.astype(self.dtype)
        h = BlockSequence((first,), name="input_blocks_0")(h, emb)
        skips, skip_channels = [h], [ch]
        block, res_px = 1, self.image_size
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [functools.partial(res, ch, int(mult * mc))]
                ch = int(mult * mc)
                if res_px in self.attention_resolutions:
                    layers.append(functools.partial(attn, ch, num_heads=self.num_heads))
                h = BlockSequence(tuple(layers), name=f"input_blocks_{block}")(h, emb)
                skips.append(h)
                skip_channels.append(ch)
                block += 1
            if level != len(self.channel_mult) - 1:
                if self.resblock_updown:
                    down = functools.partial(res, ch, ch, down=True)
                else:
                    down = functools.partial(Downsample, ch, self.conv_resample, dtype=self.dtype)
                h = BlockSequence((down,), name=f"input_blocks_{block}")(h, emb)
                skips.append(h)
                skip_channels.append(ch)
                block += 1
                res_px //= 2

        middle = (
            functools.partial(res, ch, ch),
            functools.partial(attn, ch, num_heads=self.num_heads),
            functools.partial(res, ch, ch),
        )
        h = BlockSequence(middle, name="middle_block")(h, emb)

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
        h = nn.silu(GroupNorm32(name="out_0")(h.astype(jnp.float32)))
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
