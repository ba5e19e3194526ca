"""`create_diffusion`: the paper code's diffusion flags -> a `Diffusion` object."""

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_jax.diffusion import (
    dpm_solver,  # noqa: F401  (registers dpm_solver++)
    keys,
    objectives,
    respace,
    samplers,
    schedules,
)
from diffusion_jax.diffusion.conditioning import Conditioning
from diffusion_jax.diffusion.gaussian import GaussianDiffusion, ModelFn
from diffusion_jax.diffusion.loops import SamplingLoops

# The paper code's create_gaussian_diffusion arguments and their defaults.
CONFIG_DEFAULTS = {
    "steps": 1000,
    "learn_sigma": False,
    "sigma_small": False,
    "noise_schedule": "linear",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
    "timestep_respacing": "",
}
# Beyond the paper's flags: set a parameterisation directly (e.g. 'previous_x').
_OVERRIDES = ("model_mean_type", "model_var_type", "loss_type")


class Diffusion(GaussianDiffusion, SamplingLoops):
    """A Gaussian diffusion process with objectives and compiled samplers as methods.

    All of `GaussianDiffusion`'s pure array functions (q_sample, q_mean_variance,
    q_posterior_mean_variance, p_mean_variance, ...) plus training_losses, the single
    steps (p_sample, ddim_sample, ddim_reverse_sample) and the compiled loops.

    A value: two `Diffusion`s with equal settings are equal and hash alike, so they
    share every compiled loop (jax.jit caches on the settings, the callables, the
    `SamplerOptions` and the input shapes) and can be static arguments of jitted code.

    Randomness is per sample: the loops take one key (sample i uses fold_in(rng, i))
    or [B] per-sample keys, so a sample never depends on the rest of its batch or on
    the device count (see `p_sample_loop`). Guidance labels reach cond_fn through
    `cond_kwargs` (default: model_kwargs), so an unconditional model can be guided.
    """

    # --- Objectives: `objectives`' functions, this diffusion their first argument. ----

    training_losses = objectives.training_losses
    vb_terms_bpd = objectives.vb_terms_bpd
    prior_bpd = objectives.prior_bpd
    calc_bpd_loop = objectives.calc_bpd_loop

    # --- Single steps. --------------------------------------------------------------

    def _step(self, step, model_fn, x, t, rng=None, *, clip_denoised=True, denoised_fn=None,
              cond_fn=None, model_kwargs=None, cond_kwargs=None, **extra):  # fmt: skip
        """`step` (a `samplers` step) with the paper code's keywords (`extra`: noise, eta)."""
        cond = Conditioning(model_kwargs, cond_fn, cond_kwargs, denoised_fn)
        rng, clip = keys.as_key(rng), clip_denoised
        return step(self, model_fn, x, t, rng, clip_denoised=clip, cond=cond, **extra)

    def p_sample(self, model_fn: ModelFn, x, t, rng=None, **kwargs):
        """One ancestral step; see samplers.p_sample (rng: one key or [B] keys; keywords
        noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, cond_kwargs)."""
        return self._step(samplers.p_sample, model_fn, x, t, rng, **kwargs)

    def ddim_sample(self, model_fn: ModelFn, x, t, rng=None, **kwargs):
        """One DDIM step; see samplers.ddim_sample (keywords as `p_sample`'s, plus eta)."""
        return self._step(samplers.ddim_sample, model_fn, x, t, rng, **kwargs)

    def ddim_reverse_sample(
        self,
        model_fn: ModelFn,
        x,
        t,
        *,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """One reverse DDIM step x_t -> x_{t+1}; see samplers.ddim_reverse_sample."""
        cond = Conditioning(model_kwargs, denoised_fn=denoised_fn)
        clip = clip_denoised
        return samplers.ddim_reverse_sample(
            self, model_fn, x, t, clip_denoised=clip, cond=cond, eta=eta
        )


def _read_config(diffusion_config, overrides) -> dict[str, Any]:
    values = dict(CONFIG_DEFAULTS)
    if diffusion_config is not None:
        if hasattr(diffusion_config, "to_dict"):  # ml_collections.ConfigDict
            diffusion_config = diffusion_config.to_dict()
        if not isinstance(diffusion_config, Mapping):
            raise ValueError(
                "diffusion_config must be a ConfigDict or a mapping of the paper code's "
                f"diffusion flags, got {type(diffusion_config).__name__}"
            )
        values.update(diffusion_config)
    values.update(overrides)
    unknown = sorted(set(values) - set(CONFIG_DEFAULTS) - set(_OVERRIDES))
    if unknown:
        raise ValueError(
            f"unknown diffusion config field(s) {unknown}; known fields are "
            f"{sorted(CONFIG_DEFAULTS) + list(_OVERRIDES)}"
        )
    return values


def create_diffusion(diffusion_config=None, **kwargs) -> Diffusion:
    """Builds the (respaced) diffusion the paper code's flags describe.

    Args:
      diffusion_config: `config.diffusion` (ConfigDict or mapping) with steps,
        learn_sigma, sigma_small, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing. Missing fields
        take the paper code's defaults.
      **kwargs: the same fields as keywords (overriding the config), and optionally
        model_mean_type ('epsilon' | 'start_x' | 'previous_x'), model_var_type
        ('fixed_small' | 'fixed_large' | 'learned' | 'learned_range') or loss_type
        ('mse' | 'rescaled_mse' | 'kl' | 'rescaled_kl') to override what the flags
        imply.

    Returns a `Diffusion` over the kept timesteps (all of them when timestep_respacing
    is '', None, 0 or '0'), calling the model with the original timestep indices.

    Raises:
      ValueError: naming the field for an unknown schedule, parameterisation, loss or
        field, or a respacing that cannot be built.
    """
    cfg = _read_config(diffusion_config, kwargs)
    steps = cfg["steps"]
    betas = schedules.get_named_beta_schedule(cfg["noise_schedule"], steps)
    if cfg.get("loss_type") is not None:
        loss_type = cfg["loss_type"]
    elif cfg["use_kl"]:
        loss_type = "rescaled_kl"
    elif cfg["rescale_learned_sigmas"]:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    mean_type = cfg.get("model_mean_type") or ("start_x" if cfg["predict_xstart"] else "epsilon")
    if cfg.get("model_var_type") is not None:
        var_type = cfg["model_var_type"]
    elif cfg["learn_sigma"]:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if cfg["sigma_small"] else "fixed_large"

    kept = respace.space_timesteps(steps, cfg["timestep_respacing"])
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Diffusion(
        betas=respace.respace_betas(alphas_cumprod, kept),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=bool(cfg["rescale_timesteps"]),
        timestep_map=np.asarray(kept),
        original_num_steps=steps,
    )


__all__ = ["CONFIG_DEFAULTS", "Diffusion", "create_diffusion"]
