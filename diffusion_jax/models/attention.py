"""Self-attention over spatial positions and the classifier's attention pooling.

Both channel layouts of the paper code's fused qkv projection are supported, because
its released checkpoints use both:
  * legacy order (`use_new_attention_order=False`): channels laid out [head][q|k|v][ch];
  * new order (`use_new_attention_order=True`): channels laid out [q|k|v][head][ch].
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import GroupNorm32, dense

Dtype = Any


def qkv_attention(qkv: jnp.ndarray, num_heads: int, new_order: bool) -> jnp.ndarray:
    """Multi-head softmax(q k^T / sqrt(d)) v over a fused [B, T, 3 * C] qkv projection.

    `new_order`: the [q|k|v][head][ch] layout, else [head][q|k|v][ch]. Returns [B, T, C],
    heads concatenated in head order.
    """
    batch, length, width = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads ({num_heads}).")
    head_dim = width // (3 * num_heads)
    if new_order:
        qkv = qkv.reshape(batch, length, 3, num_heads, head_dim)  # [B, T, 3, H, D]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        qkv = qkv.reshape(batch, length, num_heads, 3, head_dim)  # [B, T, H, 3, D]
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    # [B, T, H, D] each. The XLA implementation takes the softmax in float32 even for
    # bf16 inputs, as the paper code does.
    out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return out.reshape(batch, length, num_heads * head_dim)


class AttentionBlock(nn.Module):
    """Residual self-attention over all spatial positions of a [B, H, W, C] map.

    `num_head_channels` (channels per head) overrides `num_heads` when not -1.
    """

    channels: int
    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @property
    def heads(self) -> int:
        """The number of heads this block uses."""
        if self.num_head_channels == -1:
            return self.num_heads
        if self.channels % self.num_head_channels:
            raise ValueError(
                f"attention width {self.channels} is not divisible by num_head_channels="
                f"{self.num_head_channels}: change num_head_channels or num_channels."
            )
        return self.channels // self.num_head_channels

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray | None = None) -> jnp.ndarray:
        del emb  # Blocks share one signature; attention ignores the embedding.
        batch, height, width, channels = x.shape
        h = x.reshape(batch, height * width, channels)  # [B, T, C]
        normed = GroupNorm32(self.norm_groups, name="norm")(h)
        qkv = dense(3 * channels, name="qkv", dtype=self.dtype)(normed)
        h = qkv_attention(qkv, self.heads, self.use_new_attention_order)
        h = dense(channels, name="proj_out", dtype=self.dtype, zero=True)(h)
        return x + h.reshape(x.shape)


class AttentionPool2d(nn.Module):
    """Attention pooling of a [B, H, W, C] map to [B, out_features] (CLIP-style).

    The spatial mean is prepended as an extra token, learned positional embeddings are
    added, and the output at that token (after multi-head attention in the new qkv
    order) is projected to `out_features` (the number of classes). `spatial_size` is
    H (= W) of the input map.
    """

    spatial_size: int
    num_head_channels: int
    out_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, return_features: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """[B, out_features] outputs; with `return_features` also the pooled token [B, C]
        before the output projection."""
        batch, height, width, channels = x.shape
        if height != self.spatial_size or width != self.spatial_size:
            raise ValueError(
                f"AttentionPool2d expects {self.spatial_size}x{self.spatial_size} features, "
                f"got {height}x{width}: check image_size."
            )
        tokens = height * width + 1
        pos = self.param(
            "positional_embedding",
            lambda key, shape: jax.random.normal(key, shape, jnp.float32) / channels**0.5,
            (tokens, channels),
        )  # [T + 1, C]
        h = x.reshape(batch, height * width, channels)
        h = jnp.concatenate([jnp.mean(h, axis=1, keepdims=True), h], axis=1)  # [B, T+1, C]
        h = h + pos.astype(h.dtype)[None]
        qkv = dense(3 * channels, name="qkv_proj", dtype=self.dtype)(h)
        h = qkv_attention(qkv, channels // self.num_head_channels, new_order=True)
        out = dense(self.out_features, name="c_proj", dtype=self.dtype)(h)[:, 0]
        return (out, h[:, 0]) if return_features else out
