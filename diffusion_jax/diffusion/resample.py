"""Timestep samplers for training (the paper code's resample.py), as pure JAX.

A sampler is a small frozen spec (hashable, compared by its fields, so it can be bound
into a jitted train step with `functools.partial`); everything that changes during
training lives in a `SamplerState` of arrays, part of the train state and its
checkpoints:

    sampler = create_schedule_sampler(config.training.schedule_sampler, diffusion.num_timesteps)
    sampler_state = sampler.init_state()                      # in the train state
    t, weights = sampler.sample(sampler_state, t_rng, batch)  # int32 [B], float32 [B]
    terms = diffusion.training_losses(model_fn, x, t, rng=noise_rng)
    loss = jnp.mean(terms["loss"] * weights)                  # importance-weighted
    sampler_state = sampler.update(sampler_state, t, terms["loss"])  # unweighted losses

* `UniformSampler` ('uniform'): t uniform over [0, T), every weight 1; `update` returns
  the state unchanged.
* `LossSecondMomentResampler` ('loss-second-moment', the paper's importance sampling of
  L_vlb): keeps the last `history_per_term` losses of every timestep; once every
  timestep has that many, t is drawn with p_t proportional to sqrt(E[L_t^2]), mixed with
  `uniform_prob` of the uniform distribution, and each loss weighted by 1 / (T p_t) so
  the objective's expectation is unchanged. Before that (warm-up) it samples like
  `UniformSampler`.

Both kinds use the same state structure (`history` float32 [T, history_per_term],
`counts` int32 [T]; the uniform sampler never writes to it), so the train state's
shape, its `jax.eval_shape` target and its checkpoints do not depend on the kind.

`update` takes the GLOBAL batch's timesteps and per-example losses in batch order (the
paper code all-gathers them rank by rank and then applies them one at a time): with
global-view arrays under jit that order is simply the batch order. It applies them in
that order exactly as the paper code does, repeated timesteps included, in a
`lax.scan`; a train step that skips a non-finite update should keep the old sampler
state as well, so a NaN never enters the history.
"""

import abc
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


@flax.struct.dataclass
class SamplerState:
    """What a timestep sampler learns during training (a pytree of arrays).

    Attributes:
      history: float32 [T, history_per_term], the most recent losses of each timestep,
        oldest first (row t holds `counts[t]` valid entries, the rest are zeros).
      counts: int32 [T], how many losses of each timestep have been recorded, at most
        history_per_term.
    """

    history: jax.Array
    counts: jax.Array


@dataclasses.dataclass(frozen=True)
class ScheduleSampler(abc.ABC):
    """A distribution over timesteps (the paper code's ScheduleSampler).

    Attributes:
      num_timesteps: T, the number of timesteps of the diffusion being trained.
      history_per_term: losses kept per timestep (the state's second axis).
    """

    num_timesteps: int
    history_per_term: int = 10

    def init_state(self) -> SamplerState:
        """The state before any loss was seen: zero history, zero counts."""
        return SamplerState(
            history=jnp.zeros((self.num_timesteps, self.history_per_term), jnp.float32),
            counts=jnp.zeros((self.num_timesteps,), jnp.int32),
        )

    @abc.abstractmethod
    def weights(self, state: SamplerState) -> jax.Array:
        """Unnormalised positive weights of the timesteps, float32 [T] (paper: weights())."""

    def probabilities(self, state: SamplerState) -> jax.Array:
        """The distribution `sample` draws t from: float32 [T], summing to 1."""
        w = self.weights(state)
        return w / jnp.sum(w)

    @abc.abstractmethod
    def sample(self, state: SamplerState, rng, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """Importance-samples timesteps for a batch of B = batch_size (static under jit).

        Returns (t, weights): t int32 [B] in [0, T); weights float32 [B], 1 / (T p_t), by
        which each example's loss is multiplied so the mean loss stays unbiased.
        """

    @abc.abstractmethod
    def update(self, state: SamplerState, t, losses) -> SamplerState:
        """The state after the global batch's t (int [B]) and its per-example unweighted
        losses (float [B], in the order of t) (paper: update_with_all_losses)."""

    def _check_state(self, state: SamplerState) -> None:
        # Shapes are static under jit, so a state from another config (a checkpoint of
        # another T or history length) fails here rather than indexing out of range.
        want = (self.num_timesteps, self.history_per_term)
        if tuple(state.history.shape) != want or tuple(state.counts.shape) != want[:1]:
            raise ValueError(
                f"schedule sampler state has history {tuple(state.history.shape)} and counts "
                f"{tuple(state.counts.shape)}, but this sampler needs history {want} and "
                f"counts {want[:1]} (num_timesteps={self.num_timesteps}, "
                f"history_per_term={self.history_per_term})"
            )


@dataclasses.dataclass(frozen=True)
class UniformSampler(ScheduleSampler):
    """t uniform over [0, T), every importance weight 1.

    Attributes:
      decoder_share: with this probability an example's t is 0 instead (unweighted: the
        objective leans towards t = 0 on purpose). At t = 0 the loss's vb term is the
        decoder's NLL L_0, the only term that trains the learned variance there; no
        sampler uses that variance (the last step adds no noise), only bits/dim does.
        Uniform t reaches it once in T examples: 58 times in the quickstart's whole run,
        whose L_0 was then over half its bits/dim (bench/RESULTS.md). 0 = the paper.
    """

    decoder_share: float = 0.0

    def weights(self, state: SamplerState) -> jax.Array:
        self._check_state(state)
        w = jnp.ones((self.num_timesteps,), jnp.float32)
        if self.decoder_share:  # p_0 = share + (1 - share) / T, any other t (1 - share) / T
            w = w.at[0].add(self.decoder_share * self.num_timesteps / (1.0 - self.decoder_share))
        return w

    def sample(self, state: SamplerState, rng, batch_size: int) -> tuple[jax.Array, jax.Array]:
        self._check_state(state)
        ones = jnp.ones((batch_size,), jnp.float32)
        if not self.decoder_share:  # the paper's draw
            return jax.random.randint(rng, (batch_size,), 0, self.num_timesteps, jnp.int32), ones
        rng, pick = jax.random.split(rng)
        t = jax.random.randint(rng, (batch_size,), 0, self.num_timesteps, jnp.int32)
        return jnp.where(jax.random.uniform(pick, (batch_size,)) < self.decoder_share, 0, t), ones

    def update(self, state: SamplerState, t, losses) -> SamplerState:
        self._check_state(state)
        return state


@dataclasses.dataclass(frozen=True)
class LossSecondMomentResampler(ScheduleSampler):
    """p_t proportional to the RMS of timestep t's recent losses (paper: same name).

    Attributes:
      uniform_prob: the share of the uniform distribution mixed into p, so that every
        timestep keeps being sampled (and its history refreshed).
    """

    uniform_prob: float = 0.001

    def warmed_up(self, state: SamplerState) -> jax.Array:
        """bool []: whether every timestep has history_per_term losses recorded."""
        return jnp.all(state.counts == self.history_per_term)

    def weights(self, state: SamplerState) -> jax.Array:
        """Ones during warm-up, then sqrt(mean(history^2)) normalised and mixed with
        uniform_prob / T (a probability vector), exactly as the paper code."""
        self._check_state(state)
        rms = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))  # [T]
        p = rms / jnp.sum(rms) * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return jnp.where(self.warmed_up(state), p, jnp.ones_like(p))

    def sample(self, state: SamplerState, rng, batch_size: int) -> tuple[jax.Array, jax.Array]:
        p = self.probabilities(state)  # [T]
        t = jax.random.choice(rng, self.num_timesteps, (batch_size,), p=p).astype(jnp.int32)
        weights = 1.0 / (self.num_timesteps * p[t])
        # During warm-up p is uniform and every weight is exactly 1 (not 1 up to the
        # float32 rounding of T * (1 / T)).
        weights = jnp.where(self.warmed_up(state), weights, 1.0)
        return t, weights.astype(jnp.float32)

    def update(self, state: SamplerState, t, losses) -> SamplerState:
        self._check_state(state)
        t, losses = jnp.asarray(t), jnp.asarray(losses)
        if t.ndim != 1 or losses.shape != t.shape:
            raise ValueError(
                f"t and losses must both have shape [B], got t {t.shape} and losses {losses.shape}"
            )
        size = self.history_per_term

        def record(carry, t_and_loss):
            history, counts = carry
            t_i, loss = t_and_loss
            row = history[t_i]  # [history_per_term]
            count = counts[t_i]
            full = count == size
            # Full: drop the oldest loss and append; otherwise write at position count.
            shifted = jnp.concatenate([row[1:], loss[None]])
            written = row.at[jnp.minimum(count, size - 1)].set(loss)
            history = history.at[t_i].set(jnp.where(full, shifted, written))
            counts = counts.at[t_i].add(jnp.where(full, 0, 1).astype(counts.dtype))
            return (history, counts), None

        (history, counts), _ = jax.lax.scan(
            record,
            (state.history, state.counts),
            (t.astype(jnp.int32), losses.astype(state.history.dtype)),
        )
        return state.replace(history=history, counts=counts)


def create_schedule_sampler(
    name: str,
    num_timesteps: int,
    *,
    history_per_term: int = 10,
    uniform_prob: float = 0.001,
    decoder_share: float = 0.0,
) -> ScheduleSampler:
    """A frozen, hashable `ScheduleSampler` by name (paper: create_named_schedule_sampler).

    `name` is `config.training.schedule_sampler`; history_per_term and uniform_prob
    apply to 'loss-second-moment', decoder_share (`training.decoder_share`: the share
    of examples at t = 0) to 'uniform'. Raises ValueError naming the offending setting.
    """
    if name not in SCHEDULE_SAMPLERS:
        raise ValueError(
            f"training.schedule_sampler must be one of {', '.join(map(repr, SCHEDULE_SAMPLERS))}, "
            f"got {name!r}"
        )

    def is_a(value, types) -> bool:
        return isinstance(value, types) and not isinstance(value, bool)

    if not is_a(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be an int, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if not is_a(history_per_term, int | np.integer) or history_per_term < 1:
        raise ValueError(f"history_per_term must be an int >= 1, got {history_per_term!r}")
    real = int | float | np.integer | np.floating
    if not is_a(uniform_prob, real) or not 0 <= uniform_prob <= 1:
        raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob!r}")
    if not is_a(decoder_share, real) or not 0 <= decoder_share < 1:
        raise ValueError(f"training.decoder_share must be in [0, 1), got {decoder_share!r}")
    if decoder_share and name != "uniform":
        raise ValueError(
            f"training.decoder_share={decoder_share} needs training.schedule_sampler='uniform' "
            f"(got {name!r}, whose importance weights assume its own distribution)."
        )
    if name == "uniform":
        return UniformSampler(int(num_timesteps), int(history_per_term), float(decoder_share))
    return LossSecondMomentResampler(int(num_timesteps), int(history_per_term), float(uniform_prob))


def sampler_from_config(training, num_timesteps: int) -> ScheduleSampler:
    """`create_schedule_sampler` from a config's `training` section (`schedule_sampler`,
    `decoder_share`): the one reading of those fields, for training and its checks."""
    return create_schedule_sampler(
        training.schedule_sampler,
        num_timesteps,
        decoder_share=training.get("decoder_share", 0.0),
    )


__all__ = [
    "SCHEDULE_SAMPLERS",
    "LossSecondMomentResampler",
    "SamplerState",
    "ScheduleSampler",
    "UniformSampler",
    "create_schedule_sampler",
    "sampler_from_config",
]
