"""DPM-Solver++ (2M): multistep second-order solver of the probability-flow ODE.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2 (multistep, data prediction), on the discrete
training schedule: alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and
lambda_t = log(alpha_t / sigma_t) are read from the diffusion's own `alphas_cumprod`
at integer timesteps, and the model is only ever called there.

Timesteps: K = `steps` integer indices of the (respaced) diffusion, evenly spaced in
lambda (the paper's 'logSNR' grid) from the noisiest index down to index 0, each
rounded to the index of nearest lambda (`solver_timesteps`). Not evenly spaced in t:
the linear schedule's lambda climbs from about 1.7 to 4.6 over its last 50 of 1000
steps, so a t-uniform grid leaves one huge final lambda step over which the
second-order extrapolation overshoots (on Gaussian data its 20-step error was larger
than DDIM's); on the lambda grid the error falls at second order (tests). A respaced
diffusion maps its indices back to the ORIGINAL training timesteps (rescaled with
rescale_timesteps) in `call_model`, as every other loop does, so the model only sees
integer timesteps of its training schedule.

K model evaluations, at t_0 > ... > t_{K-1} = 0. Step i < K-1 moves x from t_i to
t_{i+1} (first order at i = 0, second order after, with the previous data
prediction); the final step returns the data prediction at timestep 0 itself (the
ODE is not integrated down to sigma = 0, where lambda is infinite), as DDIM's last
step does.

Every step is `x <- c_x * x + c_d * ((1 + w) D_i - w D_{i-1})` with per-step
coefficients precomputed on the host in float64 (c_x = sigma_next / sigma,
c_d = -alpha_next * expm1(-h), w = 1 / (2 r) with r = h_prev / h; the final step is
c_x = 0, c_d = 1, w = 0), so the loop is one `lax.scan` without branches.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import progress, samplers
from diffusion_jax.diffusion.conditioning import Conditioning
from diffusion_jax.diffusion.gaussian import GaussianDiffusion, compute_dtype
from diffusion_jax.diffusion.options import SamplerKind, dpm_solver_steps, register_sampler

KIND = "dpm_solver++"


def log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t), float64, for a table of alpha_bar values."""
    ab = np.asarray(alphas_cumprod, np.float64)
    return 0.5 * (np.log(ab) - np.log1p(-ab))


def solver_timesteps(alphas_cumprod: np.ndarray, steps: int | None) -> np.ndarray:
    """The diffusion indices the solver evaluates the model at, in sampling order.

    The K indices whose lambda is nearest to K values evenly spaced in lambda from the
    noisiest index T-1 to index 0 (both kept), made strictly decreasing where the
    rounding to integer timesteps would repeat one (near t = 0, where lambda changes
    fastest per step). `alphas_cumprod` is the (respaced) diffusion's [T] table and
    `steps` = K (None = all T).

    Returns:
      int [K] strictly decreasing indices, from T-1 down to 0.

    Raises:
      ValueError: naming steps when it is not in [2, T].
    """
    lam = log_snr(alphas_cumprod)
    num_timesteps = lam.shape[0]
    steps = num_timesteps if steps is None else int(steps)
    if not 2 <= steps <= num_timesteps:
        raise ValueError(
            f"dpm_solver++ steps={steps} must lie in [2, {num_timesteps}] (the diffusion's "
            "timesteps after respacing); lower steps or sample from a diffusion with more"
        )
    targets = np.linspace(lam[-1], lam[0], steps)
    t = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)  # [K], non-increasing
    t[0], t[-1] = num_timesteps - 1, 0
    for i in range(1, steps):  # distinct: at most one below the previous
        t[i] = min(t[i], t[i - 1] - 1)
    t = np.maximum(t, np.arange(steps)[::-1])  # room for the remaining steps, down to 0
    return t.astype(np.int32)


def solver_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict:
    """Per-step update coefficients (float64 [K] each): c_x, c_d and w (see module doc)."""
    ab = np.asarray(alphas_cumprod, np.float64)[timesteps]
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = log_snr(ab)
    k = len(timesteps)
    c_x, c_d, w = np.zeros(k), np.ones(k), np.zeros(k)  # the final step: x <- D
    h = lam[1:] - lam[:-1]  # [K-1] > 0: lambda grows towards the data
    c_x[:-1] = sigma[1:] / sigma[:-1]
    c_d[:-1] = -alpha[1:] * np.expm1(-h)
    w[1:-1] = 0.5 * h[1:] / h[:-1]  # 1 / (2 r), r = h_prev / h; the first step is order 1
    return {"c_x": c_x, "c_d": c_d, "w": w}


def data_prediction(diffusion: GaussianDiffusion, model_fn, x, t, *, clip_denoised=True, cond=None):
    """The (guided, thresholded) x_0 prediction at diffusion indices t.

    Learned-variance models contribute their mean channels only. Classifier guidance
    (`cond.cond_fn`) shifts eps by -sqrt(1 - alpha_bar_t) * grad (as DDIM's Algorithm
    2); `cond.denoised_fn` and clipping to [-1, 1] then act on the guided prediction.

    Returns:
      [B, H, W, C] x_0 prediction in the compute dtype of x.
    """
    cond = Conditioning() if cond is None else cond
    output = diffusion.call_model(cond.model(model_fn), x, t, cond.model_kwargs)
    channels = x.shape[-1]
    if diffusion.model_mean_type == "epsilon":
        eps = output[..., :channels]
        x0 = diffusion.predict_xstart_from_eps(x, t, eps)
    else:  # start_x / previous_x: the parameterisation's own x_0 prediction
        out = diffusion.p_mean_variance_from_output(output, x, t, clip_denoised=False)
        x0 = out["pred_xstart"]
        eps = diffusion.predict_eps_from_xstart(x, t, x0)
    if cond.cond_fn is not None:
        gradient = diffusion._guidance_gradient(cond.cond_fn, x, t, cond.guidance_kwargs)
        eps = eps - diffusion._extract("sqrt_one_minus_alphas_cumprod", t, x) * gradient
        x0 = diffusion.predict_xstart_from_eps(x, t, eps)
    if cond.denoised_fn is not None:
        x0 = cond.denoised_fn(x0)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0


def _loop(diffusion, options, model_fn, cond, x_init, sample_rngs):
    """The traced DPM-Solver++ loop (its `SamplerKind.loop`)."""
    del sample_rngs  # deterministic given x_T
    timesteps = solver_timesteps(diffusion.tables["alphas_cumprod"], options.steps)
    dtype = compute_dtype(x_init.dtype)
    coef = {
        k: jnp.asarray(v, dtype)
        for k, v in solver_coefficients(diffusion.tables["alphas_cumprod"], timesteps).items()
    }
    batch = x_init.shape[0]
    x_init = x_init.astype(dtype)

    def body(carry, xs):
        x, previous = carry
        step, t_value, c_x, c_d, w = xs
        t = jnp.full((batch,), t_value, jnp.int32)
        x0 = data_prediction(
            diffusion, model_fn, x, t, clip_denoised=options.clip_denoised, cond=cond
        )
        x_next = c_x * x + c_d * ((1.0 + w) * x0 - w * previous)
        if options.progress:
            progress.tick(options.kind, len(timesteps), step)
        stacked = (x_next, x0) if options.keep_intermediates else None
        return (x_next, x0), stacked

    xs = (jnp.arange(len(timesteps)), jnp.asarray(timesteps), coef["c_x"], coef["c_d"], coef["w"])
    (final, _), stacked = jax.lax.scan(body, (x_init, jnp.zeros_like(x_init)), xs)
    return samplers.finish(options, final, stacked)


def _check(diffusion, options):
    solver_timesteps(diffusion.tables["alphas_cumprod"], options.steps)


register_sampler(
    SamplerKind(
        KIND,
        loop=_loop,
        # DPM-Solver++ picks its steps over the whole training schedule itself.
        respacing=lambda _: "",
        steps=dpm_solver_steps,
        check=_check,
        methods=(KIND,),
    )
)


__all__ = ["KIND", "data_prediction", "log_snr", "solver_coefficients", "solver_timesteps"]
