"""Building blocks shared by the UNet and the classifier (NHWC throughout).

Parameter names mirror the paper code's state-dict keys (see
`diffusion_jax.checkpoints.openai`): a Flax submodule called `in_layers_2` holds what
PyTorch calls `in_layers.2`, and a `layers_N` child of a block holds its `N`-th entry.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch's default Conv/Linear weight distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# so freshly initialised models train like the paper's.
torch_like_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nn.initializers.zeros


class ParamsTreeApply(nn.Module):
    """Base of the top-level networks: `apply` also takes a bare params tree.

    `module.apply(variables, ...)` is Flax's convention; checkpoint loaders return the
    params tree itself. Both work here: a mapping without a 'params' collection is
    taken as the params tree and wrapped, so neither form fails with a confusing
    "could not find parameter" error.
    """

    def apply(self, variables, *args, **kwargs):
        """Flax `apply`, accepting `{'params': tree, ...}` or the params tree itself."""
        if isinstance(variables, Mapping) and "params" not in variables:
            variables = {"params": variables}
        return super().apply(variables, *args, **kwargs)


def timestep_embedding(timesteps: jnp.ndarray, dim: int, max_period: int = 10_000) -> jnp.ndarray:
    """Sinusoidal embedding of [B] (possibly fractional) timesteps, [B, dim] float32.

    Cosines of all frequencies, then sines (zero-padded to `dim` when it is odd), the
    layout the paper's checkpoints were trained with.
    """
    half = dim // 2
    # Exponents in float32 as the paper code forms them, exponentials rounded from
    # float64: large timesteps amplify any ulp difference in a frequency into the phase.
    exponents = np.arange(half, dtype=np.float32) * np.float32(-math.log(max_period))
    exponents = exponents / np.float32(half)
    freqs = jnp.asarray(np.exp(exponents.astype(np.float64)).astype(np.float32))  # [half]
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]  # [B, half]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.Module):
    """GroupNorm (32 groups by default, as the paper's code) computed in float32 (eps 1e-5).

    The input dtype is restored on the way out, so bf16 activations keep their dtype
    while mean and variance never lose precision.
    """

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm32 needs channels divisible by {self.num_groups}, got {channels}: "
                "choose num_channels (and channel_mult) so every width is a multiple of "
                "model.norm_groups."
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        h = jnp.asarray(x, jnp.float32)
        grouped = h.reshape(*h.shape[:-1], self.num_groups, channels // self.num_groups)
        # Reduce over every spatial axis and the channels of a group: [B, ..., G, C/G].
        axes = (*range(1, grouped.ndim - 2), grouped.ndim - 1)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        grouped = (grouped - mean) / jnp.sqrt(var + self.epsilon)
        h = grouped.reshape(h.shape) * scale + bias
        return h.astype(x.dtype)


def conv(
    features: int, kernel: int, *, name: str, dtype: Dtype, stride: int = 1, zero: bool = False
) -> nn.Conv:
    """A square 2-D convolution with PyTorch's padding (kernel // 2) and float32 parameters.

    `zero` zero-initialises the weights (the paper code's output projections).
    """
    pad, kw = (kernel // 2, kernel // 2), _layer_kwargs(name, dtype, zero)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=(pad, pad), **kw)


def dense(features: int, *, name: str, dtype: Dtype, zero: bool = False) -> nn.Dense:
    """A linear layer (also used for the paper code's 1x1 Conv1d) with float32 params."""
    return nn.Dense(features, **_layer_kwargs(name, dtype, zero))


def _layer_kwargs(name: str, dtype: Dtype, zero: bool) -> dict:
    init = zeros_init if zero else torch_like_init
    return dict(name=name, dtype=dtype, param_dtype=jnp.float32, kernel_init=init)


def upsample_nearest(x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, 2H, 2W, C] by nearest-neighbour repetition."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H/2, W/2, C] by 2x2 average pooling."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution."""

    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray | None = None) -> jnp.ndarray:
        del emb  # Blocks share one signature; resampling ignores the embedding.
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv(self.channels, 3, name="conv", dtype=self.dtype)(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling: a strided 3x3 convolution or 2x2 average pooling."""

    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray | None = None) -> jnp.ndarray:
        del emb
        if self.use_conv:
            return conv(self.channels, 3, stride=2, name="op", dtype=self.dtype)(x)
        return downsample_avg(x)


class BlockSequence(nn.Module):
    """A sequence of blocks that each receive the timestep embedding.

    The blocks are built here from factories so that their parameters nest under this
    module as `layers_0`, `layers_1`, ... (the paper code's `input_blocks.3.0`, ...).

    Attributes:
      factories: callables `factory(name=...) -> module`; modules called as
        `module(x, emb)`, except plain convolutions (`nn.Conv`), called as `module(x)`.
    """

    factories: Sequence[Callable[..., nn.Module]]

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray) -> jnp.ndarray:
        for i, factory in enumerate(self.factories):
            layer = factory(name=f"layers_{i}")
            x = layer(x) if isinstance(layer, nn.Conv) else layer(x, emb)
        return x
