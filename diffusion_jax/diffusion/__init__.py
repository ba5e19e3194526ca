"""Gaussian diffusion in pure, jit-compatible JAX (the paper code's GaussianDiffusion).

`create_diffusion(config.diffusion)` returns a `Diffusion` (a hashable value) with
q_sample, training_losses, p_sample_loop, ddim_sample_loop, dpm_solver_sample_loop,
calc_bpd_loop and the other pieces as methods; `SamplerOptions` is the one home of a
sampler's settings (used by `Diffusion.sample_loop`); `classifier_cond_fn` builds the
guidance gradient from a classifier and `classifier_free_model_fn` wraps a model for
classifier-free guidance.
"""

from diffusion_jax.diffusion.factory import Diffusion, create_diffusion
from diffusion_jax.diffusion.gaussian import (
    LOSS_TYPES,
    MODEL_MEAN_TYPES,
    MODEL_VAR_TYPES,
    GaussianDiffusion,
)
from diffusion_jax.diffusion.guidance import classifier_cond_fn, classifier_free_model_fn
from diffusion_jax.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffusion_jax.diffusion.options import SamplerOptions
from diffusion_jax.diffusion.resample import (
    SCHEDULE_SAMPLERS,
    LossSecondMomentResampler,
    SamplerState,
    ScheduleSampler,
    UniformSampler,
    create_schedule_sampler,
)
from diffusion_jax.diffusion.respace import space_timesteps
from diffusion_jax.diffusion.schedules import NOISE_SCHEDULES, get_named_beta_schedule

__all__ = [
    "LOSS_TYPES",
    "MODEL_MEAN_TYPES",
    "MODEL_VAR_TYPES",
    "NOISE_SCHEDULES",
    "SCHEDULE_SAMPLERS",
    "Diffusion",
    "GaussianDiffusion",
    "LossSecondMomentResampler",
    "SamplerOptions",
    "SamplerState",
    "ScheduleSampler",
    "UniformSampler",
    "classifier_cond_fn",
    "classifier_free_model_fn",
    "create_diffusion",
    "create_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
