"""Mesh-aware sampling: image i depends on fold_in(job_key, i) only, not on the mesh or batch."""

import _sampling_models as sm
import jax
import numpy as np
import pytest

from diffusion_jax import checkpoints, models, parallel
from diffusion_jax.diffusion import SamplerOptions, create_diffusion
from diffusion_jax.sampling import SamplingProgram, ShardedSampler

pytest.importorskip("guided_diffusion")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ck = sm.make_checkpoints(tmp_path_factory.mktemp("ckpt"))
    config, classifier_config = ck["base_config"], ck["classifier_config"]
    params, _ = checkpoints.restore_params(ck["base_dir"])
    classifier_params, _ = checkpoints.restore_params(ck["classifier_dir"])
    diffusion = create_diffusion(config.diffusion, timestep_respacing="ddim4")

    def make(mesh, seed=7):
        key = jax.random.key(seed)
        program = SamplingProgram(
            diffusion=diffusion,
            # eta > 0: every step draws per-sample noise, so the keys matter throughout.
            options=SamplerOptions(kind="ddim", eta=0.5),
            model=models.create_model(config.model),
            image_shape=(16, 16, 3),
            mesh=mesh,
            class_conditional=True,
            classifier=models.create_classifier(classifier_config.model),
        )
        return ShardedSampler(
            program, params, key, classifier_params=classifier_params, classifier_scale=3.0
        )

    return make


def test_images_do_not_depend_on_device_count_or_batch(setup):
    labels = (np.arange(16) * 37) % 1000
    eight = setup(parallel.create_mesh())
    one = setup(parallel.create_mesh(jax.devices()[:1]))
    a, idx_a = eight.sample(np.arange(8), labels[:8])
    b, idx_b = one.sample(np.arange(8), labels[:8])
    c, idx_c = eight.sample(np.arange(16), labels)  # a bigger batch holding the same samples
    d, _ = eight.sample(np.arange(4, 12), labels[4:12])  # the same samples elsewhere in a batch
    # A 2-D mesh (data=2 x fsdp=4): the batch is split over both axes.
    e, idx_e = setup(parallel.create_mesh(data=2, fsdp=4)).sample(np.arange(8), labels[:8])
    np.testing.assert_array_equal(idx_e, np.arange(8))
    np.testing.assert_array_equal(idx_a, np.arange(8))
    np.testing.assert_array_equal(idx_b, np.arange(8))
    np.testing.assert_array_equal(idx_c, np.arange(16))
    assert a.shape == (8, 16, 16, 3) and a.dtype == np.uint8
    for other in (b, c[:8], e):
        diff = np.abs(a.astype(int) - other.astype(int))
        # uint8 truncation: float32 noise can move a value across an integer at most by 1.
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    diff = np.abs(a[4:].astype(int) - d[:4].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    # Not trivially equal: different samples and a different job key differ.
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 5
    other_key, _ = setup(parallel.create_mesh(), 8).sample(np.arange(8), labels[:8])
    assert np.abs(a.astype(int) - other_key.astype(int)).mean() > 5


def test_guided_loop_compiles_once_across_batches(setup):
    """One program serves every same-shape batch, new weights and keys: no recompiles."""
    from _compiles import count_compiles

    sampler = setup(parallel.create_mesh())
    labels = np.arange(24) % 1000
    first, _ = sampler.sample(np.arange(8), labels[:8])  # compiles unless an earlier test did
    reseeded = setup(parallel.create_mesh(), seed=9)
    with count_compiles() as compiled:
        second, _ = sampler.sample(np.arange(8, 16), labels[8:16])
        third, _ = reseeded.sample(np.arange(16, 24), labels[16:])
    assert compiled == [], compiled
    assert not np.array_equal(first, second) and not np.array_equal(second, third)
