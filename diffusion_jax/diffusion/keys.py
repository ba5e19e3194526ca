"""Per-sample randomness: one key per sample, so no sample depends on its batch.

A batch of B samples uses keys `key_i`: either `fold_in(rng, i)` from one key, or
B keys given by the caller (e.g. `fold_in(job_key, global_sample_index)`). Every draw
for sample i (its x_T, its step noise at each timestep t) then comes from `key_i`
alone, via `fold_in(key_i, t)`, whatever the batch size, its other members or the
number of devices it is sharded over.
"""

import jax
import jax.numpy as jnp


def per_sample_keys(rng, batch: int, name: str = "rng"):
    """One key per sample: [B] typed keys (B = batch).

    None for None; `fold_in(rng, i)` for i < B when rng is one typed key (shape ());
    rng itself when it already holds B keys; else a ValueError calling rng `name`.
    """
    if rng is None:
        return None
    shape = tuple(rng.shape)
    if shape == ():
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch))
    if shape == (batch,):
        return rng
    raise ValueError(
        f"{name} must be one jax.random.key or a batch of {batch} keys (shape ({batch},), "
        f"one per sample), got keys of shape {shape}"
    )


def fold_in_each(rngs, data):
    """`fold_in(rngs[i], data)` for each of the [B] keys (data shared, may be traced)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs, data)


def per_sample_normal(rngs, sample_shape, dtype):
    """[B, *sample_shape] standard normals, sample i drawn from rngs[i] alone."""
    return jax.vmap(lambda rng: jax.random.normal(rng, sample_shape, dtype))(rngs)


__all__ = ["fold_in_each", "per_sample_keys", "per_sample_normal"]


def as_key(rng, name="rng"):
    """Accepts typed keys (jax.random.key, any batch shape) and legacy uint32 keys."""
    if rng is None:
        return None
    if not isinstance(rng, jax.Array):
        raise ValueError(f"{name} must be a jax.random.key, got {type(rng).__name__}")
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def single_key(rng, name="rng"):
    """A typed key of shape (), for draws that take one key for the whole batch."""
    rng = as_key(rng, name)
    if rng is not None and rng.shape != ():
        raise ValueError(
            f"{name} must be one jax.random.key for the whole batch, got keys of shape {rng.shape}"
        )
    return rng
