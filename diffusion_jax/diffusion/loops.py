"""The compiled sampling loops of `Diffusion` (ancestral, DDIM, DDIM inversion, DPM-Solver++).

A mixin: `Diffusion` combines it with `GaussianDiffusion`'s math. Every loop is
`sample_loop` with a `SamplerOptions` (the one home of the sampler's settings); the
keyword loops (`p_sample_loop`, `ddim_sample_loop`, ...) keep the paper code's
signatures and build the options. Each loop is one compiled `lax.scan` (see
`samplers.run_loop`) cached by `jax.jit` itself: one program per (diffusion settings,
callables, options) and input shape, shared by equal `Diffusion`s.
"""

import jax.numpy as jnp

from diffusion_jax.diffusion import keys, samplers
from diffusion_jax.diffusion.conditioning import Conditioning
from diffusion_jax.diffusion.gaussian import ModelFn
from diffusion_jax.diffusion.options import SAMPLERS, SamplerOptions


class SamplingLoops:
    """Sampling loops over a diffusion with `num_timesteps`."""

    def initial_noise(self, sample_rngs, sample_shape, dtype=jnp.float32):
        """x_T of each sample: `normal(fold_in(key_i, T), sample_shape)`, [B, *sample_shape].

        x_T is "the noise of timestep T": the steps use fold_in(key_i, t) for t < T.
        """
        return keys.per_sample_normal(
            keys.fold_in_each(sample_rngs, self.num_timesteps), tuple(sample_shape), dtype
        )

    def sample_loop(
        self, model_fn: ModelFn, shape, rng, options: SamplerOptions, *, noise=None, cond=None
    ):
        """Runs the sampling loop `options` describes from x_T to x_0.

        Args as `p_sample_loop`'s (rng may be None only for a deterministic loop given
        noise), with the settings in `options` and labels, model inputs and guidance in
        `cond` (a `Conditioning`; None = none).

        Returns:
          dict with 'sample' [B, H, W, C] (and the intermediates if asked for).
        """
        if SAMPLERS[options.kind].inverts:
            raise ValueError(
                f"sample_loop runs x_T -> x_0; {options.kind!r} inverts (x_0 -> x_T): use "
                "ddim_reverse_sample_loop"
            )
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be [B, H, W, C], got {shape}")
        sample_rngs = keys.per_sample_keys(keys.as_key(rng), shape[0])  # [B] or None
        if noise is None:
            if sample_rngs is None:
                raise ValueError(
                    f"{options.kind} sampling needs rng (a jax.random.key) or noise (x_T)"
                )
            noise = self.initial_noise(sample_rngs, shape[1:])
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise (x_T) must have shape {shape}, got {tuple(noise.shape)}")
        cond = Conditioning() if cond is None else cond
        return samplers.run_loop(self, options, model_fn, noise, sample_rngs, cond)

    def _keyword_loop(self, kind, model_fn, shape, rng, *, noise=None, clip_denoised=True,
                      denoised_fn=None, cond_fn=None, model_kwargs=None, cond_kwargs=None,
                      keep_intermediates=False, **options):  # fmt: skip
        """`sample_loop` for the keyword loops (the paper code's keywords; `options`: progress,
        eta, steps): the samples, or the dict if asked for."""
        cond = Conditioning(model_kwargs, cond_fn, cond_kwargs, denoised_fn)
        keep, clip = keep_intermediates, clip_denoised
        options = SamplerOptions(kind, clip_denoised=clip, keep_intermediates=keep, **options)
        out = self.sample_loop(model_fn, shape, rng, options, noise=noise, cond=cond)
        return out if keep else out["sample"]

    def p_sample_loop(self, model_fn: ModelFn, shape, rng, **kwargs):
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
          keep_intermediates: return a dict with every step's output (see
            `p_sample_loop_progressive`) instead of the samples.

        Returns:
          [B, H, W, C] samples (or the dict).
        """
        return self._keyword_loop("ancestral", model_fn, shape, rng, **kwargs)

    def p_sample_loop_progressive(self, model_fn: ModelFn, shape, rng, **kwargs):
        """`p_sample_loop` (same keywords) also returning every step's output.

        Returns:
          dict: 'sample' [B, H, W, C]; 'samples' and 'pred_xstarts' [T, B, H, W, C],
          row i being the step at timestep T-1-i.
        """
        return self.p_sample_loop(model_fn, shape, rng, keep_intermediates=True, **kwargs)

    def ddim_sample_loop(self, model_fn: ModelFn, shape, rng, *, eta=0.0, **kwargs):
        """DDIM sampling (guided by Algorithm 2 with cond_fn), as one compiled scan.

        Args as `p_sample_loop` (rng: one key or [B] per-sample keys; cond_kwargs:
        cond_fn's inputs, default model_kwargs), plus eta (0 = deterministic given
        x_T; rng may then be None when noise is given, and otherwise only draws x_T)
        and keep_intermediates.

        Returns:
          [B, H, W, C] samples (or the dict of `ddim_sample_loop_progressive`).
        """
        return self._keyword_loop("ddim", model_fn, shape, rng, eta=eta, **kwargs)

    def ddim_sample_loop_progressive(self, model_fn: ModelFn, shape, rng, **kwargs):
        """`ddim_sample_loop` also returning every step's output (see the ancestral one)."""
        return self.ddim_sample_loop(model_fn, shape, rng, keep_intermediates=True, **kwargs)

    def dpm_solver_sample_loop(self, model_fn: ModelFn, shape, rng, *, steps=20, **kwargs):
        """DPM-Solver++ (2M) from x_T to x_0 in `steps` model evaluations, one compiled scan.

        The model is evaluated at `steps` of this diffusion's timesteps, evenly spaced
        with both ends kept (as timestep_respacing=steps keeps them), i.e. always at
        integer timesteps of the training schedule; see `dpm_solver` for the update
        and the final step (the data prediction at timestep 0). Deterministic given
        x_T. Learned-variance models contribute their mean channels only.

        Args as `p_sample_loop` (rng only draws x_T, and may be None given noise;
        cond_fn shifts eps by -sqrt(1 - alpha_bar_t) * gradient, as DDIM's Algorithm 2),
        plus steps: model evaluations, in [2, num_timesteps]; None = every timestep of
        this (respaced) diffusion. With keep_intermediates, 'samples'/'pred_xstarts'
        are [steps, ...] (row i: after the model evaluation i).
        """
        return self._keyword_loop("dpm_solver++", model_fn, shape, rng, steps=steps, **kwargs)

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

        Args as `p_sample_loop`'s, x_start being [B, H, W, C] images in [-1, 1]; with
        keep_intermediates row i of 'samples'/'pred_xstarts' is the step from timestep i.

        Returns:
          x_T [B, H, W, C] (feed it to ddim_sample_loop as noise), or the dict.
        """
        keep, clip = keep_intermediates, clip_denoised
        options = SamplerOptions(
            "ddim_reverse", clip_denoised=clip, keep_intermediates=keep, progress=progress
        )
        cond = Conditioning(model_kwargs, denoised_fn=denoised_fn)
        out = samplers.run_loop(self, options, model_fn, x_start, None, cond)
        return out if keep else out["sample"]
