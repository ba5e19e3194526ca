"""Training features: fine-tuning starts, bad input (one line, before any compile, nothing
lost), linked config facts, upsampler training, in-training samples == the sampling
job's and in-training FID == the evaluator's.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import imagenet64, quickstart, upsample64_256
from diffusion_jax import parallel
from diffusion_jax.checkpoints import restore_params, save_params
from diffusion_jax.training import checks, ema_key, in_training_eval, loop, train

REPO = Path(__file__).resolve().parents[1]


def tiny(num_steps=2, **training):
    config = imagenet64.get_config("tiny")
    config.data.dataset = "mnist_5k"
    config.training.update(num_steps=num_steps, log_every=1, checkpoint_every=num_steps)
    config.training.update(training)
    return config


def base_config(num_steps=2):
    # Moves far from the initialisation in 2 steps, EMA included.
    config = tiny(num_steps=num_steps, ema_rates=(0.5,))
    config.optim.lr = 1e-2
    return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base")
    state = train(base_config(), workdir)
    return workdir, jax.device_get(state)


# ----- fine-tuning --------------------------------------------------------------------


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("source", ["workdir", "converted"])
def test_init_from_starts_from_those_parameters_with_fresh_optimiser(base_run, tmp_path, source):
    base_dir, base_state = base_run
    if source == "workdir":
        start, want = base_dir, base_state.ema[ema_key(0.5)]
        overrides = {"init_from": str(base_dir), "init_from_ema_rate": 0.5}
    else:
        params, config = restore_params(base_dir)
        start = save_params(tmp_path / "converted", params, config)
        want = base_state.params
        overrides = {"init_from": str(start)}
    config = tiny(num_steps=1, **overrides)
    config.optim.lr = 1e-5
    state = jax.device_get(train(config, tmp_path / "finetune"))
    # One fresh Adam step from `want` moves each parameter by at most lr (first step:
    # |m / sqrt(v)| = 1), while a random start is far away.
    assert _max_diff(state.params, want) <= 1e-5 * 1.01
    fresh = jax.device_get(loop.create_setup(config, parallel.create_mesh(), "diffusion").init())
    assert _max_diff(fresh.params, want) > 1e-2
    assert int(state.opt_state[0][0].count) == 1  # fresh optimiser state (Adam count)
    assert int(state.step) == 1


def test_init_from_a_checkpoint_of_another_architecture_is_refused(base_run, tmp_path):
    base_dir, _ = base_run
    config = tiny(init_from=str(base_dir))
    config.model.num_channels = 64
    with pytest.raises(ValueError, match=r"training\.init_from=.*has shape .* model\.\* fields"):
        train(config, tmp_path / "w")


# ----- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "training.batch_size",
            12,
            r"training\.batch_size=12 must be a positive multiple of the device count \(8\)",
        ),
        ("training.microbatch", 12, r"training\.microbatch=12 must divide training\.batch_size"),
        ("training.num_steps", 0, r"training\.num_steps must be positive"),
        ("training.ema_rates", (1.5,), r"training\.ema_rates must lie in \(0, 1\)"),
        ("training.schedule_sampler", "importance", r"training\.schedule_sampler must be one of"),
        (
            "data.class_cond",
            False,
            r"data\.class_cond=False disagrees with model\.num_classes=1000",
        ),
        (
            "training.init_from",
            "/nonexistent/run",
            r"training\.init_from='/nonexistent/run' does not exist",
        ),
        (
            "training.eval_reference",
            "/nonexistent/ref.npz",
            r"training\.eval_reference=.* does not exist",
        ),
    ],
)
def test_bad_config_is_one_error_before_anything_is_written(tmp_path, field, value, message):
    config = tiny(eval_every=10)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        train(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_data_problems_are_named(tmp_path):
    config = tiny()
    config.data.dataset = "folder"
    config.data.class_cond = False
    config.model.num_classes = None
    config.data.data_dir = str(tmp_path / "missing")
    with pytest.raises((ValueError, FileNotFoundError), match="missing"):
        train(config, tmp_path / "w1")
    (tmp_path / "empty").mkdir()
    config.data.data_dir = str(tmp_path / "empty")
    with pytest.raises((ValueError, FileNotFoundError), match="empty"):
        train(config, tmp_path / "w2")


def test_a_workdir_of_another_config_is_refused_and_kept(base_run, tmp_path):
    base_dir, _ = base_run
    before = {p: p.read_bytes() for p in base_dir.rglob("*") if p.is_file()}
    config = base_config()
    config.optim.lr = 3e-4
    with pytest.raises(
        ValueError, match=r"holds a run of another config: optim\.lr \(run: 0\.01, now: 0\.0003\)"
    ):
        train(config, base_dir)
    after = {p: p.read_bytes() for p in base_dir.rglob("*") if p.is_file()}
    assert after == before
    # Fields that may change on resume (how long, how often) are accepted: the run
    # continues from its checkpoint to the new end.
    longer = base_config(num_steps=3)
    state = train(longer, base_dir)
    assert int(state.step) == 3
    assert json.loads((base_dir / "config.json").read_text())["training"]["num_steps"] == 3


def test_launcher_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/imagenet64.py:tiny",
            "--config.training.batch_size=12",
            f"--workdir={tmp_path / 'w'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training.batch_size=12" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


# ----- config facts in one place ------------------------------------------------------


def test_shared_facts_are_linked():
    config = quickstart.get_config()
    config.data.image_size = 24
    assert config.model.image_size == 24
    config.model.learn_sigma = False
    assert config.diffusion.learn_sigma is False
    sr = upsample64_256.get_config()
    sr.model.image_size = 128
    assert sr.data.image_size == 128


def test_kind_of_model_picks_the_launcher():
    config = imagenet64.get_config("tiny")
    config.model.kind = "classifier"
    with pytest.raises(ValueError, match=r"launch\.train_classifier, not launch\.train"):
        checks.check_training_config(config, "diffusion", 8)


# ----- upsampler ----------------------------------------------------------------------


def test_upsampler_trains_on_low_res_from_the_pipeline(tmp_path):
    config = upsample64_256.get_config("tiny")  # 32x32 from 8x8
    config.data.dataset = "mnist_5k"
    config.training.update(num_steps=2, log_every=1, checkpoint_every=2, sample_every=2)
    config.training.sample_grid_size = 8
    config.training.sample_steps = 2
    state = train(config, tmp_path)
    assert int(state.step) == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert (tmp_path / "samples" / "step_00000002.png").exists()
    params, _ = restore_params(tmp_path)
    assert params["input_blocks_0"]["layers_0"]["kernel"].shape[-2] == 6  # x_t + upsampled low_res


# ----- in-training FID ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_setup(tmp_path_factory):
    import torch
    from test_inception import build_random_fid_inception

    directory = tmp_path_factory.mktemp("fid")
    weights = directory / "random_inception.pth"
    torch.save(build_random_fid_inception().state_dict(), weights)
    ref = directory / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), np.uint8))
    return weights, ref


@pytest.mark.parametrize("method, steps", [("ancestral", 4), ("ddim", 25), ("dpm_solver++", 20)])
def test_in_training_samples_and_fid_equal_the_sampling_job_and_the_evaluator(
    base_run, fid_setup, tmp_path, method, steps
):
    from diffusion_jax import evaluation
    from diffusion_jax.evaluation import compute_features, compute_statistics, load_inception
    from diffusion_jax.sampling import run_sampling_job

    base_dir, _ = base_run
    weights, ref = fid_setup
    config = tiny(eval_every=1, eval_num_samples=12, eval_reference=str(ref), ema_rates=(0.5,))
    config.training.inception_weights = str(weights)
    config.sampling.update(num_samples=12, batch_size=8, method=method, timestep_respacing=steps)
    evaluator = in_training_eval._FidEvaluator(config, parallel.create_mesh())
    # The workdir's latest EMA copy (another test of this module trains base_dir on).
    params, _ = restore_params(base_dir, ema_rate=0.5)
    images = evaluator.samples(params)
    # launch.sample's library path on the training workdir (its EMA copy, rate 0.5).
    job = np.load(run_sampling_job(config, str(base_dir), str(tmp_path / "job.npz")))["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (12, 16, 16, 3)
    np.testing.assert_array_equal(images, job)
    assert len(np.unique(images.reshape(12, -1), axis=0)) == 12  # per-sample keys
    if method != "ddim":
        return  # the Frechet distance does not depend on the sampler
    inception = load_inception(weights)

    def stats(x):
        return compute_statistics(compute_features(x, inception, batch_size=16)["pool"])

    want = evaluation.frechet_distance(*stats(job), *stats(np.load(ref)["arr_0"]))
    assert evaluator.frechet(images) == pytest.approx(want, rel=1e-4)
    assert want > 0
