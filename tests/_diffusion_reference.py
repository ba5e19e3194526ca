"""Helpers for the diffusion parity tests: a stand-in model written identically for
JAX (NHWC) and torch (NCHW), and builders for our diffusion and the paper code's."""

import contextlib

import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion as ours

MEAN_TYPES = {"epsilon": "EPSILON", "start_x": "START_X", "previous_x": "PREVIOUS_X"}
VAR_TYPES = {
    "fixed_small": "FIXED_SMALL",
    "fixed_large": "FIXED_LARGE",
    "learned": "LEARNED",
    "learned_range": "LEARNED_RANGE",
}
LOSS_TYPES = {
    "mse": "MSE",
    "rescaled_mse": "RESCALED_MSE",
    "kl": "KL",
    "rescaled_kl": "RESCALED_KL",
}


def to_nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def to_nhwc(x):
    return np.moveaxis(x.detach().numpy(), 1, -1)


class StandInModel:
    """out = a*x + tanh(w*x + v*t/1000 + b + 0.05*y), per channel; with learned sigma a
    second block of C channels tanh(u*x + c*t/1000) (in (-1, 1), as learned_range
    expects). Hashable by identity, so our loops cache it."""

    def __init__(self, channels: int, learned_sigma: bool, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.channels = channels
        self.learned_sigma = learned_sigma
        self.a, self.w, self.v, self.b, self.u, self.c = (
            rng.uniform(-1.0, 1.0, size=channels) for _ in range(6)
        )

    def _forward(self, xp, x, t, y, reshape):
        tf = xp_float(xp, t, x) / 1000.0
        tf = tf.reshape((-1,) + (1,) * (x.ndim - 1))
        p = {k: reshape(getattr(self, k), x) for k in "awvbuc"}
        shift = 0.0 if y is None else 0.05 * xp_float(xp, y, x).reshape(tf.shape)
        mean = p["a"] * x + xp.tanh(p["w"] * x + p["v"] * tf + p["b"] + shift)
        if not self.learned_sigma:
            return mean, None
        return mean, xp.tanh(p["u"] * x + p["c"] * tf)

    def __call__(self, x, t, y=None):  # JAX, NHWC
        mean, var = self._forward(jnp, x, t, y, lambda a, x: jnp.asarray(a, x.dtype))
        return mean if var is None else jnp.concatenate([mean, var], axis=-1)

    def torch(self, x, t, y=None):  # torch, NCHW
        import torch

        def reshape(a, x):
            return torch.as_tensor(a, dtype=x.dtype).view(1, -1, 1, 1)

        mean, var = self._forward(torch, x, t, y, reshape)
        return mean if var is None else torch.cat([mean, var], dim=1)


def xp_float(xp, a, like):
    if xp is jnp:
        return jnp.asarray(a).astype(like.dtype)
    return a.to(like.dtype)


def gaussian_cond_fn(x, t, y=None, scale=3.0):
    """Closed-form guidance: grad_x of -scale/2 * ||x - mu(y, t)||^2 (JAX, any layout)."""
    mu = 0.1 * jnp.asarray(y).astype(x.dtype) - jnp.asarray(t).astype(x.dtype) / 2000.0
    return scale * (mu.reshape((-1,) + (1,) * (x.ndim - 1)) - x)


def gaussian_cond_fn_torch(x, t, y=None, scale=3.0):
    mu = 0.1 * y.to(x.dtype) - t.to(x.dtype) / 2000.0
    return scale * (mu.view(-1, 1, 1, 1) - x)


def make_pair(
    *,
    steps=40,
    schedule="linear",
    mean_type="epsilon",
    var_type="fixed_large",
    loss_type="mse",
    respacing="",
    rescale_timesteps=False,
):
    """(our Diffusion, the paper code's SpacedDiffusion) for the same settings."""
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

    mine = ours.create_diffusion(
        steps=steps,
        noise_schedule=schedule,
        timestep_respacing=respacing,
        rescale_timesteps=rescale_timesteps,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
    )
    ref = SpacedDiffusion(
        use_timesteps=space_timesteps(steps, respacing or [steps]),
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=getattr(gd.ModelMeanType, MEAN_TYPES[mean_type]),
        model_var_type=getattr(gd.ModelVarType, VAR_TYPES[var_type]),
        loss_type=getattr(gd.LossType, LOSS_TYPES[loss_type]),
        rescale_timesteps=rescale_timesteps,
    )
    return mine, ref


@contextlib.contextmanager
def float64_reference():
    """Makes the paper code keep its float64 schedule tables in float64.

    Its table lookup casts every coefficient to float32 (`.float()`), which limits it
    to ~1e-7 relative accuracy; with this patch the float64 parity tests compare the
    math itself.
    """
    import torch
    from guided_diffusion import gaussian_diffusion as gd

    def extract64(arr, timesteps, broadcast_shape):
        res = torch.from_numpy(np.asarray(arr, dtype=np.float64))[timesteps]
        while res.ndim < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)

    original = gd._extract_into_tensor
    gd._extract_into_tensor = extract64
    try:
        yield
    finally:
        gd._extract_into_tensor = original


@contextlib.contextmanager
def scripted_randn_like(noises_nchw):
    """Makes torch.randn_like return the given tensors in order (the reference draws
    its step noise with it), so the reference follows our noise exactly."""
    import torch

    queue = list(noises_nchw)
    original = torch.randn_like

    def fake(like, *args, **kwargs):
        out = queue.pop(0)
        assert out.shape == like.shape, (out.shape, like.shape)
        return out.to(like.dtype)

    torch.randn_like = fake
    try:
        yield queue
    finally:
        torch.randn_like = original
