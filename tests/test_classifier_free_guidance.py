"""Classifier-free guidance: `classifier_free_model_fn` and the samplers that take it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as ours
from diffusion_jax import models

B, NULL = 3, 10


class CountingModel:
    """An eager model_fn recording its calls: learned sigma, label- and low_res-dependent."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, y, low_res=None):
        self.batches.append((x.shape[0], t.shape[0], y.shape[0], low_res.shape[0]))
        label = y.astype(x.dtype).reshape(-1, 1, 1, 1)
        mean = 0.1 * x + 0.01 * label + low_res.mean() + t.reshape(-1, 1, 1, 1) / 1000.0
        variance = jnp.tanh(0.05 * label + x)
        return jnp.concatenate([mean, variance], axis=-1)


def test_one_batched_call_combining_the_eps_channels_only():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, 2, 2, 3)), jnp.float32)
    t = jnp.asarray([5, 7, 9], jnp.int32)
    y = jnp.asarray([1, 4, 7], jnp.int32)
    low_res = jnp.asarray(rng.normal(size=(B, 1, 1, 3)), jnp.float32)
    model = CountingModel()
    cond = model(x, t, y, low_res)
    uncond = model(x, t, jnp.full_like(y, NULL), low_res)
    model.batches.clear()
    for scale in (1.0, 0.0, 2.5):
        got = ours.classifier_free_model_fn(model, scale, NULL)(x, t, y=y, low_res=low_res)
        want_eps = uncond[..., :3] + scale * (cond[..., :3] - uncond[..., :3])
        np.testing.assert_allclose(got[..., :3], want_eps, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[..., 3:], cond[..., 3:])  # conditional variances
    np.testing.assert_allclose(
        ours.classifier_free_model_fn(model, 1.0, NULL)(x, t, y=y, low_res=low_res), cond, atol=1e-6
    )
    np.testing.assert_allclose(
        ours.classifier_free_model_fn(model, 0.0, NULL)(x, t, y=y, low_res=low_res)[..., :3],
        uncond[..., :3],
        atol=1e-6,
    )
    # One call per evaluation, on the doubled batch: x, t, labels and low_res.
    assert model.batches == [(2 * B,) * 4] * 5
    assert float(jnp.max(jnp.abs(cond - uncond))) > 0.05  # the halves really differ
    with pytest.raises(ValueError, match="needs the labels y"):
        ours.classifier_free_model_fn(model, 2.0, NULL)(x, t, low_res=low_res)
    with pytest.raises(ValueError, match="null_label must be the null class index"):
        ours.classifier_free_model_fn(model, 2.0, None)


def _model(x, t, y):
    label = (y.astype(x.dtype) - 5.0).reshape(-1, 1, 1, 1) / 10.0
    return jnp.tanh(0.5 * x + label + t.astype(x.dtype).reshape(-1, 1, 1, 1) / 1000.0)


def _null_model(x, t, y):
    return _model(x, t, jnp.full_like(y, NULL))


def _extrapolated(x, t, y):  # eps_u + 3 (eps_c - eps_u), written out
    return _null_model(x, t, y) + 3.0 * (_model(x, t, y) - _null_model(x, t, y))


@pytest.mark.parametrize("kind", ["ancestral", "ddim", "dpm_solver++"])
def test_every_sampler_takes_the_guided_model_fn(kind):
    diff = ours.create_diffusion(steps=100, timestep_respacing=5)
    shape, rng = (4, 2, 2, 3), jax.random.key(0)
    kwargs = {"model_kwargs": {"y": jnp.asarray([0, 3, 6, 9])}}

    def run(model_fn):
        if kind == "ancestral":
            return diff.p_sample_loop(model_fn, shape, rng, **kwargs)
        if kind == "ddim":
            return diff.ddim_sample_loop(model_fn, shape, rng, **kwargs)
        return diff.dpm_solver_sample_loop(model_fn, shape, rng, steps=5, **kwargs)

    guided = run(ours.classifier_free_model_fn(_model, 3.0, NULL))
    np.testing.assert_allclose(guided, run(_extrapolated), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(guided - run(_model)))) > 1e-2


def test_label_dropout_gives_the_embedding_a_null_row():
    from configs import quickstart

    config = quickstart.get_config()
    config.model.update(image_size=8, num_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    config.model.attention_resolutions = ()
    config.training.label_dropout = 0.0
    assert models.null_label(config.model) is None
    config.training.label_dropout = 0.1  # linked: model.label_dropout
    assert models.null_label(config.model) == 10
    from diffusion_jax.checkpoints import abstract_params

    assert abstract_params(config.model)["label_emb"]["embedding"].shape[0] == 11
    config.training.label_dropout = 0.0
    assert abstract_params(config.model)["label_emb"]["embedding"].shape[0] == 10
    # A model config without the field (a converted paper checkpoint's) has none.
    del config.model["label_dropout"]
    assert models.null_label(config.model) is None
