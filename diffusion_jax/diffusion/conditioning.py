"""`Conditioning`: what a sample is conditioned on, one value passed whole to the engine.

The loops, the single steps and DPM-Solver++ take one `Conditioning` instead of
`model_kwargs`, `cond_fn`, `cond_kwargs`, `denoised_fn` and the classifier-free scale
threaded as loose keywords through every layer. It is a pytree: its arrays (labels,
low-resolution inputs, the guidance classifier's parameters and scales) are traced
inputs of the compiled loop, its functions and the null label static parts
(`callables.split_callables`), so new labels or scales do not recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from diffusion_jax.diffusion.guidance import classifier_free_model_fn


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Labels, upsampler inputs and guidance of a batch.

    Attributes:
      model_kwargs: the model's extra inputs, e.g. {'y': labels [B], 'low_res': ...}.
      cond_fn: classifier guidance `cond_fn(x, t_model, **guidance_kwargs)` -> s *
        grad_x log p(y | x_t) (e.g. from `classifier_cond_fn`), or None.
      cond_kwargs: cond_fn's inputs; None = model_kwargs. Pass {'y': labels} to guide
        an unconditional model (which must not receive y).
      denoised_fn: applied to x_0 predictions before clipping, or None.
      cfg_scale: classifier-free guidance scale s (eps_u + s (eps_c - eps_u)), or None
        for none; needs null_label.
      null_label: the model's null class for classifier-free guidance.
    """

    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cond_fn: Callable | None = None
    cond_kwargs: Mapping[str, Any] | None = None
    denoised_fn: Callable | None = None
    cfg_scale: Any = None
    null_label: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs or {}))
        if self.cond_kwargs is not None:
            object.__setattr__(self, "cond_kwargs", dict(self.cond_kwargs))
        if (self.cfg_scale is None) != (self.null_label is None):
            raise ValueError("classifier-free guidance needs both cfg_scale and null_label")

    @property
    def guidance_kwargs(self) -> dict[str, Any]:
        """cond_fn's inputs (cond_kwargs, else model_kwargs)."""
        return self.model_kwargs if self.cond_kwargs is None else self.cond_kwargs

    def model(self, model_fn: Callable) -> Callable:
        """model_fn as the sampler calls it (classifier-free guided when asked for)."""
        if self.cfg_scale is None:
            return model_fn
        return classifier_free_model_fn(model_fn, self.cfg_scale, self.null_label)

    def check_batch(self, diffusion, x) -> None:
        """Raises a ValueError naming an input whose leading axis is not x's batch."""
        zero_t = jax.numpy.zeros((x.shape[0],), jax.numpy.int32)
        diffusion.check_batch(x, zero_t, self.model_kwargs, x_name="noise")
        kw = dict(x_name="noise", kwargs_name="cond_kwargs")
        diffusion.check_batch(x, zero_t, self.guidance_kwargs, **kw)


jax.tree_util.register_dataclass(
    Conditioning, data_fields=[f.name for f in dataclasses.fields(Conditioning)], meta_fields=[]
)

__all__ = ["Conditioning"]
