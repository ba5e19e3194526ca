"""The resumable sampling job on tiny random guided-diffusion models converted from .pt."""

import json
import pathlib

import _sampling_models as sm
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import sampling
from diffusion_jax.sampling import job as job_lib

pytest.importorskip("guided_diffusion")


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return sm.make_checkpoints(tmp_path_factory.mktemp("ckpt"))


def job_config(ck, **sampling_fields):
    config = sm.load(sm.BASE)
    config.sampling.update(
        dict(
            num_samples=20,  # 3 batches of 8: the last one padded
            batch_size=8,
            timestep_respacing=4,
            classifier_scale=2.0,
            classifier_checkpoint=str(ck["classifier_dir"]),
        )
    )
    config.sampling.update(sampling_fields)
    return config


@pytest.fixture(scope="module")
def uninterrupted(ck, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "samples.npz"
    sampling.run_sampling_job(job_config(ck), str(ck["base_dir"]), str(out))
    return sm.read_npz(out), out


def test_output_is_in_the_paper_layout_with_a_png_grid(uninterrupted):
    arrays, out = uninterrupted
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].shape == (20, 16, 16, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].shape == (20,) and arrays["arr_1"].min() >= 0
    assert arrays["arr_1"].max() < 1000 and len(set(arrays["arr_1"].tolist())) > 10  # random
    assert np.abs(arrays["arr_0"][0].astype(int) - arrays["arr_0"][1].astype(int)).mean() > 5
    grid = np.asarray(Image.open(out.with_suffix(".png")))
    assert grid.shape == (4 * 16, 5 * 16, 3)  # 20 samples, 5 columns
    np.testing.assert_array_equal(grid[:16, 16:32], arrays["arr_0"][1])
    # The finished batches are folded into the output; the manifest stays.
    parts = pathlib.Path(str(out) + ".parts")
    assert sorted(p.name for p in parts.iterdir()) == ["COMPLETE", "manifest.json"]


def test_interrupted_job_continues_and_equals_the_uninterrupted_one(
    ck, uninterrupted, tmp_path, monkeypatch
):
    out = tmp_path / "samples.npz"
    calls = []
    original = job_lib.ShardedSampler.sample

    def dies_on_the_second_batch(self, indices, *args):
        calls.append(int(indices[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(self, indices, *args)

    monkeypatch.setattr(job_lib.ShardedSampler, "sample", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sampling.run_sampling_job(job_config(ck), str(ck["base_dir"]), str(out))
    assert not out.exists() and (pathlib.Path(str(out) + ".parts") / "000000.p0000.npz").exists()
    sampling.run_sampling_job(job_config(ck), str(ck["base_dir"]), str(out))
    assert calls == [0, 8, 8, 16]  # batch 0 was not redone
    got = sm.read_npz(out)
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(got[key], uninterrupted[0][key])
    # A finished job run again does nothing.
    sampling.run_sampling_job(job_config(ck), str(ck["base_dir"]), str(out))
    assert len(calls) == 4


def test_other_batch_size_gives_the_same_images(ck, uninterrupted, tmp_path):
    out = tmp_path / "samples.npz"
    sampling.run_sampling_job(job_config(ck, batch_size=16), str(ck["base_dir"]), str(out))
    got, want = sm.read_npz(out), uninterrupted[0]
    np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
    diff = np.abs(got["arr_0"].astype(int) - want["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_changed_settings_refuse_to_continue_the_old_job(ck, uninterrupted):
    _, out = uninterrupted
    with pytest.raises(
        ValueError,
        match=r"sampling job of other inputs: labels_sha256 \(was: '[0-9a-f]+', now: "
        r"'[0-9a-f]+'\); .*sampling\.num_samples \(was: 20, now: 21\)",
    ):
        sampling.run_sampling_job(
            job_config(ck, eta=0.0, num_samples=21), str(ck["base_dir"]), str(out)
        )


def test_labels_one_class_and_a_tuple(ck, tmp_path):
    from diffusion_jax.sampling import inputs

    np.testing.assert_array_equal(inputs.job_labels(7, 1000, 3, 0), [7, 7, 7])
    np.testing.assert_array_equal(inputs.job_labels((1, 2), 1000, 5, 0), [1, 2, 1, 2, 1])
    np.testing.assert_array_equal(inputs.job_labels("3,4", 1000, 3, 0), [3, 4, 3])
    random = inputs.job_labels("random", 1000, 50, 0)
    np.testing.assert_array_equal(inputs.job_labels("random", 1000, 20, 0), random[:20])


@pytest.fixture()
def no_device_work(monkeypatch):
    """Fails the test if a job restores parameters or builds its sampler."""

    def forbidden(*args, **kwargs):
        raise AssertionError("device work before the input checks")

    monkeypatch.setattr(job_lib, "_restore", forbidden)
    monkeypatch.setattr(job_lib, "ShardedSampler", forbidden)


def _fake_checkpoint(directory: pathlib.Path, config) -> str:
    """A directory with only a config.json: enough for the checks, which run first."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(config.to_json_best_effort())
    return str(directory)


def test_bad_inputs_fail_in_one_sentence_before_device_work(ck, tmp_path, no_device_work):
    base = str(ck["base_dir"])
    out = str(tmp_path / "o.npz")

    def fails(match, config=None, checkpoint=base, output=out, **kwargs):
        with pytest.raises((ValueError, OSError)) as info:
            sampling.run_sampling_job(config or job_config(ck), checkpoint, output, **kwargs)
        assert "\n" not in str(info.value)
        assert info.match(match)

    wide = job_config(ck)
    wide.model.num_channels = 64
    fails(r"checkpoint has model\.num_channels=32, the config model\.num_channels=64", wide)
    cosine = job_config(ck)
    cosine.diffusion.noise_schedule = "linear"
    fails(r"trained with diffusion\.noise_schedule='cosine'", cosine)
    small = sm.load(sm.CLASSIFIER)
    small.model.image_size = 8
    small.model.attention_resolutions = (4,)
    fails(
        "classifier of 8x8 images; the model samples 16x16",
        classifier_checkpoint=_fake_checkpoint(tmp_path / "c8", small),
    )
    few = sm.load(sm.CLASSIFIER)
    few.model.num_classes = 10
    fails(
        "classifier over 10 classes; the model has model.num_classes=1000",
        classifier_checkpoint=_fake_checkpoint(tmp_path / "c10", few),
    )
    fails(r"sampling\.labels=1000 is out of range", job_config(ck, labels=1000))
    fails(r"sampling\.labels=\(3, -1\) is out of range", job_config(ck, labels=(3, -1)))
    fails(r"sampling\.num_samples must be a positive integer, got 0", job_config(ck, num_samples=0))
    fails(
        r"sampling\.batch_size=12 must be a positive multiple of the 8 devices",
        job_config(ck, batch_size=12),
    )
    (tmp_path / "file").write_text("")
    fails("is not writable", output=str(tmp_path / "file" / "o.npz"))
    fails("no such directory", checkpoint=str(tmp_path / "missing"))
    fails("needs a classifier", job_config(ck, classifier_checkpoint=""))
    fails("for upsampler configs", base_samples=out)
    # Upsampler inputs.
    stack_cfg = sm.load(sm.UPSAMPLER)
    stack_cfg.sampling.update(num_samples=4, batch_size=8)
    up = _fake_checkpoint(tmp_path / "up", stack_cfg)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64))
    fails("holds 16x16 images; the upsampler needs 8x8x3", stack_cfg, up, base_samples=str(wrong))
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, np.zeros((4, 8, 8, 3), np.uint8))
    fails(r"has no labels \(arr_1\)", stack_cfg, up, base_samples=str(unlabelled))
    fails("needs --base_samples", stack_cfg, up)
    assert not (tmp_path / "o.npz.parts").exists()


def test_unconditional_model_guided_by_the_classifier(ck, tmp_path):
    uncond = sm.make_uncond(tmp_path / "ckpt")
    config = sm.load(sm.UNCOND)
    config.sampling.update(
        num_samples=8, batch_size=8, timestep_respacing=4, labels=(5, 9),
        classifier_checkpoint=str(ck["classifier_dir"]),
        classifier_config="configs/classifier64.py:tiny",
    )  # fmt: skip
    guided = sm.read_npz(sampling.run_sampling_job(config, str(uncond), str(tmp_path / "g.npz")))
    np.testing.assert_array_equal(guided["arr_1"], [5, 9] * 4)
    config.sampling.classifier_scale = 0.0
    with pytest.raises(ValueError, match="labels need a class-conditional model or a classifier"):
        sampling.run_sampling_job(config, str(uncond), str(tmp_path / "p.npz"))
    config.sampling.labels = "random"
    plain = sm.read_npz(sampling.run_sampling_job(config, str(uncond), str(tmp_path / "p.npz")))
    assert "arr_1" not in plain  # nothing to label: an unguided unconditional model
    assert np.abs(guided["arr_0"].astype(int) - plain["arr_0"].astype(int)).mean() > 1


def test_upsampling_stack_carries_the_labels_over(tmp_path):
    stack = sm.make_stack(tmp_path / "ckpt")
    base = stack["base_config"]
    base.sampling.update(num_samples=6, batch_size=8, timestep_respacing=3, labels=(1, 2, 3))
    base_out = sampling.run_sampling_job(base, str(stack["base_dir"]), str(tmp_path / "b.npz"))
    up = stack["upsampler_config"]
    up.sampling.update(num_samples=6, batch_size=8, timestep_respacing=3)
    out = sampling.run_sampling_job(
        up, str(stack["upsampler_dir"]), str(tmp_path / "up.npz"), base_samples=str(base_out)
    )
    got = sm.read_npz(out)
    assert got["arr_0"].shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(got["arr_1"], [1, 2, 3, 1, 2, 3])
    manifest = json.loads((pathlib.Path(str(out) + ".parts") / "manifest.json").read_text())
    assert manifest["base_samples"] == str(base_out)


def _workdir(directory: pathlib.Path, config, params, ema) -> str:
    """A training workdir as launch.train writes it (params, EMA copy, config)."""
    import orbax.checkpoint as ocp

    from diffusion_jax.checkpoints.workdir import array_save, create_manager, ema_key

    config.training.ema_rates = (0.9999,)
    (directory).mkdir(parents=True)
    (directory / "config.json").write_text(config.to_json_best_effort())
    manager = create_manager(directory, keep=1)
    manager.save(
        5,
        args=ocp.args.Composite(
            params=array_save(params),
            ema=array_save({ema_key(0.9999): ema}),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    return str(directory)


def test_training_workdir_samples_with_its_ema_copy(ck, tmp_path):
    import jax

    from diffusion_jax import checkpoints

    params, _ = checkpoints.restore_params(ck["base_dir"])
    raw = jax.tree.map(lambda p: np.asarray(p) * 0.9, params)
    config = job_config(ck, num_samples=8, classifier_scale=0.0)
    workdir = _workdir(tmp_path / "run", sm.load(sm.BASE), raw, params)
    from_ema = sm.read_npz(sampling.run_sampling_job(config, workdir, str(tmp_path / "e.npz")))
    converted = sm.read_npz(
        sampling.run_sampling_job(config, str(ck["base_dir"]), str(tmp_path / "c.npz"))
    )
    np.testing.assert_array_equal(from_ema["arr_0"], converted["arr_0"])  # the EMA copy
    config.sampling.use_ema = False
    from_raw = sm.read_npz(sampling.run_sampling_job(config, workdir, str(tmp_path / "r.npz")))
    assert np.abs(from_raw["arr_0"].astype(int) - converted["arr_0"].astype(int)).mean() > 1


def test_ddim_rows_use_the_papers_ddim_spacing():
    from diffusion_jax.diffusion import create_diffusion
    from diffusion_jax.diffusion.options import sampling_respacing

    config = sm.load(sm.BASE)
    config.sampling.update(method="ddim", timestep_respacing=25)
    assert sampling_respacing(config.sampling) == "ddim25"
    ddim = create_diffusion(config.diffusion, timestep_respacing="ddim25")
    np.testing.assert_array_equal(ddim.timestep_map, np.arange(0, 1000, 40))  # stride 40
    config.sampling.method = "ancestral"
    assert sampling_respacing(config.sampling) == 25  # section spacing, as the paper's 250


@pytest.fixture(scope="module")
def cfg_checkpoint(ck, tmp_path_factory):
    """The tiny base model with a null-class row, as training with label dropout leaves it."""
    from diffusion_jax import checkpoints

    params, _ = checkpoints.restore_params(ck["base_dir"])
    table = np.asarray(params["label_emb"]["embedding"])
    null_row = np.random.default_rng(0).normal(size=(1, table.shape[1])).astype(table.dtype)
    params["label_emb"]["embedding"] = np.concatenate([table, null_row])
    config = sm.load(sm.BASE)
    config.training.label_dropout = 0.1  # linked: model.label_dropout
    directory = tmp_path_factory.mktemp("cfg") / "base_cfg"
    checkpoints.save_params(directory, params, config)
    return str(directory)


def test_dpm_solver_with_both_guidances_is_the_same_on_8_and_1_devices(
    ck, cfg_checkpoint, tmp_path, monkeypatch
):
    import jax

    from diffusion_jax import parallel
    from diffusion_jax.diffusion import conditioning

    wrapped, original = [], conditioning.classifier_free_model_fn

    def recording(model_fn, scale, null_label):
        wrapped.append(null_label)
        return original(model_fn, scale, null_label)

    monkeypatch.setattr(conditioning, "classifier_free_model_fn", recording)

    config = job_config(
        ck, num_samples=8, method="dpm_solver++", timestep_respacing=4, cfg_scale=3.0
    )
    config.training.label_dropout = 0.1
    config.mesh.fsdp = 4  # the job's mesh: data=2 x fsdp=4, the batch split over both
    eight = sm.read_npz(sampling.run_sampling_job(config, cfg_checkpoint, str(tmp_path / "8.npz")))
    mesh = parallel.create_mesh(jax.devices()[:1])
    one = sampling.run_sampling_job(config, cfg_checkpoint, str(tmp_path / "1.npz"), mesh=mesh)
    one = sm.read_npz(one)
    np.testing.assert_array_equal(eight["arr_1"], one["arr_1"])
    diff = np.abs(eight["arr_0"].astype(int) - one["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # Both programs were built with classifier-free guidance towards the null class 1000
    # (traced once each; the combination itself is tested in test_classifier_free_guidance).
    assert wrapped == [1000, 1000]
    assert np.abs(eight["arr_0"][0].astype(int) - eight["arr_0"][1].astype(int)).mean() > 5
    # The scale reached the model: the job's images are the sampler's at cfg_scale=3 (the
    # loop called directly with the guided model_fn, sample i's key fold_in(job_key, i)),
    # and not its plain conditional ones (scale 1).
    want, plain = direct_samples(config, cfg_checkpoint, ck, eight["arr_1"], (3.0, 1.0))
    diff = np.abs(eight["arr_0"].astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    assert np.abs(eight["arr_0"].astype(int) - plain.astype(int)).mean() > 1


def direct_samples(config, checkpoint, ck, labels, scales):
    """The diffusion's loop on one device, without the job, at each classifier-free scale."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax import checkpoints, models, parallel
    from diffusion_jax.diffusion import classifier_cond_fn, classifier_free_model_fn
    from diffusion_jax.diffusion.conditioning import Conditioning
    from diffusion_jax.sampling import inputs, sharded

    params, _ = checkpoints.restore_params(checkpoint)
    classifier_config = inputs.read_saved_config(ck["classifier_dir"], "classifier")["model"]
    classifier_params, _ = checkpoints.restore_params(ck["classifier_dir"])
    classifier = models.create_classifier(classifier_config)
    program = sharded.sampling_program(config, parallel.create_mesh(jax.devices()[:1]))
    model_fn = jax.tree_util.Partial(program.model.apply, {"params": params})
    cond_fn = classifier_cond_fn(
        classifier.apply, {"params": classifier_params}, float(config.sampling.classifier_scale)
    )
    key = sharded.job_key(config.seed)
    rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(len(labels)))
    y = jnp.asarray(labels, jnp.int32)
    out = []
    for scale in scales:
        guided = classifier_free_model_fn(model_fn, scale, 1000) if scale != 1.0 else model_fn
        x = program.diffusion.sample_loop(
            guided, (len(labels), 16, 16, 3), rngs, program.options,
            cond=Conditioning(model_kwargs={"y": y}, cond_fn=cond_fn, cond_kwargs={"y": y}),
        )["sample"]  # fmt: skip
        out.append(np.asarray(sharded.to_uint8(x)))
    return out


def test_cfg_scale_needs_a_null_class_and_methods_are_checked(ck, tmp_path, no_device_work):
    base, out = str(ck["base_dir"]), str(tmp_path / "o.npz")
    for match, config in (
        (
            r"sampling\.cfg_scale=3\.0 \(classifier-free guidance\) needs a class-conditional "
            r"model trained with training\.label_dropout > 0; --checkpoint=.* has no null class",
            job_config(ck, cfg_scale=3.0),
        ),
        (r"sampling\.method: unknown value 'plms'", job_config(ck, method="plms")),
    ):
        with pytest.raises(ValueError, match=match) as info:
            sampling.run_sampling_job(config, base, out)
        assert "\n" not in str(info.value)
    # The config must say the checkpoint has a null row (and vice versa).
    with_null = job_config(ck)
    with_null.training.label_dropout = 0.1
    with pytest.raises(ValueError, match=r"checkpoint has model\.label_dropout=0"):
        sampling.run_sampling_job(with_null, base, out)
