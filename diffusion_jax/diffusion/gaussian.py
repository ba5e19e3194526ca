"""The Gaussian diffusion process: schedule tables and the q / p distributions.

`GaussianDiffusion` holds float64 numpy tables built once at construction; every
method is a pure function of arrays (jit-, grad- and vmap-compatible). Arrays are
NHWC, timesteps `t` are int arrays [B] of indices into this process (after
respacing), and `model_fn(x, t_model, **model_kwargs)` is called with the ORIGINAL
timestep indices (`model_timesteps`), as the paper code's respaced diffusion does.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODEL_MEAN_TYPES = ("epsilon", "start_x", "previous_x")
MODEL_VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")

ModelFn = Callable[..., jnp.ndarray]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    normalised = value.lower() if isinstance(value, str) else value
    if normalised not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {choices}")
    return normalised


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the diffusion math runs in for inputs of `dtype`.

    float64 stays float64 (parity tests); float32 and narrower (bf16 activations)
    compute in float32, because coefficients such as sqrt(1/alpha_bar - 1) span five
    orders of magnitude.
    """
    return jnp.promote_types(dtype, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process.

    A value: equal settings (betas, parameterisation, timestep map, ...) make equal
    objects with equal hashes (arrays compared by their bytes), so a diffusion can be
    a static argument of jitted functions and two equal ones share compiled programs.

    Attributes:
      betas: float64 [T] betas of this process (already respaced).
      model_mean_type: what the model predicts: 'epsilon', 'start_x' or 'previous_x'.
      model_var_type: 'fixed_small', 'fixed_large', 'learned' (log variance) or
        'learned_range' (interpolation between the two fixed ones).
      loss_type: 'mse', 'rescaled_mse', 'kl' or 'rescaled_kl'.
      rescale_timesteps: pass t * 1000 / original_num_steps (float) to the model.
      timestep_map: int [T] original index of each step; None = identity.
      original_num_steps: steps of the process the model was trained on; None = T.
    """

    betas: np.ndarray
    model_mean_type: str = "epsilon"
    model_var_type: str = "fixed_large"
    loss_type: str = "mse"
    rescale_timesteps: bool = False
    timestep_map: np.ndarray | None = None
    original_num_steps: int | None = None

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(
                f"betas must be 1-D with at least 2 steps, got shape {betas.shape}; a "
                "respacing that keeps a single step cannot define a posterior"
            )
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must all lie in (0, 1]")
        num_steps = betas.shape[0]
        timestep_map = (
            np.arange(num_steps) if self.timestep_map is None else np.asarray(self.timestep_map)
        )
        if timestep_map.shape != (num_steps,):
            raise ValueError(
                f"timestep_map must have shape ({num_steps},), got {timestep_map.shape}"
            )
        original = num_steps if self.original_num_steps is None else int(self.original_num_steps)
        set_ = object.__setattr__  # frozen dataclass: fill derived fields once
        set_(self, "betas", betas)
        for name, choices in (
            ("model_mean_type", MODEL_MEAN_TYPES),
            ("model_var_type", MODEL_VAR_TYPES),
            ("loss_type", LOSS_TYPES),
        ):
            set_(self, name, _check_choice(name, getattr(self, name), choices))
        set_(self, "timestep_map", timestep_map.astype(np.int32))
        set_(self, "original_num_steps", original)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t=0, so its log is clipped to the t=1 value.
        posterior_log_variance_clipped = np.log(
            np.append(posterior_variance[1], posterior_variance[1:])
        )
        # 'fixed_large' uses beta_t, except at t=0 where the posterior variance gives a
        # better decoder likelihood.
        large_variance = np.append(posterior_variance[1], betas[1:])
        tables = {
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": np.append(ac[1:], 0.0),
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
            "fixed_large_variance": large_variance,
            "fixed_large_log_variance": np.log(large_variance),
        }
        set_(self, "tables", tables)
        value = (
            self.betas.tobytes(),
            self.model_mean_type,
            self.model_var_type,
            self.loss_type,
            bool(self.rescale_timesteps),
            self.timestep_map.tobytes(),
            self.original_num_steps,
        )
        set_(self, "_value", value)
        set_(self, "_hash", hash(value))

    def __eq__(self, other) -> bool:
        return self is other or (type(other) is type(self) and other._value == self._value)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_timesteps={self.num_timesteps} of "
            f"{self.original_num_steps}, model_mean_type={self.model_mean_type!r}, "
            f"model_var_type={self.model_var_type!r}, loss_type={self.loss_type!r}, "
            f"rescale_timesteps={self.rescale_timesteps})"
        )

    # --- Helpers. -------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        """T, the number of steps of this (respaced) process."""
        return int(self.betas.shape[0])

    def _extract(self, name: str, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
        """table[t] as [B, 1, ..., 1] in the compute dtype of x."""
        values = jnp.asarray(self.tables[name], dtype=compute_dtype(x.dtype))[t]  # [B]
        return values.reshape(values.shape + (1,) * (x.ndim - 1))

    def check_batch(
        self, x: jnp.ndarray, t: jnp.ndarray, model_kwargs=None, *, x_name="x", kwargs_name=None
    ):
        """Checks that x, t (int [B]) and model_kwargs['y'] describe the same batch.

        The range 0 <= t < num_timesteps is checked only when t is concrete; under
        jit (t a tracer) out-of-range values cannot be seen here and would index the
        schedule tables clamped, so jitted callers must pass valid timesteps. Error
        messages call the arguments `x_name` and `kwargs_name`.
        """
        if x.ndim < 2:
            raise ValueError(f"{x_name} must be batched [B, ...], got shape {x.shape}")
        batch = x.shape[0]
        t_shape = tuple(np.shape(t))
        if t_shape != (batch,):
            raise ValueError(
                f"t must have shape ({batch},) to match {x_name} of shape {x.shape}, got {t_shape}"
            )
        if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
            raise ValueError(
                f"t must hold integer timestep indices, got dtype {jnp.result_type(t)}"
            )
        try:
            t_values = np.asarray(t)
        except jax.errors.TracerArrayConversionError:
            t_values = None  # traced: only the shape and dtype can be checked
        if (
            t_values is not None
            and t_values.size
            and (t_values.min() < 0 or t_values.max() >= self.num_timesteps)
        ):
            raise ValueError(
                f"t must hold timestep indices in [0, {self.num_timesteps}) of this process "
                f"(num_timesteps={self.num_timesteps}, after respacing), got values in "
                f"[{t_values.min()}, {t_values.max()}]"
            )
        for key, value in (model_kwargs or {}).items():
            shape = np.shape(value)
            if key == "y" and (len(shape) == 0 or shape[0] != batch):
                raise ValueError(
                    f"{kwargs_name or 'model_kwargs'}['y'] must have a leading batch axis of "
                    f"{batch} to match {x_name} of shape {x.shape}, got shape {shape}"
                )

    def model_timesteps(self, t: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
        """The timesteps the model (and cond_fn) sees for this process's indices t.

        Original-process indices (int32), or with rescale_timesteps their values scaled
        to [0, 1000) as `dtype`.
        """
        mapped = jnp.asarray(self.timestep_map)[t]
        if self.rescale_timesteps:
            return mapped.astype(dtype) * (1000.0 / self.original_num_steps)
        return mapped

    def call_model(self, model_fn: ModelFn, x, t, model_kwargs=None) -> jnp.ndarray:
        """model_fn(x, t mapped to the original timesteps) in x's compute dtype.

        Raises:
          ValueError: if the output shape ([B, H, W, C], or [B, H, W, 2C] with learned
            variance) does not fit model_var_type.
        """
        out = model_fn(x, self.model_timesteps(t, compute_dtype(x.dtype)), **(model_kwargs or {}))
        channels = x.shape[-1]
        learned = self.model_var_type in ("learned", "learned_range")
        expected = (*x.shape[:-1], 2 * channels if learned else channels)
        if tuple(out.shape) != expected:
            raise ValueError(
                f"model_fn output must have shape {expected} (model_var_type="
                f"{self.model_var_type!r}{', [mean | variance] channels' if learned else ''}), "
                f"got {tuple(out.shape)}"
            )
        return out.astype(compute_dtype(x.dtype))

    # --- The forward process q. -----------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """The forward marginal q(x_t | x_0): (mean, variance, log_variance) like x_start."""
        self.check_batch(x_start, t, x_name="x_start")
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = jnp.broadcast_to(
            1.0 - self._extract("alphas_cumprod", t, x_start), x_start.shape
        )
        log_variance = jnp.broadcast_to(
            self._extract("log_one_minus_alphas_cumprod", t, x_start), x_start.shape
        )
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise):
        """Draws x_t ~ q(x_t | x_0) with the given standard normal noise (like x_start)."""
        self.check_batch(x_start, t, x_name="x_start")
        if noise.shape != x_start.shape:
            raise ValueError(f"noise must have x_start's shape {x_start.shape}, got {noise.shape}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """The forward-process posterior q(x_{t-1} | x_t, x_0), x_start possibly predicted.

        Returns (mean, variance, log_variance_clipped), each like x_t; the log variance
        at t=0 (where the variance is 0) takes the t=1 value.
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {x_start.shape} and x_t {x_t.shape} must share a shape")
        self.check_batch(x_t, t, x_name="x_t")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = jnp.broadcast_to(self._extract("posterior_variance", t, x_t), x_t.shape)
        log_variance = jnp.broadcast_to(
            self._extract("posterior_log_variance_clipped", t, x_t), x_t.shape
        )
        return mean, variance, log_variance

    # --- Conversions between parameterisations. -------------------------------------

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 implied by x_t and the noise eps."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        """x_0 implied by x_t and the posterior mean x_{t-1} (inverts the posterior)."""
        coef1 = self._extract("posterior_mean_coef1", t, x_t)
        coef2 = self._extract("posterior_mean_coef2", t, x_t)
        return (xprev - coef2 * x_t) / coef1

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """The noise eps implied by x_t and a prediction of x_0."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    # --- The reverse process p. -----------------------------------------------------

    def p_mean_variance_from_output(
        self, model_output, x, t, *, clip_denoised: bool = True, denoised_fn: Callable | None = None
    ) -> dict[str, jnp.ndarray]:
        """p(x_{t-1} | x_t) from a model output already computed.

        Args:
          model_output: [B, H, W, C] or, with learned variance, [B, H, W, 2C]
            (mean-parameter channels first, then variance values).
          x: [B, H, W, C] x_t.
          t: int [B] timesteps.
          clip_denoised: clip the x_0 prediction to [-1, 1].
          denoised_fn: applied to the x_0 prediction before clipping.

        Returns:
          dict with 'mean', 'variance', 'log_variance', 'pred_xstart', each like x.
        """
        channels = x.shape[-1]
        if self.model_var_type in ("learned", "learned_range"):
            model_output, var_values = model_output[..., :channels], model_output[..., channels:]
            if self.model_var_type == "learned":
                log_variance = var_values
            else:
                # var_values in [-1, 1] interpolate (in log space) between the
                # posterior variance and beta_t.
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                frac = (var_values + 1.0) / 2.0
                log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = jnp.exp(log_variance)
        else:
            if self.model_var_type == "fixed_small":
                var_name, log_name = "posterior_variance", "posterior_log_variance_clipped"
            else:
                var_name, log_name = "fixed_large_variance", "fixed_large_log_variance"
            variance = jnp.broadcast_to(self._extract(var_name, t, x), x.shape)
            log_variance = jnp.broadcast_to(self._extract(log_name, t, x), x.shape)

        def process_xstart(pred):
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return jnp.clip(pred, -1.0, 1.0) if clip_denoised else pred

        if self.model_mean_type == "previous_x":
            pred_xstart = process_xstart(self.predict_xstart_from_xprev(x, t, model_output))
            mean = model_output
        else:
            if self.model_mean_type == "start_x":
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, model_output))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(
            mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart
        )

    def p_mean_variance(
        self,
        model_fn: ModelFn,
        x,
        t,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, jnp.ndarray]:
        """Applies the pure `model_fn(x, t_model, **model_kwargs)` to get p(x_{t-1} | x_t).

        Returns as `p_mean_variance_from_output`.
        """
        self.check_batch(x, t, model_kwargs)
        output = self.call_model(model_fn, x, t, model_kwargs)
        return self.p_mean_variance_from_output(
            output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )

    # --- Classifier guidance (the paper's Algorithms 1 and 2). ---------------------

    def _guidance_gradient(self, cond_fn, x, t, model_kwargs):
        # cond_fn sees the same (mapped, maybe rescaled) timesteps as the model.
        t_model = self.model_timesteps(t, compute_dtype(x.dtype))
        gradient = cond_fn(x, t_model, **(model_kwargs or {}))
        if gradient.shape != x.shape:
            raise ValueError(
                f"cond_fn must return a gradient shaped like x {x.shape}, got {gradient.shape}"
            )
        return gradient.astype(compute_dtype(x.dtype))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Algorithm 1: the mean shifted by Sigma * s * grad log p(y | x_t).

        `cond_fn(x, t_model, **model_kwargs)` returns the scaled gradient like x; the
        samplers pass their cond_kwargs as model_kwargs.
        """
        gradient = self._guidance_gradient(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"] + p_mean_var["variance"] * gradient

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Algorithm 2: eps <- eps - sqrt(1 - alpha_bar_t) * s * grad log p(y | x_t).

        Returns a copy of p_mean_var with 'pred_xstart' and 'mean' recomputed from the
        guided eps (cond_fn as `condition_mean`'s).
        """
        alpha_bar = self._extract("alphas_cumprod", t, x)
        gradient = self._guidance_gradient(cond_fn, x, t, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - jnp.sqrt(1.0 - alpha_bar) * gradient
        out = dict(p_mean_var)
        out["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out


__all__ = [
    "LOSS_TYPES",
    "MODEL_MEAN_TYPES",
    "MODEL_VAR_TYPES",
    "GaussianDiffusion",
    "compute_dtype",
]
