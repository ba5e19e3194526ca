"""Faults in a workdir and bad input, each a one-line error or a warned fallback, in process.

Damaged checkpoints fall back to the newest readable one; a failed save raises at once and
leaves no thread behind; one job per workdir (a lock naming its holder); files that replace
others are written atomically; JSON state that does not parse names its file; labels
outside the model's classes and optimiser / guidance values out of range are refused
before anything is written; non-finite FID statistics are refused naming the file.
"""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from configs import quickstart
from diffusion_jax import files, locks
from diffusion_jax.checkpoints import restore_params
from diffusion_jax.checkpoints.workdir import CHECKPOINTS_DIR, create_manager
from diffusion_jax.training import checkpointing, checks, train
from diffusion_jax.training.state import TrainState
from diffusion_jax.training.writers import METRICS_FILE, JsonlWriter, read_metrics

# ----- checkpoints: a damaged latest step ---------------------------------------------


def fake_state(step):
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.full((4, 3), float(step))},
        opt_state={"m": jnp.full((3,), float(step))},
        ema={"ema_0_9": {"w": jnp.full((4, 3), step + 0.5)}},
        sampler={},
        nonfinite=jnp.zeros((2,), jnp.int32),
        rng=jax.random.key_data(jax.random.key(0)),
    )


CONFIG = {"training": {"ema_rates": [0.9]}, "model": {"kind": "unet"}}


@pytest.fixture(scope="module")
def saved_workdir(tmp_path_factory):
    """A workdir with complete checkpoints at steps 2 and 4 (training's layout)."""
    workdir = tmp_path_factory.mktemp("saved")
    manager = create_manager(workdir, keep=5)
    for step in (2, 4):
        position = [{"epoch": 0, "position": step, "skipped": 0}]
        checkpointing.save(manager, fake_state(step), position, json.dumps(CONFIG))
    checkpointing.finish_saves(manager)
    return workdir


def test_a_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    # The quickstart's default workdir is relative; Orbax's array writer refuses one.
    monkeypatch.chdir(tmp_path)
    manager = create_manager("relative_run", keep=2)
    checkpointing.save(manager, fake_state(3), [{"epoch": 0, "position": 3}], json.dumps(CONFIG))
    checkpointing.finish_saves(manager)
    params, _ = restore_params("relative_run")
    np.testing.assert_array_equal(params["w"], np.full((4, 3), 3.0))
    assert (tmp_path / "relative_run" / CHECKPOINTS_DIR / "3").is_dir()


def copy_of(workdir, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(workdir, target)
    return target


def truncate_arrays(step_dir):
    """Truncates every data file of the params item (a copy cut short on disk)."""
    for root, _, names in os.walk(step_dir / "params"):
        for name in names:
            path = os.path.join(root, name)
            if "/d/" in path + "/" and os.path.basename(root) == "d":
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


DAMAGES = {
    "truncated_arrays": truncate_arrays,
    "missing_array_metadata": lambda d: (d / "params" / "_METADATA").unlink(),
    "missing_config": lambda d: (d / "config" / "metadata").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_restore_params_falls_back_from_a_damaged_latest_step(
    saved_workdir, tmp_path, damage, caplog
):
    workdir = copy_of(saved_workdir, tmp_path)
    DAMAGES[damage](workdir / CHECKPOINTS_DIR / "4")
    params, config = restore_params(workdir)
    np.testing.assert_array_equal(params["w"], np.full((4, 3), 2.0))  # step 2's
    # The EMA copy is read from a readable step: 4's when only its params are damaged.
    ema, _ = restore_params(workdir, ema_rate=0.9)
    want = 4.5 if damage == "missing_array_metadata" else 2.5
    np.testing.assert_array_equal(ema["w"], np.full((4, 3), want))
    assert config.training.ema_rates == [0.9]
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert warnings and all("\n" not in w for w in warnings)
    assert f"{workdir / CHECKPOINTS_DIR / '4'} is damaged" in warnings[0]
    assert "step 2, instead" in warnings[0]
    # The step asked for by name is not replaced by another: one line naming it.
    with pytest.raises(OSError, match=r"checkpoints/4 is damaged: ") as info:
        restore_params(workdir, step=4)
    assert "\n" not in str(info.value)


def test_no_readable_checkpoint_is_one_line_naming_the_directory(saved_workdir, tmp_path):
    workdir = copy_of(saved_workdir, tmp_path)
    for step in ("2", "4"):
        (workdir / CHECKPOINTS_DIR / step / "params" / "_METADATA").unlink()
    with pytest.raises(FileNotFoundError, match=r"no readable checkpoint in .*checkpoints: all 2"):
        restore_params(workdir)


def test_training_restore_skips_damaged_steps_and_sets_them_aside(saved_workdir, tmp_path):
    workdir = copy_of(saved_workdir, tmp_path)
    truncate_arrays(workdir / CHECKPOINTS_DIR / "4")
    manager = create_manager(workdir, keep=5)
    abstract = jax.eval_shape(lambda: fake_state(0))
    seen = []
    (state, positions, _), step = checkpointing.restore_newest(
        manager, abstract, check_config=lambda cfg, s: seen.append(s)
    )
    assert step == 2 and int(state.step) == 2 and positions[0]["position"] == 2
    np.testing.assert_array_equal(state.opt_state["m"], np.full((3,), 2.0))
    assert seen == [4, 2]  # the config is checked before each step's arrays are read
    checkpointing.set_aside_newer(manager, step)
    assert manager.all_steps() == [2]
    assert (workdir / checkpointing.DAMAGED_DIR / "4").is_dir()
    # The resumed run can save step 4 again.
    checkpointing.save(manager, fake_state(4), positions, json.dumps(CONFIG))
    checkpointing.finish_saves(manager)
    np.testing.assert_array_equal(restore_params(workdir)[0]["w"], np.full((4, 3), 4.0))

    # A config that differs is that error, not "damaged" (it is not caught).
    def refuse(cfg, s):
        raise ValueError("another config")

    manager = create_manager(workdir, keep=5)
    with pytest.raises(ValueError, match="another config"):
        checkpointing.restore_newest(manager, abstract, check_config=refuse)
    manager.close()


# ----- saves that fail ----------------------------------------------------------------


def unwritable_workdir(tmp_path):
    """checkpoints/ is a directory nobody can create anything in (root included)."""
    workdir = tmp_path / "ro"
    workdir.mkdir()
    (workdir / CHECKPOINTS_DIR).symlink_to("/proc/self/fdinfo")
    return workdir


def test_a_failed_save_raises_one_line_at_once_and_leaves_no_thread(tmp_path):
    workdir = unwritable_workdir(tmp_path)
    threads = set(threading.enumerate())
    manager = create_manager(workdir, keep=2)
    start = time.time()
    with pytest.raises(checkpointing.CheckpointSaveError) as info:
        checkpointing.save(manager, fake_state(2), [{}], json.dumps(CONFIG))
        checkpointing.finish_saves(manager)
    message = str(info.value)
    assert "\n" not in message and "step 2" in message and str(workdir) in message
    assert "writable" in message
    assert isinstance(info.value, OSError)  # launchers print it as one line
    checkpointing.abandon(manager, timeout_s=30)
    assert time.time() - start < 60
    # A closed event loop's executor threads exit on their own shortly after: give them
    # 10 s (a thread that would keep the process alive at exit never ends).
    left = [t for t in threading.enumerate() if t not in threads and not t.daemon]
    for thread in left:
        thread.join(10)
    assert not [t for t in left if t.is_alive()], left


# ----- the workdir lock -----------------------------------------------------------------


def test_a_second_job_is_refused_naming_the_holder_and_the_lock_is_released(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from diffusion_jax import locks\n"
            "with locks.workdir_lock(sys.argv[1], job='training'):\n"
            "    print('held', flush=True); time.sleep(60)\n",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(locks.WorkdirLockedError) as info,
            locks.workdir_lock(workdir, job="sampling"),
        ):
            pass
        message = str(info.value)
        assert "\n" not in message and f"pid {holder.pid}" in message
        assert "in use by training (host " in message and "started " in message
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (SIGKILL: no cleanup): its lock is stale and taken over.
    with locks.workdir_lock(workdir, job="sampling"):
        record = json.loads((workdir / locks.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["job"] == "sampling"
        with locks.workdir_lock(workdir, job="nested"):  # the holder may nest
            pass
        assert (workdir / locks.LOCK_FILE).exists()
    assert not (workdir / locks.LOCK_FILE).exists()


def test_the_lock_is_released_on_an_exception_and_an_empty_new_workdir_removed(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(RuntimeError), locks.workdir_lock(workdir, job="training"):
        assert (workdir / locks.LOCK_FILE).exists()
        raise RuntimeError("boom")
    assert not workdir.exists()
    with locks.workdir_lock(workdir, job="training", primary=False):  # other processes
        assert not (workdir / locks.LOCK_FILE).exists()


# ----- training refuses before writing anything --------------------------------------


def tiny_config(**fields):
    config = quickstart.get_config()
    config.model.image_size = config.data.image_size = 8
    config.model.num_channels = 32
    config.model.channel_mult = (1,)
    config.model.attention_resolutions = ()
    config.training.batch_size = 8
    config.training.num_steps = 2
    for key, value in fields.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def labelled_folder(root, num_classes):
    from PIL import Image

    root.mkdir()
    for c in range(num_classes):
        Image.new("RGB", (8, 8), (c * 10, 0, 0)).save(root / f"class{c:02d}_0.png")
    return root


def test_a_dataset_with_more_classes_than_the_model_is_refused_before_anything(tmp_path):
    data_dir = labelled_folder(tmp_path / "images", 16)
    config = tiny_config(
        **{"data.dataset": "folder", "data.data_dir": str(data_dir), "model.num_classes": 10}
    )
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        train(config, workdir)
    message = str(info.value)
    assert "\n" not in message
    assert "16 classes but model.num_classes=10" in message
    assert "--config.model.num_classes=16" in message
    assert not workdir.exists()  # no config.json, no lock, no empty directory


def test_labels_outside_the_classes_never_reach_a_device():
    from diffusion_jax.data.pipeline import check_labels

    check_labels(np.arange(10), 10)
    for bad in (10, -1):  # 10 = the classifier-free guidance null class
        with pytest.raises(ValueError, match=rf"label {bad}, outside \[0, model.num_classes=10\)"):
            check_labels(np.array([0, bad, 3]), 10)


def test_a_refused_resume_leaves_config_json_as_it_was(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = tiny_config()
    text = saved.to_json_best_effort(indent=2, sort_keys=True)
    (workdir / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"holds a run of another config: model.num_channels"):
        train(tiny_config(**{"model.num_channels": 64}), workdir)
    assert (workdir / "config.json").read_text() == text
    assert not (workdir / locks.LOCK_FILE).exists()


def test_a_busy_workdir_refuses_training_at_once(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / locks.LOCK_FILE).write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "job": "training", "started": "then"})
    )
    with pytest.raises(locks.WorkdirLockedError, match=r"in use by training \(host elsewhere"):
        train(tiny_config(), workdir)
    assert not (workdir / "config.json").exists()


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("optim.lr", -1e-4, "optim.lr must be >= 0, got -0.0001"),
        ("optim.b1", 1.5, "optim.b1 must be in [0, 1), got 1.5"),
        ("optim.b2", 1.0, "optim.b2 must be in [0, 1), got 1.0"),
        ("optim.eps", 0.0, "optim.eps must be > 0"),
        ("optim.warmup_steps", -5, "optim.warmup_steps must be an integer >= 0, got -5"),
        ("optim.weight_decay", -0.1, "optim.weight_decay must be >= 0"),
        ("optim.grad_clip_norm", 0.0, "optim.grad_clip_norm must be > 0"),
        ("sampling.classifier_scale", -1.0, "sampling.classifier_scale must be a finite number"),
        ("sampling.cfg_scale", -2.0, "sampling.cfg_scale must be a finite number >= 0"),
    ],
)
def test_optimiser_and_guidance_values_out_of_range_are_one_line(field, value, words):
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError) as info:
        checks.check_training_config(config, "diffusion", 8)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_valid_optimiser_and_guidance_values_pass():
    checks.check_training_config(
        tiny_config(**{"optim.grad_clip_norm": 1.0, "sampling.cfg_scale": 0.0}), "diffusion", 8
    )


# ----- atomic writes and JSON reads ---------------------------------------------------


def test_an_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), files.atomic_write(path, "wb") as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt  # killed mid-write
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary left
    files.write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}


def test_make_reference_overwrite_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    from diffusion_jax import evaluation
    from diffusion_jax.evaluation import evaluator

    path = tmp_path / "ref.npz"
    path.write_bytes(b"the old reference")

    class Dies(Exception):
        pass

    def features(images, model, **kwargs):
        n = sum(len(b) for b in images)
        return {"pool": np.eye(n, 4), "spatial": np.eye(n, 3), "logits": np.eye(n, 2)}

    def killed_savez(f, **arrays):
        f.write(b"partial")
        raise Dies

    monkeypatch.setattr(evaluator, "compute_features", features)
    monkeypatch.setattr(evaluator.np, "savez", killed_savez)
    images = [np.zeros((3, 8, 8, 3), np.uint8)]
    with pytest.raises(Dies):
        evaluation.write_reference_batch(images, path, inception_model=None)
    assert path.read_bytes() == b"the old reference"


def test_corrupt_json_state_names_its_file(tmp_path):
    from diffusion_jax.checkpoints import restore_config

    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text('{"model": {"image_size": 6')
    with pytest.raises(ValueError, match=r"config.json is corrupt or truncated: not valid JSON"):
        restore_config(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path / "config.json")):
        files.read_json(tmp_path / "config.json")
    # A training workdir's config.json: the resume is refused naming the file.
    with pytest.raises(ValueError, match=r"config.json is corrupt .* Use a new --workdir"):
        train(tiny_config(), tmp_path)


def test_a_metrics_line_cut_short_is_skipped_naming_the_file(tmp_path, caplog):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-line
    writer = JsonlWriter(epath.Path(tmp_path))
    writer.write_scalars(3, {"loss": 0.5})  # the resumed run starts a new line
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 0.5}]
    assert any(f"{path} line 2 is not JSON" in r.getMessage() for r in caplog.records)


# ----- FID statistics -----------------------------------------------------------------


def test_non_finite_reference_statistics_are_refused_naming_the_file(tmp_path):
    from diffusion_jax.evaluation.inception import POOL_DIM, SPATIAL_DIM
    from diffusion_jax.evaluation.npz_io import open_image_npz

    path = tmp_path / "ref.npz"
    mu = np.zeros(POOL_DIM)
    mu[3] = np.nan
    np.savez(
        path,
        arr_0=np.zeros((2, 8, 8, 3), np.uint8),
        mu=mu,
        sigma=np.eye(POOL_DIM),
        mu_s=np.zeros(SPATIAL_DIM),
        sigma_s=np.eye(SPATIAL_DIM),
    )
    with pytest.raises(ValueError, match=rf"{path}: the FID statistic 'mu' holds NaN"):
        open_image_npz(path).read_statistics()


def test_one_image_is_refused_before_the_inception_pass(tmp_path):
    from diffusion_jax.evaluation import evaluate_npz

    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(sample, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    # inception_model=None: any feature pass would fail with another error.
    with pytest.raises(ValueError, match=rf"{sample} has 1 image\(s\); FID needs at least 2"):
        evaluate_npz(ref, sample, None, split_size=1)


def test_compute_features_names_the_source_of_no_images():
    from diffusion_jax.evaluation import compute_features

    with pytest.raises(ValueError, match=r"got no images from samples\.npz"):
        compute_features(iter([]), _FakeInception(), source="samples.npz")


class _FakeInception:
    feature_keys = ("pool", "logits")

    def __init__(self):
        self.params, self.module = {}, None

    def apply(self, params, x):  # never reached: the iterator is empty
        raise AssertionError("no batch to apply to")


def test_a_classifier_size_hint_names_only_configs_that_exist():
    from configs import classifier64
    from diffusion_jax.sampling.inputs import check_classifier

    classifier = classifier64.get_config("tiny").model
    model = tiny_config().model  # 8x8 images: there is no configs/classifier8.py
    with pytest.raises(ValueError) as info:
        check_classifier(classifier, model, "--classifier_checkpoint")
    assert "configs/classifier8.py" not in str(info.value)
    assert "train one with model.image_size=8" in str(info.value)
    model.image_size = 128
    with pytest.raises(ValueError, match=r"use configs/classifier128\.py's"):
        check_classifier(classifier, model, "--classifier_checkpoint")
    assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", "configs/classifier128.py"))


def test_a_refused_first_run_leaves_no_empty_folders(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(ValueError), locks.workdir_lock(workdir, job="training"):
        (workdir / CHECKPOINTS_DIR).mkdir()  # what the checkpoint manager creates
        raise ValueError("refused")
    assert not workdir.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError), locks.workdir_lock(existing, job="training"):
        raise ValueError("refused")
    assert existing.is_dir()  # the user's directory is kept


def test_a_damaged_converted_checkpoint_is_one_line_naming_it(tmp_path):
    import ml_collections

    from diffusion_jax.checkpoints import save_params

    config = ml_collections.ConfigDict({"model": {"image_size": 8}})
    save_params(tmp_path / "conv", {"w": np.ones((64, 64), np.float32)}, config)
    for data_file in (tmp_path / "conv" / "params").glob("**/d/*"):
        data_file.write_bytes(b"")
    with pytest.raises(OSError) as info:
        restore_params(tmp_path / "conv")
    message = str(info.value)
    assert f"{tmp_path / 'conv' / 'params'} cannot be read: " in message
    assert "\n" not in message and "tensorstore_spec" not in message


def test_a_background_save_failure_is_raised_at_the_next_check(saved_workdir, tmp_path):
    manager = create_manager(copy_of(saved_workdir, tmp_path), keep=5)
    checkpointing.check_saves(manager)  # nothing failed: no error

    def failed():
        raise OSError(28, "No space left on device")

    manager.check_for_errors = failed  # what Orbax raises for a failed background write
    with pytest.raises(checkpointing.CheckpointSaveError, match=r"No space left on device\]?; the"):
        checkpointing.check_saves(manager)
    checkpointing.abandon(manager)
