"""`SamplerOptions`: the one home of a sampler's settings (kind, eta, clipping, ...).

The loops, the single-step samplers and the sampling jobs take one `SamplerOptions`
instead of the same keywords threaded through every layer; adding a sampler or an
option touches this module and the loop body only.

It is a frozen dataclass and a pytree: `eta` is its one array leaf (traced, so a new
eta does not recompile), the other fields are static metadata (hashable, part of the
compiled program's cache key).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax

# What each loop kind is: (draws step noise, description for progress bars).
KINDS = ("ancestral", "ddim", "ddim_reverse")
# `config.sampling.method` names -> loop kinds.
METHODS = {"ancestral": "ancestral", "ddpm": "ancestral", "ddim": "ddim"}


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How a sampling loop runs.

    Attributes:
      kind: 'ancestral' (Algorithm 1), 'ddim' (Algorithm 2 when guided) or
        'ddim_reverse' (DDIM inversion x_0 -> x_T).
      eta: DDIM's eta (0 = deterministic given x_T, 1 = the ancestral variance);
        must be 0 for 'ancestral' and 'ddim_reverse'. Traced: changing it does not
        recompile.
      clip_denoised: clip x_0 predictions to [-1, 1].
      keep_intermediates: also return every step's x_{t-1} and x_0 prediction.
      progress: show a host-side progress bar (steps/s).
    """

    kind: str = "ancestral"
    eta: Any = 0.0
    clip_denoised: bool = True
    keep_intermediates: bool = False
    progress: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sampler kind: unknown value {self.kind!r}; expected one of {KINDS}")
        if isinstance(self.eta, numbers.Real):  # concrete (not traced inside a program)
            if float(self.eta) < 0.0:
                raise ValueError(f"eta must be >= 0, got {self.eta}")
            if self.kind != "ddim" and float(self.eta) != 0.0:
                raise ValueError(f"eta applies to DDIM only; {self.kind} needs eta=0.0")
        for name in ("clip_denoised", "keep_intermediates", "progress"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @property
    def stochastic(self) -> bool:
        """Whether the loop draws step noise (needs keys beyond x_T)."""
        if self.kind == "ancestral":
            return True
        if self.kind == "ddim_reverse":
            return False
        try:
            return float(self.eta) != 0.0
        except (TypeError, jax.errors.ConcretizationTypeError):
            return True  # a traced eta: assume noise is needed

    @classmethod
    def from_config(cls, sampling_config: Any, **overrides) -> SamplerOptions:
        """Options from `config.sampling` (method, eta, clip_denoised).

        Args:
          sampling_config: a ConfigDict or mapping with `method` ('ancestral' | 'ddim'),
            `eta` and `clip_denoised`.
          **overrides: fields to set instead (e.g. progress=True).

        Raises:
          ValueError: naming sampling.method for a method without a loop here.
        """
        get = sampling_config.get
        method = str(get("method", "ancestral")).lower()
        if method not in METHODS:
            raise ValueError(
                f"sampling.method: unknown value {method!r}; expected one of {tuple(METHODS)}"
            )
        kind = METHODS[method]
        values = dict(
            kind=kind,
            eta=float(get("eta", 0.0)) if kind == "ddim" else 0.0,
            clip_denoised=bool(get("clip_denoised", True)),
        )
        values.update(overrides)
        return cls(**values)


jax.tree_util.register_dataclass(
    SamplerOptions,
    data_fields=["eta"],
    meta_fields=["kind", "clip_denoised", "keep_intermediates", "progress"],
)

__all__ = ["KINDS", "METHODS", "SamplerOptions"]
