"""`create_diffusion`: the paper code's diffusion flags -> a `Diffusion` object."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import jit_cache, keys, objectives, respace, samplers, schedules
from diffusion_jax.diffusion.gaussian import GaussianDiffusion, ModelFn

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


def _as_key(rng, name="rng"):
    """Accepts typed keys (jax.random.key, any batch shape) and legacy uint32 keys."""
    if rng is None:
        return None
    if not isinstance(rng, jax.Array):
        raise ValueError(f"{name} must be a jax.random.key, got {type(rng).__name__}")
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def _single_key(rng, name="rng"):
    """A typed key of shape (), for draws that take one key for the whole batch."""
    rng = _as_key(rng, name)
    if rng is not None and rng.shape != ():
        raise ValueError(
            f"{name} must be one jax.random.key for the whole batch, got keys of shape {rng.shape}"
        )
    return rng


class Diffusion(GaussianDiffusion):
    """A Gaussian diffusion process with objectives and compiled samplers as methods.

    All of `GaussianDiffusion`'s pure array functions (q_sample, q_mean_variance,
    q_posterior_mean_variance, p_mean_variance, ...) plus training_losses, the single
    steps (p_sample, ddim_sample, ddim_reverse_sample) and the compiled loops. Each
    loop compiles once per (model_fn, cond_fn, denoised_fn, options) and input shape.

    Randomness is per sample: the loops take one key (sample i uses fold_in(rng, i))
    or [B] per-sample keys, so a sample never depends on the rest of its batch or on
    the device count (see `p_sample_loop`). Guidance labels reach cond_fn through
    `cond_kwargs` (default: model_kwargs), so an unconditional model can be guided.
    """

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "_cache", jit_cache.LoopCache())

    # --- Objectives. ----------------------------------------------------------------

    def training_losses(
        self, model_fn: ModelFn, x_start, t, *, rng=None, noise=None, model_kwargs=None
    ) -> dict[str, jnp.ndarray]:
        """Per-example losses {'loss', 'mse'[, 'vb']}; see objectives.training_losses.

        `rng` is one key for the whole batch's noise (not per-sample keys, see there).
        """
        return objectives.training_losses(
            self,
            model_fn,
            x_start,
            t,
            rng=_single_key(rng),
            noise=noise,
            model_kwargs=model_kwargs,
        )

    def vb_terms_bpd(
        self, model_fn: ModelFn, x_start, x_t, t, *, clip_denoised=True, model_kwargs=None
    ) -> dict[str, jnp.ndarray]:
        """One VLB term in bits/dim; see objectives.vb_terms_bpd."""
        return objectives.vb_terms_bpd(
            self,
            model_fn,
            x_start,
            x_t,
            t,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
        )

    def prior_bpd(self, x_start) -> jnp.ndarray:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]."""
        return objectives.prior_bpd(self, x_start)

    def calc_bpd_loop(
        self,
        model_fn: ModelFn,
        x_start,
        rng=None,
        *,
        noise=None,
        clip_denoised=True,
        model_kwargs=None,
        progress=False,
    ):
        """The whole VLB in bits/dim; see objectives.calc_bpd_loop."""
        return objectives.calc_bpd_loop(
            self,
            self._cache,
            model_fn,
            x_start,
            _as_key(rng),
            noise=noise,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            progress=progress,
        )

    # --- Single steps. --------------------------------------------------------------

    def p_sample(
        self,
        model_fn: ModelFn,
        x,
        t,
        rng=None,
        *,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        cond_kwargs=None,
    ):
        """One ancestral step; see samplers.p_sample (rng: one key or [B] keys)."""
        return samplers.p_sample(
            self,
            model_fn,
            x,
            t,
            _as_key(rng),
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            cond_kwargs=cond_kwargs,
        )

    def ddim_sample(
        self,
        model_fn: ModelFn,
        x,
        t,
        rng=None,
        *,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        cond_kwargs=None,
        eta=0.0,
    ):
        """One DDIM step; see samplers.ddim_sample (rng: one key or [B] keys)."""
        return samplers.ddim_sample(
            self,
            model_fn,
            x,
            t,
            _as_key(rng),
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            cond_kwargs=cond_kwargs,
            eta=eta,
        )

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
        return samplers.ddim_reverse_sample(
            self,
            model_fn,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    # --- Loops. ---------------------------------------------------------------------

    def _sample(self, kind, model_fn, shape, rng, noise, eta, keep, **options):
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be [B, H, W, C], got {shape}")
        sample_rngs = keys.per_sample_keys(_as_key(rng), shape[0])  # [B] or None
        if noise is None:
            if sample_rngs is None:
                raise ValueError(f"{kind} sampling needs rng (a jax.random.key) or noise (x_T)")
            # x_T is "the noise of timestep T": steps use fold_in(key_i, t) for t < T.
            x_T_rngs = keys.fold_in_each(sample_rngs, self.num_timesteps)
            noise = keys.per_sample_normal(x_T_rngs, shape[1:], jnp.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise (x_T) must have shape {shape}, got {tuple(noise.shape)}")
        needs_rng = kind == "ancestral" or (kind == "ddim" and eta != 0.0)
        if needs_rng and sample_rngs is None:
            raise ValueError(f"{kind} sampling with eta={eta} needs rng (a jax.random.key)")
        if not needs_rng:
            sample_rngs = None  # deterministic DDIM: one program regardless of the key
        return samplers.run_loop(
            self,
            self._cache,
            kind,
            model_fn,
            noise,
            sample_rngs,
            eta=eta,
            keep_intermediates=keep,
            **options,
        )

    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape,
        rng,
        *,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        cond_kwargs=None,
        progress=False,
    ):
        """Ancestral sampling from x_T ~ N(0, I) to x_0, as one compiled scan.

        Args:
          model_fn: pure `model_fn(x, t_model, **model_kwargs)`, hashable (a module
            function or `jax.tree_util.Partial(apply, variables)`).
          shape: sample shape [B, H, W, C].
          rng: one jax.random.key, sample i then using key_i = fold_in(rng, i), or a
            batch of B keys key_i (shape [B]), e.g. `fold_in(job_key, global_index)`
            for a sharded, resumable job. Sample i depends only on key_i (and its
            x_T and labels), not on the rest of the batch or the device count: the
            step at timestep t draws its noise as `normal(fold_in(key_i, t),
            shape[1:])`, and x_T, unless given, is `normal(fold_in(key_i, T),
            shape[1:])` with T = num_timesteps.
          noise: fixed x_T of `shape` (then rng only drives the step noise).
          clip_denoised: clip x_0 predictions to [-1, 1].
          denoised_fn: applied to x_0 predictions before clipping.
          cond_fn: `cond_fn(x, t_model, **cond_kwargs)` -> s * grad log p(y | x_t),
            e.g. from `classifier_cond_fn`.
          model_kwargs: extra model inputs, e.g. {'y': labels [B]} for a
            class-conditional model.
          cond_kwargs: cond_fn's inputs; None (default) = model_kwargs. To guide an
            unconditional model (which refuses y) with a classifier, pass
            `model_kwargs=None, cond_kwargs={'y': labels}`.
          progress: show a host-side progress bar (steps/s).

        Returns:
          [B, H, W, C] samples.
        """
        return self._sample(
            "ancestral",
            model_fn,
            shape,
            rng,
            noise,
            0.0,
            False,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            cond_kwargs=cond_kwargs,
            progress=progress,
        )["sample"]

    def p_sample_loop_progressive(
        self,
        model_fn: ModelFn,
        shape,
        rng,
        *,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        cond_kwargs=None,
        progress=False,
    ):
        """`p_sample_loop` also returning every step's output.

        Returns:
          dict: 'sample' [B, H, W, C]; 'samples' and 'pred_xstarts' [T, B, H, W, C],
          row i being the step at timestep T-1-i.
        """
        return self._sample(
            "ancestral",
            model_fn,
            shape,
            rng,
            noise,
            0.0,
            True,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            cond_kwargs=cond_kwargs,
            progress=progress,
        )

    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        shape,
        rng,
        *,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        cond_kwargs=None,
        eta=0.0,
        progress=False,
    ):
        """DDIM sampling (guided by Algorithm 2 with cond_fn), as one compiled scan.

        Args as `p_sample_loop` (rng: one key or [B] per-sample keys; cond_kwargs:
        cond_fn's inputs, default model_kwargs), plus eta (0 = deterministic given
        x_T; rng may then be None when noise is given, and otherwise only draws x_T).

        Returns:
          [B, H, W, C] samples.
        """
        return self._sample(
            "ddim",
            model_fn,
            shape,
            rng,
            noise,
            eta,
            False,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            cond_kwargs=cond_kwargs,
            progress=progress,
        )["sample"]

    def ddim_sample_loop_progressive(
        self,
        model_fn: ModelFn,
        shape,
        rng,
        *,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        cond_kwargs=None,
        eta=0.0,
        progress=False,
    ):
        """`ddim_sample_loop` also returning every step's output (see the ancestral one)."""
        return self._sample(
            "ddim",
            model_fn,
            shape,
            rng,
            noise,
            eta,
            True,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            cond_kwargs=cond_kwargs,
            progress=progress,
        )

    def ddim_reverse_sample_loop(
        self,
        model_fn: ModelFn,
        x_start,
        *,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        progress=False,
        keep_intermediates=False,
    ):
        """DDIM inversion: runs the reverse ODE from x_0 up to x_T, one compiled scan.

        Args:
          model_fn: pure `model_fn(x, t_model, **model_kwargs)`.
          x_start: [B, H, W, C] images in [-1, 1].
          clip_denoised: clip x_0 predictions.
          denoised_fn: applied to x_0 predictions before clipping.
          model_kwargs: extra model inputs.
          progress: host-side progress bar.
          keep_intermediates: return a dict with 'samples'/'pred_xstarts' [T, ...]
            (row i is the step from timestep i) instead of just x_T.

        Returns:
          x_T [B, H, W, C] (feed it to ddim_sample_loop as noise), or the dict.
        """
        out = samplers.run_loop(
            self,
            self._cache,
            "ddim_reverse",
            model_fn,
            x_start,
            None,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=None,
            model_kwargs=model_kwargs,
            eta=0.0,
            progress=progress,
            keep_intermediates=keep_intermediates,
        )
        return out if keep_intermediates else out["sample"]


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

    Returns:
      A `Diffusion` over the kept timesteps (all of them when timestep_respacing is
      '', None, 0 or '0'), calling the model with the original timestep indices.

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
