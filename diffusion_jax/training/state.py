"""The train state: parameters, optimiser state, EMA copies, timestep-sampler state.

Everything a run needs to continue exactly is in `TrainState` (a pytree of arrays) or in
the data positions saved beside it; the step is pure, so state + batch + step decide
the next state.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from diffusion_jax.checkpoints.workdir import ema_key


@flax.struct.dataclass
class TrainState:
    """State of a diffusion or classifier run.

    Attributes:
      step: int32 [], updates attempted so far (the next step's index).
      params: the Flax params tree (float32).
      opt_state: the optax state.
      ema: {ema_key(rate): params tree} for every rate of `training.ema_rates`.
      sampler: the timestep sampler's state (loss history for 'loss-second-moment').
      nonfinite: int32 [2], (steps skipped for a non-finite loss or gradient in all,
        how many of the latest steps in a row).
      rng: uint32 key data of the run's base key (`jax.random.key_data`); step keys are
        `fold_in(base_key, step)`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema: dict[str, Any]
    sampler: Any
    nonfinite: jax.Array
    rng: jax.Array

    @property
    def base_key(self) -> jax.Array:
        """The run's typed base key."""
        return jax.random.wrap_key_data(self.rng)


def create_train_state(
    params: Any, optimizer: Any, ema_rates, sampler_state: Any, seed: int
) -> TrainState:
    """A fresh state at step 0 from initial parameters (traceable: use under jit).

    Args:
      params: initial parameters (random or a fine-tuning start).
      optimizer: the optax transformation.
      ema_rates: `training.ema_rates`; each EMA copy starts at `params`.
      sampler_state: the timestep sampler's initial state.
      seed: `config.seed`, the base key.

    Returns:
      The state.
    """
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema={ema_key(r): params for r in ema_rates},
        sampler=sampler_state,
        nonfinite=jnp.zeros((2,), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
