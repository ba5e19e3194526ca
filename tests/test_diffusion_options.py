"""`Diffusion` value semantics, jax.jit-cached loops and the `SamplerOptions` spec."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import diffusion as ours
from diffusion_jax.diffusion.options import SamplerOptions

SHAPE = (2, 4, 4, 3)


def _model(x, t, y=None):
    del y
    return jnp.tanh(0.5 * x + jnp.asarray(t).astype(x.dtype)[:, None, None, None] / 1000.0)


def test_equal_settings_give_equal_diffusions_with_equal_hashes():
    a = ours.create_diffusion(steps=100, noise_schedule="cosine", timestep_respacing="ddim10")
    b = ours.create_diffusion(
        {"steps": 100, "noise_schedule": "cosine"}, timestep_respacing="ddim10"
    )
    assert a is not b and a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    for other in (
        ours.create_diffusion(steps=100, timestep_respacing="ddim10"),  # linear betas
        ours.create_diffusion(steps=100, noise_schedule="cosine", timestep_respacing="ddim20"),
        ours.create_diffusion(
            steps=100, noise_schedule="cosine", timestep_respacing="ddim10", learn_sigma=True
        ),
        ours.create_diffusion(
            steps=100, noise_schedule="cosine", timestep_respacing="ddim10", rescale_timesteps=True
        ),
    ):
        assert other != a
    assert a != "not a diffusion"


def test_two_create_diffusion_calls_share_one_compiled_loop():
    chex.clear_trace_counter()
    model = chex.assert_max_traces(_model, n=2)
    rng = jax.random.key(0)
    first = ours.create_diffusion(steps=50, timestep_respacing="ddim5")
    want = first.ddim_sample_loop(model, SHAPE, rng)
    second = ours.create_diffusion(steps=50, timestep_respacing="ddim5")
    got = second.ddim_sample_loop(model, SHAPE, rng)  # no new trace: the same program
    np.testing.assert_array_equal(got, want)
    # A different process is a different program: the counter sees it, so it would have
    # seen a recompile above.
    ours.create_diffusion(steps=50, timestep_respacing="ddim6").ddim_sample_loop(model, SHAPE, rng)
    with pytest.raises(AssertionError, match="traced > 2 times"):
        ours.create_diffusion(steps=50, timestep_respacing="ddim7").ddim_sample_loop(
            model, SHAPE, rng
        )


def test_a_new_eta_does_not_recompile_and_changes_the_samples():
    chex.clear_trace_counter()
    model = chex.assert_max_traces(_model, n=1)
    diff = ours.create_diffusion(steps=50, timestep_respacing="ddim5")
    rng = jax.random.key(1)
    outs = [diff.ddim_sample_loop(model, SHAPE, rng, eta=eta) for eta in (0.3, 0.9)]
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3


def test_ddim_step_with_eta_and_no_key_raises_like_p_sample():
    diff = ours.create_diffusion(steps=50, timestep_respacing="ddim5")
    x = jnp.ones(SHAPE)
    t = jnp.full((SHAPE[0],), 3, jnp.int32)
    with pytest.raises(ValueError, match=r"eta=0.5.*needs rng"):
        diff.ddim_sample(_model, x, t, eta=0.5)
    with pytest.raises(ValueError, match="needs rng"):
        diff.p_sample(_model, x, t)
    # eta=0 is deterministic without a key; with a key or noise eta > 0 runs.
    deterministic = diff.ddim_sample(_model, x, t)["sample"]
    noisy = diff.ddim_sample(_model, x, t, jax.random.key(0), eta=0.5)["sample"]
    assert float(jnp.max(jnp.abs(deterministic - noisy))) > 1e-3
    with pytest.raises(ValueError, match=r"eta=0.5 needs rng"):
        diff.ddim_sample_loop(_model, SHAPE, None, noise=x, eta=0.5)


def test_sampler_options_are_hashable_values_built_from_the_config():
    sampling = ml_collections.ConfigDict({"method": "ddim", "eta": 0.25, "clip_denoised": False})
    options = SamplerOptions.from_config(sampling)
    assert options == SamplerOptions(kind="ddim", eta=0.25, clip_denoised=False)
    assert hash(options) == hash(SamplerOptions(kind="ddim", eta=0.25, clip_denoised=False))
    assert options.stochastic and not SamplerOptions(kind="ddim").stochastic
    # Ancestral ignores the config's eta (it has none).
    ancestral = SamplerOptions.from_config({"method": "ancestral", "eta": 0.5})
    assert ancestral == SamplerOptions() and ancestral.stochastic
    # Structure (everything but eta) is static; eta is the one traced leaf.
    leaves, treedef = jax.tree.flatten(options)
    assert leaves == [0.25]
    assert jax.tree.unflatten(treedef, [0.5]) == SamplerOptions("ddim", 0.5, False)
    with pytest.raises(ValueError, match=r"sampling\.method: unknown value 'plms'"):
        SamplerOptions.from_config({"method": "plms"})
    with pytest.raises(ValueError, match="sampler kind: unknown value"):
        SamplerOptions(kind="euler")
    with pytest.raises(ValueError, match="eta applies to DDIM only"):
        SamplerOptions(kind="ancestral", eta=0.5)


def test_sample_loop_with_options_equals_the_keyword_loop():
    diff = ours.create_diffusion(steps=50, timestep_respacing="ddim5")
    rng = jax.random.key(2)
    options = SamplerOptions(kind="ddim", eta=0.4, clip_denoised=False)
    got = diff.sample_loop(_model, SHAPE, rng, options)["sample"]
    want = diff.ddim_sample_loop(_model, SHAPE, rng, eta=0.4, clip_denoised=False)
    np.testing.assert_array_equal(got, want)
    clipped = diff.ddim_sample_loop(_model, SHAPE, rng, eta=0.4)
    assert not np.array_equal(np.asarray(clipped), np.asarray(want))  # options matter
