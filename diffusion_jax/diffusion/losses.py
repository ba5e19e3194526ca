"""Likelihood terms of the variational bound: Gaussian KL and the discretised decoder."""

import math

import jax.numpy as jnp


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """[B] means of a [B, ...] array over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise (broadcast), in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    """The tanh approximation of the standard normal CDF used by the paper code.

    Kept instead of the exact erf so likelihoods are comparable with published bits/dim.
    """
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jnp.ndarray, *, means: jnp.ndarray, log_scales: jnp.ndarray
) -> jnp.ndarray:
    """Elementwise log-probability (nats) of 8-bit images under a Gaussian discretised to
    256 bins: x are uint8 values rescaled to [-1, 1], means and log standard deviations
    `log_scales` share its shape. The edge bins at -1 and 1 extend to -inf and +inf.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"x, means and log_scales must share a shape, got {x.shape}, {means.shape}, "
            f"{log_scales.shape}"
        )
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    # Bin half-width: one uint8 level spans 2/255 in [-1, 1].
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # The 1e-12 floor keeps log finite where the approximate CDF saturates.
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )
