"""The sampler registry: a new sampler kind is one `register_sampler` call, nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from diffusion_jax import parallel
from diffusion_jax.diffusion.options import SAMPLERS, SamplerKind, register_sampler
from diffusion_jax.sampling import ShardedSampler
from diffusion_jax.sampling.sharded import job_key, sampling_program, to_uint8


def _toy_loop(diffusion, options, model_fn, cond, x_init, sample_rngs):
    # Skips the model: x_0 = tanh(x_T + y / 100), labels read from the Conditioning.
    del diffusion, model_fn, sample_rngs
    shift = cond.model_kwargs["y"].astype(x_init.dtype)[:, None, None, None] / 100.0
    return {"sample": jnp.tanh(x_init + shift) if options.clip_denoised else x_init}


@pytest.fixture
def toy_kind():
    register_sampler(
        SamplerKind("toy", loop=_toy_loop, methods=("toy",), respacing=lambda r: f"{r}0")
    )
    yield
    del SAMPLERS["toy"]


def test_a_registered_kind_runs_through_the_config_and_the_sharded_sampler(toy_kind):
    config = base.get_base_config()
    config.model.update(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult=(1,), num_classes=10
    )
    config.model.attention_resolutions = ()
    config.diffusion.steps = 100
    config.sampling.method = "toy"
    config.sampling.timestep_respacing = 3
    program = sampling_program(config, parallel.create_mesh())
    assert program.options.kind == "toy"
    assert program.diffusion.num_timesteps == 30  # the kind's own respacing rule: "30"
    key = job_key(5)
    sampler = ShardedSampler(program, {}, key)
    labels = np.arange(8) * 7 % 10
    images, rows = sampler.sample(np.arange(8), labels)
    # Independent restatement: x_T of sample i is normal(fold_in(fold_in(key, i), T)).
    x_t = np.stack(
        [
            np.asarray(
                jax.random.normal(
                    jax.random.fold_in(jax.random.fold_in(key, i), 30), (8, 8, 3), jnp.float32
                )
            )
            for i in range(8)
        ]
    )
    want = np.tanh(x_t + labels[:, None, None, None] / 100.0)
    np.testing.assert_array_equal(rows, np.arange(8))
    diff = np.abs(images.astype(int) - np.asarray(to_uint8(jnp.asarray(want))).astype(int))
    assert diff.max() <= 1


def test_unknown_methods_list_the_registered_kinds(toy_kind):
    config = base.get_base_config()
    config.sampling.method = "euler"
    with pytest.raises(ValueError, match=r"'toy'"):
        sampling_program(config, parallel.create_mesh())


def test_an_inverting_kind_is_refused_by_sample_loop_by_its_entry_not_its_name():
    from diffusion_jax.diffusion import create_diffusion
    from diffusion_jax.diffusion.options import SamplerOptions

    register_sampler(SamplerKind("toy_inversion", loop=_toy_loop, inverts=True))
    try:
        diffusion = create_diffusion({"steps": 10, "noise_schedule": "cosine"})
        x = jnp.zeros((2, 4, 4, 3))
        for kind in ("toy_inversion", "ddim_reverse"):
            with pytest.raises(ValueError, match=rf"{kind}' inverts .* ddim_reverse_sample_loop"):
                diffusion.sample_loop(None, x.shape, None, SamplerOptions(kind=kind), noise=x)
    finally:
        del SAMPLERS["toy_inversion"]
