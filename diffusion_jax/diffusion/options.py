"""`SamplerOptions`: the one home of a sampler's settings (kind, eta, steps, clipping, ...).

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
from collections.abc import Callable
from typing import Any

import jax


def ddim_respacing(respacing):
    """DDIM's respacing rule: a bare step count N means the paper's `ddimN`."""
    # The paper's DDIM rows (`--timestep_respacing ddim25`) keep every (T/N)-th step,
    # which differs from the section spacing a bare N means for ancestral sampling.
    return f"ddim{int(respacing)}" if str(respacing).strip().isdigit() else respacing


@dataclasses.dataclass(frozen=True)
class SamplerKind:
    """One sampler: its loop, what the loop needs and how `config.sampling` configures it.

    Attributes:
      name: the loop kind (`SamplerOptions.kind`).
      loop: the traced loop, `loop(diffusion, options, model_fn, cond, x_init,
        sample_rngs)` -> {'sample': ...} (and the intermediates when
        `options.keep_intermediates`); sample_rngs are [B] keys or None.
      uses_eta: takes DDIM's eta (others must have eta=0).
      noisy: draws step noise whatever eta is (ancestral).
      respacing: `sampling.timestep_respacing` -> the sampling diffusion's respacing.
      steps: `sampling.timestep_respacing` -> `SamplerOptions.steps`; None = the kind
        takes no steps (it runs every timestep of its respaced diffusion).
      methods: the `config.sampling.method` names that select it (() = none).
      check: `check(diffusion, options)` on the host before the loop runs, or None.
      inverts: runs x_0 -> x_T (an inversion, not a sampler: `sample_loop` refuses it).
    """

    name: str
    loop: Callable
    uses_eta: bool = False
    noisy: bool = False
    respacing: Callable[[Any], Any] = lambda respacing: respacing
    steps: Callable[[Any], int | None] | None = None
    methods: tuple[str, ...] = ()
    check: Callable | None = None
    inverts: bool = False


# The registry: kind name -> entry. `samplers` and `dpm_solver` register theirs.
SAMPLERS: dict[str, SamplerKind] = {}


def register_sampler(kind: SamplerKind) -> SamplerKind:
    """Adds (or replaces) a sampler kind; the sampling engine and configs then take it."""
    SAMPLERS[kind.name] = kind
    return kind


def _method_kind(method: str) -> SamplerKind | None:
    return next((k for k in SAMPLERS.values() if method in k.methods), None)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How a sampling loop runs.

    Attributes:
      kind: 'ancestral' (Algorithm 1), 'ddim' (Algorithm 2 when guided),
        'ddim_reverse' (DDIM inversion x_0 -> x_T) or 'dpm_solver++' (DPM-Solver++ 2M,
        multistep data prediction; deterministic given x_T).
      eta: DDIM's eta (0 = deterministic given x_T, 1 = the ancestral variance);
        must be 0 for 'ancestral' and 'ddim_reverse'. Traced: changing it does not
        recompile.
      clip_denoised: clip x_0 predictions to [-1, 1].
      keep_intermediates: also return every step's x_{t-1} and x_0 prediction.
      progress: show a host-side progress bar (steps/s).
      steps: 'dpm_solver++' only: model evaluations, at that many integer timesteps of
        the diffusion evenly spaced in log-SNR (see `dpm_solver`); None = every
        timestep.
    """

    kind: str = "ancestral"
    eta: Any = 0.0
    clip_denoised: bool = True
    keep_intermediates: bool = False
    progress: bool = False
    steps: int | None = None

    def __post_init__(self):
        if self.kind not in SAMPLERS:
            raise ValueError(
                f"sampler kind: unknown value {self.kind!r}; expected one of {tuple(SAMPLERS)}"
            )
        if isinstance(self.eta, numbers.Real):  # concrete (not traced inside a program)
            if float(self.eta) < 0.0:
                raise ValueError(f"eta must be >= 0, got {self.eta}")
            if not SAMPLERS[self.kind].uses_eta and float(self.eta) != 0.0:
                raise ValueError(f"eta applies to DDIM only; {self.kind} needs eta=0.0")
        for name in ("clip_denoised", "keep_intermediates", "progress"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.steps is not None:
            if SAMPLERS[self.kind].steps is None:
                raise ValueError(
                    f"steps applies to dpm_solver++ only; {self.kind} runs every timestep of "
                    "its (respaced) diffusion: set timestep_respacing instead"
                )
            if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 2:
                raise ValueError(f"dpm_solver++ steps must be an int >= 2, got {self.steps!r}")
            object.__setattr__(self, "steps", int(self.steps))

    @property
    def stochastic(self) -> bool:
        """Whether the loop draws step noise (needs keys beyond x_T)."""
        kind = SAMPLERS[self.kind]
        if kind.noisy or not kind.uses_eta:
            return kind.noisy
        try:
            return float(self.eta) != 0.0
        except (TypeError, jax.errors.ConcretizationTypeError):
            return True  # a traced eta: assume noise is needed

    @classmethod
    def from_config(cls, sampling_config: Any, **overrides) -> SamplerOptions:
        """Options from `config.sampling` (method, eta, clip_denoised).

        DPM-Solver++ takes its steps from `sampling.timestep_respacing` (an int such as
        20; '' or 0 = every timestep), chosen by the solver over the training schedule,
        which it must then run on (see `sampling_respacing` in the sampling job).
        `overrides` are fields to set instead (e.g. progress=True).

        Raises:
          ValueError: naming sampling.method for a method without a loop here.
        """
        get = sampling_config.get
        method = str(get("method", "ancestral")).lower()
        kind = _method_kind(method)
        if kind is None:
            methods = tuple(m for k in SAMPLERS.values() for m in k.methods)
            raise ValueError(
                f"sampling.method: unknown value {method!r}; expected one of {methods}"
            )
        values = dict(
            kind=kind.name,
            eta=float(get("eta", 0.0)) if kind.uses_eta else 0.0,
            clip_denoised=bool(get("clip_denoised", True)),
            steps=kind.steps and kind.steps(get("timestep_respacing", "")),
        )
        values.update(overrides)
        return cls(**values)


def dpm_solver_steps(timestep_respacing) -> int | None:
    """DPM-Solver++'s steps from `sampling.timestep_respacing` (None = every timestep).

    Raises:
      ValueError: naming sampling.timestep_respacing when it is not one step count.
    """
    spec = timestep_respacing
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "0")) or spec == 0:
        return None
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    if isinstance(spec, bool) or not isinstance(spec, numbers.Integral):
        raise ValueError(
            f"sampling.timestep_respacing={timestep_respacing!r}: with "
            "sampling.method='dpm_solver++' it is the number of solver steps, an int such "
            "as 20"
        )
    return int(spec)


jax.tree_util.register_dataclass(
    SamplerOptions,
    data_fields=["eta"],
    meta_fields=["kind", "clip_denoised", "keep_intermediates", "progress", "steps"],
)


def sampling_respacing(sampling_config: Any) -> Any:
    """The sampling diffusion's `timestep_respacing` for `config.sampling` (its kind's rule)."""
    method = str(sampling_config.get("method", "ancestral")).lower()
    kind = _method_kind(method) or SAMPLERS["ancestral"]
    return kind.respacing(sampling_config.get("timestep_respacing", ""))


__all__ = [
    "SAMPLERS",
    "SamplerKind",
    "SamplerOptions",
    "ddim_respacing",
    "dpm_solver_steps",
    "register_sampler",
    "sampling_respacing",
]
