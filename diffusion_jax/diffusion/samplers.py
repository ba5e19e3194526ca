"""Ancestral and DDIM sampling: single steps, their loops and the one loop program.

Each sampler kind is one `options.SamplerKind` entry owning its loop; this module
registers ancestral, DDIM and DDIM inversion (`dpm_solver` registers DPM-Solver++) and
`run_loop` dispatches through the registry.

Randomness is per sample (see `keys`): in a loop, the step at timestep t draws sample
i's noise as `normal(fold_in(key_i, t), x.shape[1:])` and x_T (when not given) is
`normal(fold_in(key_i, T), x.shape[1:])`, T = num_timesteps.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import callables, keys, progress
from diffusion_jax.diffusion.conditioning import Conditioning
from diffusion_jax.diffusion.gaussian import GaussianDiffusion, ModelFn, compute_dtype
from diffusion_jax.diffusion.options import (
    SAMPLERS,
    SamplerKind,
    SamplerOptions,
    ddim_respacing,
    register_sampler,
)

_NONE = Conditioning()


def _is_zero(eta) -> bool:
    try:
        return float(eta) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False  # traced: cannot be known to be 0


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
    return keys.per_sample_normal(keys.per_sample_keys(rng, x.shape[0]), x.shape[1:], x.dtype)


def _mean_variance(diffusion, model_fn, x, t, clip_denoised, cond):
    kw = dict(denoised_fn=cond.denoised_fn, model_kwargs=cond.model_kwargs)
    return diffusion.p_mean_variance(cond.model(model_fn), x, t, clip_denoised=clip_denoised, **kw)


def p_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x,
    t,
    rng=None,
    *,
    noise=None,
    clip_denoised: bool = True,
    cond: Conditioning = _NONE,
) -> dict[str, jnp.ndarray]:
    """One ancestral step x_t -> x_{t-1}, optionally classifier-guided (Algorithm 1).

    Args:
      rng: one key (sample i's noise is `normal(fold_in(rng, i), x.shape[1:])`) or
        [B] keys (sample i's noise is `normal(rng[i], x.shape[1:])`); unused when
        noise (fixed standard normal noise like x) is given.
      cond: labels, model inputs and guidance (`Conditioning`).

    Returns:
      dict with 'sample' (x_{t-1}), 'pred_xstart', 'mean', 'log_variance'.
    """
    out = _mean_variance(diffusion, model_fn, x, t, clip_denoised, cond)
    if cond.cond_fn is not None:
        out["mean"] = diffusion.condition_mean(cond.cond_fn, out, x, t, cond.guidance_kwargs)
    eps = _step_noise(rng, noise, out["mean"])
    sample = out["mean"] + _nonzero_mask(t, x) * jnp.exp(0.5 * out["log_variance"]) * eps
    return {"sample": sample, **{k: out[k] for k in ("pred_xstart", "mean", "log_variance")}}


def ddim_sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x,
    t,
    rng=None,
    *,
    noise=None,
    clip_denoised: bool = True,
    cond: Conditioning = _NONE,
    eta=0.0,
) -> dict[str, jnp.ndarray]:
    """One DDIM step x_t -> x_{t-1} (DDIM eq. 12), optionally guided (Algorithm 2).

    Args as `p_sample` (rng only drawing the step noise: unused when eta == 0 or
    noise is given, required otherwise), plus eta: 0 is deterministic DDIM, 1 matches
    the ancestral variance.

    Returns:
      dict with 'sample' (x_{t-1}) and 'pred_xstart' (the unguided x_0 prediction).

    Raises:
      ValueError: eta is not (the concrete) 0 and neither rng nor noise is given: the
        step noise cannot be drawn (as `p_sample`).
    """
    if noise is None and rng is None and not _is_zero(eta):
        raise ValueError(
            f"a stochastic DDIM step (eta={eta}) needs rng (a jax.random.key) or noise; "
            "only eta=0.0 is deterministic"
        )
    out_orig = _mean_variance(diffusion, model_fn, x, t, clip_denoised, cond)
    out = out_orig
    if cond.cond_fn is not None:
        out = diffusion.condition_score(cond.cond_fn, out_orig, x, t, cond.guidance_kwargs)
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
        sample = mean_pred  # eta == 0 (checked above): deterministic
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
    cond: Conditioning = _NONE,
    eta=0.0,
) -> dict[str, jnp.ndarray]:
    """One step of the reversed DDIM ODE, x_t -> x_{t+1} (deterministic inversion).

    Args as `p_sample` (cond's guidance does not apply); eta must be 0: only the
    deterministic path can be reversed.

    Returns:
      dict with 'sample' (x_{t+1}) and 'pred_xstart'.
    """
    if eta != 0.0:
        raise ValueError(f"eta must be 0.0 for the reverse DDIM ODE (deterministic), got {eta}")
    out = _mean_variance(diffusion, model_fn, x, t, clip_denoised, cond)
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar_next = diffusion._extract("alphas_cumprod_next", t, x)
    sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1.0 - alpha_bar_next) * eps
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


# --- Whole loops. ---------------------------------------------------------------------


def scan_loop(step_fn, *, reverse: bool = False):
    """A `SamplerKind.loop` scanning `step_fn` over every timestep of the diffusion.

    Args:
      step_fn: `step_fn(diffusion, options, model_fn, x, t, step_rngs, cond)` -> dict
        with 'sample' and 'pred_xstart' (step_rngs: [B] keys or None).
      reverse: run t = 0 .. T-1 (inversion) instead of T-1 .. 0.
    """

    def loop(diffusion, options, model_fn, cond, x_init, sample_rngs):
        num_steps = diffusion.num_timesteps
        batch = x_init.shape[0]

        def body(x, step):
            t_value = step if reverse else num_steps - 1 - step
            t = jnp.full((batch,), t_value, jnp.int32)
            # [B] keys: sample i's noise at t comes from fold_in(key_i, t) alone.
            step_rngs = None if sample_rngs is None else keys.fold_in_each(sample_rngs, t_value)
            out = step_fn(diffusion, options, model_fn, x, t, step_rngs, cond)
            if options.progress:
                progress.tick(options.kind, num_steps, step)
            stacked = (out["sample"], out["pred_xstart"]) if options.keep_intermediates else None
            return out["sample"], stacked

        final, stacked = jax.lax.scan(body, x_init, jnp.arange(num_steps))
        return finish(options, final, stacked)

    return loop


def finish(options: SamplerOptions, final, stacked) -> dict[str, jnp.ndarray]:
    """A loop's result: the sample, and with keep_intermediates the stacked steps."""
    if options.keep_intermediates:
        return {"sample": final, "samples": stacked[0], "pred_xstarts": stacked[1]}
    return {"sample": final}


def _ancestral_step(diffusion, options, model_fn, x, t, step_rngs, cond):
    return p_sample(
        diffusion, model_fn, x, t, step_rngs, clip_denoised=options.clip_denoised, cond=cond
    )


def _ddim_step(diffusion, options, model_fn, x, t, step_rngs, cond):
    # No keys: the deterministic path (eta == 0 was checked on the host).
    eta = 0.0 if step_rngs is None else options.eta
    clip = options.clip_denoised
    return ddim_sample(diffusion, model_fn, x, t, step_rngs, clip_denoised=clip, cond=cond, eta=eta)


def _ddim_reverse_step(diffusion, options, model_fn, x, t, step_rngs, cond):
    del step_rngs  # deterministic
    return ddim_reverse_sample(
        diffusion, model_fn, x, t, clip_denoised=options.clip_denoised, cond=cond
    )


register_sampler(
    SamplerKind(
        "ancestral", loop=scan_loop(_ancestral_step), noisy=True, methods=("ancestral", "ddpm")
    )
)
register_sampler(
    SamplerKind(
        "ddim", scan_loop(_ddim_step), uses_eta=True, respacing=ddim_respacing, methods=("ddim",)
    )
)
register_sampler(
    SamplerKind("ddim_reverse", loop=scan_loop(_ddim_reverse_step, reverse=True), inverts=True)
)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _loop_program(diffusion, options, fn_key, fn_arrays, x_init, sample_rngs):
    """The traced loop of `options.kind` (its registry entry's `loop`).

    `diffusion` and `fn_key` are static (hashable values) and `options` is a pytree
    whose static fields (the kind among them) are part of its structure, so jax.jit's
    own cache holds one program per (diffusion settings, callables, options, shapes).
    """
    model_fn, cond = callables.merge_callables(fn_key, fn_arrays)
    return SAMPLERS[options.kind].loop(diffusion, options, model_fn, cond, x_init, sample_rngs)


def run_loop(
    diffusion: GaussianDiffusion,
    options: SamplerOptions,
    model_fn: ModelFn,
    x_init,
    sample_rngs,
    cond: Conditioning = _NONE,
) -> dict[str, jnp.ndarray]:
    """Runs (compiling on first use) the loop `options` describes.

    Callable inside an outer `jax.jit` too (the sharded sampling jobs do).

    Args:
      x_init: [B, H, W, C] starting point (x_T, or x_0 for the reverse loop).
      sample_rngs: [B] keys, one per sample (step t of sample i draws from
        fold_in(sample_rngs[i], t)), or None for a deterministic loop.

    Returns:
      dict with 'sample' [B, H, W, C]; with keep_intermediates also 'samples' and
      'pred_xstarts', [T, B, H, W, C] in loop order.

    Raises:
      ValueError: a stochastic loop without keys, or mismatched batch inputs.
    """
    cond.check_batch(diffusion, x_init)
    if not options.stochastic:
        sample_rngs = None  # deterministic: one program regardless of the key
    elif sample_rngs is None:
        raise ValueError(
            f"{options.kind} sampling with eta={options.eta} needs rng (a jax.random.key)"
        )
    else:
        sample_rngs = keys.per_sample_keys(sample_rngs, x_init.shape[0])
    fn_key, fn_arrays = callables.split_callables((model_fn, cond))
    kind = SAMPLERS[options.kind]
    if kind.uses_eta:
        eta = jnp.asarray(options.eta, compute_dtype(x_init.dtype))
        options = dataclasses.replace(options, eta=eta)
    if kind.check is not None:
        kind.check(diffusion, options)
    return _loop_program(diffusion, options, fn_key, fn_arrays, x_init, sample_rngs)
