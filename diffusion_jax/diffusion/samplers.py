"""Ancestral and DDIM sampling: single steps and whole loops as one compiled scan.

Randomness: `rng` is split once into (x_T key, loop key); the step at timestep t
draws its noise from `fold_in(loop key, t)`, so a sample depends only on the key,
not on how the loop is run.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import jit_cache
from diffusion_jax.diffusion.gaussian import GaussianDiffusion, ModelFn, compute_dtype
from diffusion_jax.diffusion.progress import HostProgress


def _nonzero_mask(t, x):
    # No noise is added on the last step (t == 0): it returns the mean.
    return (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def _step_noise(rng, noise, x):
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise must have x's shape {x.shape}, got {noise.shape}")
        return noise.astype(x.dtype)
    if rng is None:
        raise ValueError("a stochastic step needs rng (a jax.random.key) or noise")
    return jax.random.normal(rng, x.shape, x.dtype)


def p_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x,
    t,
    rng=None,
    *,
    noise=None,
    clip_denoised: bool = True,
    denoised_fn: Callable | None = None,
    cond_fn: Callable | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jnp.ndarray]:
    """One ancestral step x_t -> x_{t-1}, optionally classifier-guided (Algorithm 1).

    Args:
      diffusion: the process.
      model_fn: pure `model_fn(x, t_model, **model_kwargs)`.
      x: [B, H, W, C] x_t.
      t: int [B] timesteps.
      rng: key for the step noise (unused when noise is given).
      noise: fixed standard normal noise like x.
      clip_denoised: clip the x_0 prediction to [-1, 1].
      denoised_fn: applied to the x_0 prediction before clipping.
      cond_fn: `cond_fn(x, t_model, **model_kwargs)` -> s * grad_x log p(y | x_t).
      model_kwargs: extra model (and cond_fn) inputs.

    Returns:
      dict with 'sample' (x_{t-1}), 'pred_xstart', 'mean', 'log_variance'.
    """
    out = diffusion.p_mean_variance(
        model_fn,
        x,
        t,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        model_kwargs=model_kwargs,
    )
    if cond_fn is not None:
        out["mean"] = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs)
    eps = _step_noise(rng, noise, out["mean"])
    sample = out["mean"] + _nonzero_mask(t, x) * jnp.exp(0.5 * out["log_variance"]) * eps
    return {
        "sample": sample,
        "pred_xstart": out["pred_xstart"],
        "mean": out["mean"],
        "log_variance": out["log_variance"],
    }


def ddim_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x,
    t,
    rng=None,
    *,
    noise=None,
    clip_denoised: bool = True,
    denoised_fn: Callable | None = None,
    cond_fn: Callable | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    eta=0.0,
) -> dict[str, jnp.ndarray]:
    """One DDIM step x_t -> x_{t-1} (DDIM eq. 12), optionally guided (Algorithm 2).

    Args:
      diffusion: the process.
      model_fn: pure `model_fn(x, t_model, **model_kwargs)`.
      x: [B, H, W, C] x_t.
      t: int [B] timesteps.
      rng: key for the step noise; unused when eta == 0 or noise is given.
      noise: fixed standard normal noise like x.
      clip_denoised: clip the x_0 prediction to [-1, 1].
      denoised_fn: applied to the x_0 prediction before clipping.
      cond_fn: `cond_fn(x, t_model, **model_kwargs)` -> s * grad_x log p(y | x_t).
      model_kwargs: extra model (and cond_fn) inputs.
      eta: 0 is deterministic DDIM, 1 matches the ancestral variance.

    Returns:
      dict with 'sample' (x_{t-1}) and 'pred_xstart' (the unguided x_0 prediction).
    """
    out_orig = diffusion.p_mean_variance(
        model_fn,
        x,
        t,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        model_kwargs=model_kwargs,
    )
    out = (
        out_orig
        if cond_fn is None
        else diffusion.condition_score(cond_fn, out_orig, x, t, model_kwargs)
    )
    # Re-derive eps: the model may predict x_0 or x_{t-1} instead.
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar = diffusion._extract("alphas_cumprod", t, x)
    alpha_bar_prev = diffusion._extract("alphas_cumprod_prev", t, x)
    eta = jnp.asarray(eta, alpha_bar.dtype)
    sigma = (
        eta
        * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    )
    mean_pred = (
        out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
        + jnp.sqrt(1.0 - alpha_bar_prev - jnp.square(sigma)) * eps
    )
    if noise is None and rng is None:
        sample = mean_pred  # deterministic path: only valid for eta == 0 (checked by loops)
    else:
        sample = mean_pred + _nonzero_mask(t, x) * sigma * _step_noise(rng, noise, x)
    return {"sample": sample, "pred_xstart": out_orig["pred_xstart"]}


def ddim_reverse_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x,
    t,
    *,
    clip_denoised: bool = True,
    denoised_fn: Callable | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    eta=0.0,
) -> dict[str, jnp.ndarray]:
    """One step of the reversed DDIM ODE, x_t -> x_{t+1} (deterministic inversion).

    Args:
      diffusion: the process.
      model_fn: pure `model_fn(x, t_model, **model_kwargs)`.
      x: [B, H, W, C] x_t.
      t: int [B] timesteps.
      clip_denoised: clip the x_0 prediction to [-1, 1].
      denoised_fn: applied to the x_0 prediction before clipping.
      model_kwargs: extra model inputs.
      eta: must be 0: only the deterministic path can be reversed.

    Returns:
      dict with 'sample' (x_{t+1}) and 'pred_xstart'.
    """
    if eta != 0.0:
        raise ValueError(f"eta must be 0.0 for the reverse DDIM ODE (deterministic), got {eta}")
    out = diffusion.p_mean_variance(
        model_fn,
        x,
        t,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        model_kwargs=model_kwargs,
    )
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar_next = diffusion._extract("alphas_cumprod_next", t, x)
    sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1.0 - alpha_bar_next) * eps
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


# --- Whole loops. ---------------------------------------------------------------------


def _loop_program(
    diffusion, kind, fn_key, options, reporter, fn_arrays, x_init, loop_rng, eta, model_kwargs
):
    """The traced loop: lax.scan over every timestep in sampling order."""
    model_fn, cond_fn, denoised_fn = jit_cache.merge_callables(fn_key, fn_arrays)
    clip_denoised, keep_intermediates = options
    num_steps = diffusion.num_timesteps
    batch = x_init.shape[0]
    common = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    def body(x, step):
        t_value = step if kind == "ddim_reverse" else num_steps - 1 - step
        t = jnp.full((batch,), t_value, jnp.int32)
        step_rng = None if loop_rng is None else jax.random.fold_in(loop_rng, t_value)
        if kind == "ancestral":
            out = p_sample(diffusion, model_fn, x, t, step_rng, cond_fn=cond_fn, **common)
        elif kind == "ddim":
            out = ddim_sample(
                diffusion, model_fn, x, t, step_rng, cond_fn=cond_fn, eta=eta, **common
            )
        else:
            out = ddim_reverse_sample(diffusion, model_fn, x, t, **common)
        if reporter is not None:
            reporter.tick(step)
        stacked = (out["sample"], out["pred_xstart"]) if keep_intermediates else None
        return out["sample"], stacked

    final, stacked = jax.lax.scan(body, x_init, jnp.arange(num_steps))
    if keep_intermediates:
        return {"sample": final, "samples": stacked[0], "pred_xstarts": stacked[1]}
    return {"sample": final}


def run_loop(
    diffusion: GaussianDiffusion,
    cache: jit_cache.LoopCache,
    kind: str,
    model_fn: ModelFn,
    x_init,
    loop_rng,
    *,
    clip_denoised: bool,
    denoised_fn,
    cond_fn,
    model_kwargs,
    eta,
    progress: bool,
    keep_intermediates: bool,
) -> dict[str, jnp.ndarray]:
    """Runs (compiling on first use) one of the loops: 'ancestral', 'ddim', 'ddim_reverse'.

    Args:
      diffusion: the process.
      cache: where compiled loops are memoised.
      kind: 'ancestral', 'ddim' or 'ddim_reverse'.
      model_fn: pure `model_fn(x, t_model, **model_kwargs)`.
      x_init: [B, H, W, C] starting point (x_T, or x_0 for the reverse loop).
      loop_rng: key for step noise, or None for a deterministic loop.
      clip_denoised: clip x_0 predictions.
      denoised_fn: applied to x_0 predictions before clipping.
      cond_fn: guidance gradient function or None.
      model_kwargs: extra model inputs (traced).
      eta: DDIM eta (traced: changing it does not recompile).
      progress: host-side progress bar.
      keep_intermediates: also return every x_{t-1} and x_0 prediction, stacked.

    Returns:
      dict with 'sample' [B, H, W, C]; with keep_intermediates also 'samples' and
      'pred_xstarts', [T, B, H, W, C] in loop order.
    """
    model_kwargs = dict(model_kwargs or {})
    zero_t = jnp.zeros((x_init.shape[0],), jnp.int32)
    diffusion.check_batch(x_init, zero_t, model_kwargs, x_name="noise")
    fn_key, fn_arrays = jit_cache.split_callables((model_fn, cond_fn, denoised_fn))
    options = (bool(clip_denoised), bool(keep_intermediates))
    key = (kind, fn_key, options, bool(progress), loop_rng is None)

    def build():
        reporter = HostProgress(kind) if progress else None
        program = jax.jit(
            functools.partial(_loop_program, diffusion, kind, fn_key, options, reporter)
        )
        return program, reporter

    program, reporter = cache.get(key, build)
    if reporter is not None:
        reporter.start(diffusion.num_timesteps)
    try:
        eta = jnp.asarray(eta, compute_dtype(x_init.dtype))
        result = program(fn_arrays, x_init, loop_rng, eta, model_kwargs)
        if reporter is not None:
            result = jax.block_until_ready(result)
    finally:
        if reporter is not None:
            reporter.close()
    return result
