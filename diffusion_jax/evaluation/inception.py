"""Inception-v3 as in the TF1 graph of the paper's evaluator (FID variant), in Flax.

The paper's evaluator (guided-diffusion `evaluations/evaluator.py`) feeds uint8-valued
float images of any size into `classify_image_graph_def.pb` (inception-2015-12-05). That
graph resizes to 299x299 with TF1's legacy bilinear kernel, maps [0, 255] to [-1, 1] with
`(x - 128) / 128`, and runs an Inception-v3 whose blocks differ from torchvision's in the
pooling of some branches (average pools that ignore padding; a max pool in the last
block). This module reproduces that graph; parameter names follow the module names of
pytorch-fid's port so its `.pth` state dict maps one-to-one (see `inception_weights`).

Outputs (the three tensors the evaluator reads):
  * `pool`: `pool_3`, the 2048-d global average pool (FID, precision/recall);
  * `spatial`: `mixed_6/conv`, Mixed_6d's 1x1 branch, channels [:7], flattened in NHWC
    order (17 * 17 * 7 = 2023 features; sFID);
  * `logits`: `pool @ W` of the 1008-way head WITHOUT its bias, because the evaluator
    builds its softmax from the `softmax/logits/MatMul` weight alone (Inception Score).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
# TF's batch-norm epsilon in this graph (torchvision's BasicConv2d uses the same value).
BN_EPS = 1e-3


def resize_bilinear_tf1(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Resizes NHWC images like TF1's `ResizeBilinear` with `align_corners=False`.

    TF1's legacy kernel samples source coordinate `i * (in / out)` (no half-pixel
    centres), so the output's first row/column equals the input's and the grid is shifted
    against a plain bilinear resize such as `jax.image.resize`. Arithmetic is float32 in
    the order TF's kernel uses, so results match it to float32 rounding.
    `[N, H, W, C]` images of any real dtype (values not rescaled) -> `[N, size, size, C]`
    float32.
    """
    x = jnp.asarray(images, jnp.float32)

    def grid(in_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        # TF computes the scale and the source coordinate in float32.
        scale = jnp.float32(in_size) / jnp.float32(size)
        src = jnp.arange(size, dtype=jnp.float32) * scale
        lo = jnp.floor(src).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, in_size - 1)
        return lo, hi, src - lo.astype(jnp.float32)

    y_lo, y_hi, dy = grid(x.shape[1])
    x_lo, x_hi, dx = grid(x.shape[2])
    top = jnp.take(x, y_lo, axis=1)  # [N, size, W, C]
    bottom = jnp.take(x, y_hi, axis=1)
    dx = dx[None, None, :, None]
    # TF interpolates along x first: left + (right - left) * dx, then the same along y.
    left, right = jnp.take(top, x_lo, axis=2), jnp.take(top, x_hi, axis=2)
    top = left + (right - left) * dx
    left, right = jnp.take(bottom, x_lo, axis=2), jnp.take(bottom, x_hi, axis=2)
    bottom = left + (right - left) * dx
    return top + (bottom - top) * dy[None, :, None, None]  # [N, size, size, C]


def preprocess(images: jax.Array) -> jax.Array:
    """Maps `[N, H, W, 3]` images with values in [0, 255] to the network's input.

    Returns:
      `[N, 299, 299, 3]` float32 in [-1, 1): TF1 bilinear resize, then `(x - 128) / 128`
      as the graph does (not `2 * x / 255 - 1`).
    """
    x = resize_bilinear_tf1(images, INPUT_SIZE)
    return (x - 128.0) / 128.0


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
    """Convolution without bias, inference batch norm (eps 1e-3), ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        zeros, ones = nn.initializers.zeros, nn.initializers.ones
        scale = self.param("scale", ones, (self.features,), jnp.float32)
        bias = self.param("bias", zeros, (self.features,), jnp.float32)
        mean = self.param("mean", zeros, (self.features,), jnp.float32)
        var = self.param("var", ones, (self.features,), jnp.float32)
        strides, dims = (self.stride, self.stride), ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(
            x, kernel, strides, _pad(self.padding), dimension_numbers=dims, precision=self.precision
        )
        y = (y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
        return nn.relu(y)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    # (flax divides by an int count, which promotes to float64 when x64 is enabled.)
    y = nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)
    return y.astype(x.dtype)


def _max_pool(x: jax.Array, stride: int, padding: int) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), padding=_pad(padding))


class BlockA(nn.Module):
    """Mixed_5b/5c/5d (TF `mixed`, `mixed_1`, `mixed_2`): 35x35 block."""

    pool_features: int
    precision: jax.lax.Precision

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, p, name: ConvBN(f, k, 1, p, self.precision, name=name)  # noqa: E731
        b1 = c(64, (1, 1), 0, "branch1x1")(x)
        b5 = c(48, (1, 1), 0, "branch5x5_1")(x)
        b5 = c(64, (5, 5), 2, "branch5x5_2")(b5)
        b3 = c(64, (1, 1), 0, "branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), 1, "branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), 1, "branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), 0, "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
    """Mixed_6a (TF `mixed_3`): 35x35 -> 17x17 reduction."""

    precision: jax.lax.Precision

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, s, p, name: ConvBN(f, k, s, p, self.precision, name=name)  # noqa: E731
        b3 = c(384, (3, 3), 2, 0, "branch3x3")(x)
        bd = c(64, (1, 1), 1, 0, "branch3x3dbl_1")(x)
        bd = c(96, (3, 3), 1, 1, "branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), 2, 0, "branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class BlockC(nn.Module):
    """Mixed_6b..6e (TF `mixed_4`..`mixed_7`): 17x17 block with factorised 7x7 convs.

    Also returns its 1x1 branch: for Mixed_6d that tensor is TF's `mixed_6/conv`.
    """

    channels_7x7: int
    precision: jax.lax.Precision

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = lambda f, k, p, name: ConvBN(f, k, 1, p, self.precision, name=name)  # noqa: E731
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), 0, "branch1x1")(x)
        b7 = c(c7, (1, 1), 0, "branch7x7_1")(x)
        b7 = c(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
        b7 = c(192, (7, 1), (3, 0), "branch7x7_3")(b7)
        bd = c(c7, (1, 1), 0, "branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), 0, "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class BlockD(nn.Module):
    """Mixed_7a (TF `mixed_8`): 17x17 -> 8x8 reduction."""

    precision: jax.lax.Precision

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, s, p, name: ConvBN(f, k, s, p, self.precision, name=name)  # noqa: E731
        b3 = c(192, (1, 1), 1, 0, "branch3x3_1")(x)
        b3 = c(320, (3, 3), 2, 0, "branch3x3_2")(b3)
        b7 = c(192, (1, 1), 1, 0, "branch7x7x3_1")(x)
        b7 = c(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), 2, 0, "branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class BlockE(nn.Module):
    """Mixed_7b/7c (TF `mixed_9`, `mixed_10`): 8x8 block with split 3x3 convs.

    The TF graph pools the last block's side branch with a max pool (not an average):
    `max_pool_branch=True` reproduces that for Mixed_7c.
    """

    max_pool_branch: bool
    precision: jax.lax.Precision

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k, p, name: ConvBN(f, k, 1, p, self.precision, name=name)  # noqa: E731
        b1 = c(320, (1, 1), 0, "branch1x1")(x)
        b3 = c(384, (1, 1), 0, "branch3x3_1")(x)
        b3a = c(384, (1, 3), (0, 1), "branch3x3_2a")(b3)
        b3 = jnp.concatenate([b3a, c(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1)
        bd = c(448, (1, 1), 0, "branch3x3dbl_1")(x)
        bd = c(384, (3, 3), 1, "branch3x3dbl_2")(bd)
        bda = c(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd)
        bd = jnp.concatenate([bda, c(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool(x, 1, 1) if self.max_pool_branch else _avg_pool_same(x)
        bp = c(192, (1, 1), 0, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 network on preprocessed `[N, 299, 299, 3]` inputs.

    Attributes:
      precision: matmul/conv precision; HIGHEST keeps float32 accuracy on accelerators
        whose default would round to bf16/TF32 (the evaluator's numbers are float32).
    """

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        p = self.precision
        x = ConvBN(32, (3, 3), 2, 0, p, name="Conv2d_1a_3x3")(x)  # [N, 149, 149, 32]
        x = ConvBN(32, (3, 3), 1, 0, p, name="Conv2d_2a_3x3")(x)  # [N, 147, 147, 32]
        x = ConvBN(64, (3, 3), 1, 1, p, name="Conv2d_2b_3x3")(x)  # [N, 147, 147, 64]
        x = _max_pool(x, 2, 0)  # [N, 73, 73, 64]
        x = ConvBN(80, (1, 1), 1, 0, p, name="Conv2d_3b_1x1")(x)  # [N, 73, 73, 80]
        x = ConvBN(192, (3, 3), 1, 0, p, name="Conv2d_4a_3x3")(x)  # [N, 71, 71, 192]
        x = _max_pool(x, 2, 0)  # [N, 35, 35, 192]
        x = BlockA(32, p, name="Mixed_5b")(x)  # [N, 35, 35, 256]
        x = BlockA(64, p, name="Mixed_5c")(x)  # [N, 35, 35, 288]
        x = BlockA(64, p, name="Mixed_5d")(x)  # [N, 35, 35, 288]
        x = BlockB(p, name="Mixed_6a")(x)  # [N, 17, 17, 768]
        x, _ = BlockC(128, p, name="Mixed_6b")(x)
        x, _ = BlockC(160, p, name="Mixed_6c")(x)
        x, mixed_6_conv = BlockC(160, p, name="Mixed_6d")(x)  # mixed_6_conv: [N, 17, 17, 192]
        x, _ = BlockC(192, p, name="Mixed_6e")(x)  # [N, 17, 17, 768]
        x = BlockD(p, name="Mixed_7a")(x)  # [N, 8, 8, 1280]
        x = BlockE(False, p, name="Mixed_7b")(x)  # [N, 8, 8, 2048]
        x = BlockE(True, p, name="Mixed_7c")(x)  # [N, 8, 8, 2048]
        pool = jnp.mean(x, axis=(1, 2))  # [N, 2048]
        w = self.param(
            "fc_kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES), jnp.float32
        )
        logits = jnp.dot(pool, w, precision=p)  # [N, 1008]
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # [N, 2023]
        return {"pool": pool, "spatial": spatial, "logits": logits}


def init_params_shapes(module: InceptionV3FID) -> dict:
    """Returns the parameter tree of `module` as `jax.ShapeDtypeStruct`s (no compute)."""
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), dummy)["params"]
