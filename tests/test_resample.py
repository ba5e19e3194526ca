"""Timestep samplers: parity with the paper code's resample.py, sampling statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax.diffusion import resample

resample_ref = pytest.importorskip("guided_diffusion.resample")


def _reference_sampler(monkeypatch, num_timesteps, history_per_term, uniform_prob):
    # The paper code allocates its counts with `np.int`, removed in NumPy 1.24.
    monkeypatch.setattr(np, "int", int, raising=False)

    class _Diffusion:
        pass

    diffusion = _Diffusion()
    diffusion.num_timesteps = num_timesteps
    return resample_ref.LossSecondMomentResampler(
        diffusion, history_per_term=history_per_term, uniform_prob=uniform_prob
    )


def _warmed_up_state(scales, history_per_term=10, seed=0):
    """A full history whose timestep t has losses of RMS ~ scales[t]."""
    rng = np.random.default_rng(seed)
    scales = np.asarray(scales, np.float32)
    history = scales[:, None] * rng.uniform(0.5, 1.5, (len(scales), history_per_term))
    return resample.SamplerState(
        history=jnp.asarray(history, jnp.float32),
        counts=jnp.full((len(scales),), history_per_term, jnp.int32),
    )


def test_loss_second_moment_matches_paper_code_on_the_same_history(monkeypatch):
    """Warm-up, repeated timesteps within a batch and full histories: the same history,
    counts, weights and importance weights as the paper code after every batch."""
    num_timesteps, history_per_term, uniform_prob, batch = 6, 3, 0.05, 8
    ours = resample.create_schedule_sampler(
        "loss-second-moment",
        num_timesteps,
        history_per_term=history_per_term,
        uniform_prob=uniform_prob,
    )
    ref = _reference_sampler(monkeypatch, num_timesteps, history_per_term, uniform_prob)
    update = jax.jit(ours.update)
    sample = jax.jit(ours.sample, static_argnums=2)
    weights = jax.jit(ours.weights)
    state = ours.init_state()

    rng = np.random.default_rng(0)
    batches = [
        # One timestep 8 times: fills its history (3) then shifts 5 times in one batch.
        np.full(batch, 2),
        np.array([0, 1, 0, 1, 0, 1, 0, 5]),
        *[rng.integers(0, num_timesteps, batch) for _ in range(12)],
    ]
    warmed_up_at = None
    for step, t in enumerate(batches):
        # float32 losses, as the step computes them; the reference keeps them in float64.
        losses = (rng.lognormal(0.0, 1.0, batch) * (1 + t)).astype(np.float32)
        ref.update_with_all_losses(t.tolist(), losses.tolist())
        state = update(state, jnp.asarray(t, jnp.int32), jnp.asarray(losses))
        np.testing.assert_array_equal(state.counts, ref._loss_counts, err_msg=f"batch {step}")
        np.testing.assert_array_equal(state.history, ref._loss_history, err_msg=f"batch {step}")
        want = ref.weights()
        np.testing.assert_allclose(weights(state), want, rtol=1e-6, err_msg=f"batch {step}")
        # Importance weights of the drawn t: the paper code's 1 / (T p_t).
        drawn_t, drawn_w = sample(state, jax.random.key(step), 64)
        p = want / np.sum(want)
        np.testing.assert_allclose(drawn_w, 1.0 / (num_timesteps * p[np.asarray(drawn_t)]), 1e-6)
        if ref._warmed_up() and warmed_up_at is None:
            warmed_up_at = step
    # The sequence covered warm-up, the switch and sampling after it.
    assert warmed_up_at is not None and 2 < warmed_up_at < len(batches) - 3
    assert not np.allclose(ref.weights(), 1.0 / num_timesteps)
    assert drawn_t.dtype == jnp.int32 and drawn_w.dtype == jnp.float32


def test_update_applies_a_batch_in_order_with_repeated_timesteps():
    """Closed form: timestep 1 seen 5 times with history 3 keeps the last 3 losses."""
    sampler = resample.create_schedule_sampler("loss-second-moment", 4, history_per_term=3)
    state = sampler.update(
        sampler.init_state(),
        jnp.array([1, 3, 1, 1, 1, 1]),
        jnp.array([1.0, 9.0, 2.0, 3.0, 4.0, 5.0]),
    )
    np.testing.assert_array_equal(state.counts, [0, 3, 0, 1])
    np.testing.assert_array_equal(state.history[1], [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(state.history[3], [9.0, 0.0, 0.0])
    assert not sampler.warmed_up(state)


def test_warm_up_samples_uniformly_with_unit_weights():
    sampler = resample.create_schedule_sampler("loss-second-moment", 5, history_per_term=2)
    state = sampler.update(sampler.init_state(), jnp.arange(5), jnp.arange(5.0) + 1.0)
    np.testing.assert_array_equal(sampler.weights(state), np.ones(5))  # 4 of 5 steps short
    t, w = sampler.sample(state, jax.random.key(0), 1000)
    np.testing.assert_array_equal(w, np.ones(1000))
    np.testing.assert_array_equal(np.unique(np.asarray(t)), np.arange(5))


def test_sampled_timesteps_follow_the_probabilities_and_weights_are_unbiased():
    num_timesteps, draws = 16, 200_000
    sampler = resample.create_schedule_sampler(
        "loss-second-moment", num_timesteps, uniform_prob=0.01
    )
    state = _warmed_up_state(np.geomspace(0.02, 3.0, num_timesteps))
    p = np.asarray(sampler.probabilities(state), np.float64)
    assert abs(p.sum() - 1.0) < 1e-6 and p.max() / p.min() > 20  # far from uniform
    t, w = jax.jit(sampler.sample, static_argnums=2)(state, jax.random.key(1), draws)
    observed = np.bincount(np.asarray(t), minlength=num_timesteps)
    assert observed.shape == (num_timesteps,)
    # A fixed key, so deterministic; p = 0.999 keeps a correct sampler well inside.
    chi2 = np.sum((observed - draws * p) ** 2 / (draws * p))
    assert chi2 < stats.chi2.ppf(0.999, num_timesteps - 1), (chi2, observed, draws * p)
    # The draws did not just come out uniform (which the same statistic would reject).
    uniform = np.full(num_timesteps, 1.0 / num_timesteps)
    assert np.sum((observed - draws * uniform) ** 2 / (draws * uniform)) > 1e4
    # E[w] = sum_t p_t / (T p_t) = 1, and E[w L_t] is the uniform mean of L_t.
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(w, 1.0 / (num_timesteps * p[np.asarray(t)]), rtol=1e-6)
    assert abs(w.mean() - 1.0) < 0.02, w.mean()
    per_t = np.linspace(1.0, 2.0, num_timesteps)
    assert abs(np.mean(w * per_t[np.asarray(t)]) - per_t.mean()) < 0.02 * per_t.mean()


def test_uniform_sampler():
    num_timesteps = 50
    sampler = resample.create_schedule_sampler("uniform", num_timesteps)
    state = sampler.init_state()
    np.testing.assert_array_equal(sampler.weights(state), np.ones(num_timesteps))
    np.testing.assert_allclose(sampler.probabilities(state), np.full(num_timesteps, 0.02))
    t, w = jax.jit(sampler.sample, static_argnums=2)(state, jax.random.key(2), 5000)
    assert t.dtype == jnp.int32 and w.dtype == jnp.float32
    np.testing.assert_array_equal(np.unique(np.asarray(t)), np.arange(num_timesteps))
    np.testing.assert_array_equal(w, np.ones(5000))
    # Losses do not move it, and its state has the loss-second-moment layout.
    after = sampler.update(state, t[:8], jnp.linspace(0.0, 9.0, 8))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), after, state))
    other = resample.create_schedule_sampler("loss-second-moment", num_timesteps).init_state()
    assert jax.tree.structure(state) == jax.tree.structure(other)
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, other)


def test_decoder_share_draws_t0_that_often_and_leaves_the_rest_uniform():
    """p_0 = share + (1 - share) / T, every other t (1 - share) / T; weights stay 1, and
    share 0 draws exactly the paper's uniform t (the same key, the same timesteps)."""
    num_timesteps, share, draws = 20, 0.25, 40_000
    sampler = resample.create_schedule_sampler("uniform", num_timesteps, decoder_share=share)
    state = sampler.init_state()
    p = np.asarray(sampler.probabilities(state), np.float64)
    expected = np.full(num_timesteps, (1 - share) / num_timesteps)
    expected[0] += share
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    t, w = jax.jit(sampler.sample, static_argnums=2)(state, jax.random.key(3), draws)
    np.testing.assert_array_equal(w, np.ones(draws))
    observed = np.bincount(np.asarray(t), minlength=num_timesteps)
    # Each count within 5 binomial standard deviations of draws * p.
    np.testing.assert_array_less(np.abs(observed - draws * p), 5 * np.sqrt(draws * p * (1 - p)))
    plain = resample.create_schedule_sampler("uniform", num_timesteps)
    assert plain == resample.create_schedule_sampler("uniform", num_timesteps, decoder_share=0.0)
    assert plain != sampler
    key = jax.random.key(4)
    np.testing.assert_array_equal(
        plain.sample(state, key, 64)[0],
        jax.random.randint(key, (64,), 0, num_timesteps, jnp.int32),
    )
    with pytest.raises(ValueError, match=r"training\.decoder_share must be in \[0, 1\)"):
        resample.create_schedule_sampler("uniform", 10, decoder_share=1.0)
    with pytest.raises(ValueError, match=r"needs training\.schedule_sampler='uniform'"):
        resample.create_schedule_sampler("loss-second-moment", 10, decoder_share=0.1)


def test_state_is_float32_and_int32_also_under_x64(x64):
    """The state's dtypes do not follow the x64 switch (checkpoints stay the same)."""
    sampler = resample.create_schedule_sampler("loss-second-moment", 5, history_per_term=2)
    state = sampler.update(sampler.init_state(), jnp.arange(5), jnp.ones(5, jnp.float64))
    assert state.history.dtype == jnp.float32 and state.counts.dtype == jnp.int32
    t, w = sampler.sample(state, jax.random.key(0), 4)
    assert t.dtype == jnp.int32 and w.dtype == jnp.float32


def test_spec_is_a_hashable_value_and_the_step_compiles_once():
    make = functools.partial(
        resample.create_schedule_sampler, "loss-second-moment", 8, history_per_term=64
    )
    assert make() == make() and hash(make()) == hash(make())
    assert make(uniform_prob=0.1) != make()
    assert make() != resample.create_schedule_sampler("uniform", 8)

    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def step(sampler, state, rng, losses):
        traces.append(1)
        t, w = sampler.sample(state, rng, losses.shape[0])
        return sampler.update(state, t, losses * w), t

    state = make().init_state()
    for i in range(3):
        state, _ = step(make(), state, jax.random.key(i), jnp.ones(16))
    assert len(traces) == 1
    assert int(state.counts.sum()) == 48


def test_bad_settings_raise_naming_them():
    with pytest.raises(
        ValueError, match=r"training\.schedule_sampler must be one of 'uniform', 'loss-second"
    ):
        resample.create_schedule_sampler("loss_aware", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        resample.create_schedule_sampler("uniform", 0)
    with pytest.raises(ValueError, match="history_per_term"):
        resample.create_schedule_sampler("loss-second-moment", 10, history_per_term=0)
    with pytest.raises(ValueError, match="uniform_prob"):
        resample.create_schedule_sampler("loss-second-moment", 10, uniform_prob=1.5)
    sampler = resample.create_schedule_sampler("loss-second-moment", 10)
    other = resample.create_schedule_sampler("loss-second-moment", 12).init_state()
    with pytest.raises(ValueError, match=r"needs history \(10, 10\).*num_timesteps=10"):
        sampler.sample(other, jax.random.key(0), 4)
    with pytest.raises(ValueError, match="t and losses must both have shape"):
        sampler.update(sampler.init_state(), jnp.arange(4), jnp.ones(3))


def test_sharded_global_batch_updates_like_one_device():
    """t and losses sharded over the 8-device 'data' mesh, state replicated: the same
    state as applying the global batch on one device (batch order = global order)."""
    from diffusion_jax import parallel

    mesh = parallel.create_mesh()
    sampler = resample.create_schedule_sampler("loss-second-moment", 8, history_per_term=4)
    rng = np.random.default_rng(3)
    t = jnp.asarray(rng.integers(0, 8, 64), jnp.int32)  # repeats across devices
    losses = jnp.asarray(rng.uniform(0.1, 2.0, 64), jnp.float32)
    single = sampler.update(sampler.init_state(), t, losses)
    state = jax.device_put(sampler.init_state(), parallel.replicated_sharding(mesh))
    sharding = parallel.data_sharding(mesh)
    sharded = jax.jit(sampler.update)(
        state, jax.device_put(t, sharding), jax.device_put(losses, sharding)
    )
    np.testing.assert_array_equal(sharded.history, single.history)
    np.testing.assert_array_equal(sharded.counts, single.counts)
    assert int(single.counts.sum()) < 64  # some histories filled up and shifted
