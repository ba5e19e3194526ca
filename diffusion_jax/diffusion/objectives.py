"""Training objectives and likelihoods: L_simple, the VLB terms, bits/dim.

Functions take a `GaussianDiffusion` first; `Diffusion` (factory.py) exposes them as
methods.
"""

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import callables, keys, losses
from diffusion_jax.diffusion import progress as progress_lib
from diffusion_jax.diffusion.gaussian import GaussianDiffusion, ModelFn

_LOG2 = math.log(2.0)


def stop_gradient_mean(model_output: jnp.ndarray, channels: int) -> jnp.ndarray:
    """Blocks gradients through the mean channels of a [.., 2C] learned-variance output.

    The hybrid objective trains the variance with the VLB but lets only L_simple
    move the mean (Nichol & Dhariwal, section 3.1).
    """
    return jnp.concatenate(
        [jax.lax.stop_gradient(model_output[..., :channels]), model_output[..., channels:]], axis=-1
    )


def vb_terms_bpd_from_output(
    diffusion: GaussianDiffusion, model_output, x_start, x_t, t, *, clip_denoised: bool = True
) -> dict[str, jnp.ndarray]:
    """One term of the variational bound in bits per dimension, from the model output at
    (x_t, t), [B, H, W, C or 2C].

    Returns:
      dict: 'output' [B], the decoder NLL where t == 0 and
      KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) elsewhere; 'pred_xstart'.
    """
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    out = diffusion.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
    kl = losses.normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
    kl = losses.mean_flat(kl) / _LOG2
    nll = losses.discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    decoder_nll = -losses.mean_flat(nll) / _LOG2
    return {"output": jnp.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}


def vb_terms_bpd(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x_start,
    x_t,
    t,
    *,
    clip_denoised: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jnp.ndarray]:
    """`vb_terms_bpd_from_output` with the model applied at (x_t, t)."""
    diffusion.check_batch(x_t, t, model_kwargs, x_name="x_t")
    output = diffusion.call_model(model_fn, x_t, t, model_kwargs)
    return vb_terms_bpd_from_output(diffusion, output, x_start, x_t, t, clip_denoised=clip_denoised)


def training_losses(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x_start,
    t,
    *,
    rng=None,
    noise=None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jnp.ndarray]:
    """Per-example training loss at timesteps t.

    mse / rescaled_mse: L_simple (MSE to eps, x_0 or x_{t-1}); with learned variance
    plus the VLB term computed with gradients stopped through the mean (the hybrid
    objective), scaled by T/1000 for rescaled_mse. kl / rescaled_kl: the VLB term
    (times T for rescaled_kl).

    Args:
      t: int [B] timesteps of this process (range-checked when concrete).
      rng: one key for the whole batch's noise when `noise` is None. Unlike the
        samplers this takes no per-sample keys: a training step draws for a fixed
        global batch, and with jax's partitionable threefry (the default) the draw
        is already independent of how that batch is sharded over devices; t is an
        input, not drawn here.
      noise: fixed standard normal noise like x_start.

    Returns:
      dict of [B] arrays: 'loss', 'mse' and, with learned variance or a KL loss, 'vb'.
      As in the paper code, with mse losses 'vb' is the term added to 'mse' (already
      times T/1000 for rescaled_mse); with kl losses it is the VLB term in bits/dim and
      'loss' is vb (times T for rescaled_kl).
    """
    diffusion.check_batch(x_start, t, model_kwargs, x_name="x_start")
    rng = keys.single_key(rng)
    if noise is None:
        if rng is None:
            raise ValueError("training_losses needs rng (a jax.random.key) or noise")
        noise = jax.random.normal(rng, x_start.shape, x_start.dtype)
    x_t = diffusion.q_sample(x_start, t, noise)
    output = diffusion.call_model(model_fn, x_t, t, model_kwargs)
    channels = x_start.shape[-1]
    learned = diffusion.model_var_type in ("learned", "learned_range")
    num_steps = diffusion.num_timesteps
    terms = {}
    if diffusion.loss_type in ("kl", "rescaled_kl"):
        terms["vb"] = vb_terms_bpd_from_output(
            diffusion, output, x_start, x_t, t, clip_denoised=False
        )["output"]
        terms["loss"] = terms["vb"] * (num_steps if diffusion.loss_type == "rescaled_kl" else 1.0)
    elif learned:
        terms["vb"] = vb_terms_bpd_from_output(
            diffusion, stop_gradient_mean(output, channels), x_start, x_t, t, clip_denoised=False
        )["output"]
        if diffusion.loss_type == "rescaled_mse":
            # T/1000 keeps the VLB from swamping L_simple (Nichol & Dhariwal's lambda).
            terms["vb"] = terms["vb"] * (num_steps / 1000.0)
    mean_output = output[..., :channels]
    if diffusion.model_mean_type == "previous_x":
        target = diffusion.q_posterior_mean_variance(x_start, x_t, t)[0]
    elif diffusion.model_mean_type == "start_x":
        target = x_start
    else:
        target = noise
    terms["mse"] = losses.mean_flat(jnp.square(target.astype(mean_output.dtype) - mean_output))
    if diffusion.loss_type in ("mse", "rescaled_mse"):
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms


def prior_bpd(diffusion: GaussianDiffusion, x_start) -> jnp.ndarray:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]; constant in the model."""
    t = jnp.full((x_start.shape[0],), diffusion.num_timesteps - 1, jnp.int32)
    mean, _, log_variance = diffusion.q_mean_variance(x_start, t)
    return losses.mean_flat(losses.normal_kl(mean, log_variance, 0.0, 0.0)) / _LOG2


_BPD_BAR = "calc_bpd_loop"


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _bpd_program(
    diffusion, fn_key, clip_denoised, show_progress, fn_arrays, x_start, sample_rngs, noise, kwargs
):
    # diffusion, fn_key and the flags are static hashable values: jax.jit's cache holds
    # one program per (settings, model_fn, flags, shapes), shared by equal diffusions.
    model_fn = callables.merge_callables(fn_key, fn_arrays)[0]
    batch = x_start.shape[0]
    num_steps = diffusion.num_timesteps

    def body(_, step):
        t_value = num_steps - 1 - step  # the paper code walks t from T-1 down to 0
        t = jnp.full((batch,), t_value, jnp.int32)
        if noise is None:
            step_rngs = keys.fold_in_each(sample_rngs, t_value)  # [B]
            step_noise = keys.per_sample_normal(step_rngs, x_start.shape[1:], x_start.dtype)
        else:
            step_noise = noise[t_value]
        x_t = diffusion.q_sample(x_start, t, step_noise)
        out = vb_terms_bpd(
            diffusion, model_fn, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=kwargs
        )
        eps = diffusion.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
        if show_progress:
            progress_lib.tick(_BPD_BAR, num_steps, step)
        return None, (
            out["output"],
            losses.mean_flat(jnp.square(out["pred_xstart"] - x_start)),
            losses.mean_flat(jnp.square(eps - step_noise)),
        )

    _, (vb, xstart_mse, mse) = jax.lax.scan(body, None, jnp.arange(num_steps))  # each [T, B]
    prior = prior_bpd(diffusion, x_start)
    vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T  # [B, T]
    total = jnp.sum(vb, axis=1) + prior
    return {"total_bpd": total, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}


def calc_bpd_loop(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x_start,
    rng=None,
    *,
    noise=None,
    clip_denoised: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, jnp.ndarray]:
    """The full variational bound in bits/dim, as one compiled scan over all T steps.

    Args:
      rng: one key, image i then using key_i = fold_in(rng, i), or [B] keys key_i;
        image i's q_sample noise at timestep t is `normal(fold_in(key_i, t),
        x_start.shape[1:])`, so its bits/dim do not depend on the rest of the batch.
      noise: optional fixed noise [T, B, H, W, C]; noise[t] is used at timestep t.

    Returns:
      dict: 'total_bpd' [B] (prior + sum of VLB terms), 'prior_bpd' [B], and [B, T]
      arrays 'vb', 'xstart_mse', 'mse' whose column j is timestep T-1-j (the paper
      code's loop order).
    """
    model_kwargs = dict(model_kwargs or {})
    num_steps = diffusion.num_timesteps
    diffusion.check_batch(
        x_start, jnp.zeros((x_start.shape[0],), jnp.int32), model_kwargs, x_name="x_start"
    )
    if noise is None:
        if rng is None:
            raise ValueError("calc_bpd_loop needs rng (a jax.random.key) or noise")
        rng = keys.per_sample_keys(keys.as_key(rng), x_start.shape[0])
    elif tuple(noise.shape) != (num_steps, *x_start.shape):
        raise ValueError(
            f"noise must have shape {(num_steps, *x_start.shape)} ([T, *x_start.shape]), "
            f"got {tuple(noise.shape)}"
        )
    fn_key, fn_arrays = callables.split_callables((model_fn,))
    flags = bool(clip_denoised), bool(progress)
    return _bpd_program(diffusion, fn_key, *flags, fn_arrays, x_start, rng, noise, model_kwargs)
