"""The noise-aware classifier: the UNet's encoder half plus a pooling head (NHWC).

Mirrors the paper code's EncoderUNetModel; submodule names follow its state-dict keys.
"""

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.attention import AttentionPool2d
from diffusion_jax.models.layers import BlockSequence, GroupNorm32, conv, dense
from diffusion_jax.models.unet import (
    Encoder,
    block_factories,
    encoder_blocks,
    middle_block,
    time_embedding,
)

POOLS = ("attention", "adaptive", "spatial", "spatial_v2")


class EncoderUNet(Encoder):
    """Timestep-conditioned image classifier p(y | x_t).

    Called as `module.apply(variables, x, t, train=False)` with x [B, H, W, C] and
    t [B]; returns float32 logits [B, out_channels]. With `return_features=True` it returns
    `(logits, features)`, features [B, D] float32 being the penultimate representation: the
    input of the last linear layer (the attention pool's token before `c_proj`, the
    pooled map before the adaptive head's 1x1 conv, the spatial heads' hidden layer after
    its activation); the evaluator's feature network uses them. Attributes as `UNet`'s, plus
    `pool`: 'attention' (attention pooling, the paper's), 'adaptive' (global average
    + 1x1 conv), 'spatial' / 'spatial_v2' (MLP on the spatial means of every block).
    """

    pool: str = "attention"

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        t: jnp.ndarray,
        y: jnp.ndarray | None = None,
        train: bool = False,
        return_features: bool = False,
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        del y  # Accepted so classifiers and UNets share a calling convention.
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}.")
        res, attn = block_factories(self, train)
        emb = time_embedding(t, self.model_channels).astype(self.dtype)  # [B, 4 mc]

        spatial = self.pool.startswith("spatial")
        means = []  # per-block spatial means, [B, C_i] each, for the spatial pools

        def run(layers, name, h):
            h = BlockSequence(tuple(layers), name=name)(h, emb)
            if spatial:
                means.append(jnp.mean(h.astype(jnp.float32), axis=(1, 2)))
            return h

        h = x.astype(self.dtype)
        blocks = encoder_blocks(self, res, attn)
        for i, (layers, _) in enumerate(blocks):
            h = run(layers, f"input_blocks_{i}", h)
        ch = blocks[-1][1]
        res_px = self.image_size // 2 ** (len(self.channel_mult) - 1)
        h = run(middle_block(res, attn, ch), "middle_block", h)

        if spatial:
            h = jnp.concatenate(means, axis=-1)  # [B, sum of block widths]
            h = dense(2048, name="out_0", dtype=jnp.float32)(h)
            if self.pool == "spatial":
                h = nn.relu(h)
                out = dense(self.out_channels, name="out_2", dtype=jnp.float32)(h)
            else:
                h = nn.silu(GroupNorm32(self.norm_groups, name="out_1")(h))
                out = dense(self.out_channels, name="out_3", dtype=jnp.float32)(h)
            return (out, h) if return_features else out

        # Non-spatial heads run in float32, as the paper code's.
        h = nn.silu(GroupNorm32(self.norm_groups, name="out_0")(h.astype(jnp.float32)))
        if self.pool == "adaptive":
            h = jnp.mean(h, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
            out = conv(self.out_channels, 1, name="out_3", dtype=jnp.float32, zero=True)(h)
            return (out[:, 0, 0], h[:, 0, 0]) if return_features else out[:, 0, 0]
        if self.num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (64 in the paper).")
        return AttentionPool2d(
            res_px, self.num_head_channels, self.out_channels, dtype=jnp.float32, name="out_2"
        )(h, return_features=return_features)
