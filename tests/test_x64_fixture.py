"""The suite runs in float32 (what users run); float64 only inside the `x64` fixture."""

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _scaled_range(x):
    return 2.0 * x + jnp.arange(x.shape[0])


def test_suite_default_is_float32():
    assert not jax.config.x64_enabled
    assert jnp.ones(1).dtype == jnp.float32
    assert jnp.arange(3).dtype == jnp.int32
    assert jnp.asarray(np.ones(2)).dtype == jnp.float32  # numpy float64 is narrowed
    assert jax.random.normal(jax.random.key(0), (2,)).dtype == jnp.float32


def test_x64_fixture_enables_float64(x64):
    assert jax.config.x64_enabled
    assert jnp.ones(1).dtype == jnp.float64
    assert jnp.arange(3).dtype == jnp.int64
    assert _scaled_range(np.ones(3)).dtype == jnp.float64


def test_programs_compiled_under_x64_do_not_leak_into_float32():
    """jit keys its cache on the x64 setting: the same function compiled under x64 (here
    and in the test above) runs as a float32 program outside it."""
    with jax.enable_x64(True):
        assert _scaled_range(np.ones(3)).dtype == jnp.float64
    assert not jax.config.x64_enabled
    out = _scaled_range(np.ones(3))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [2.0, 3.0, 4.0])
