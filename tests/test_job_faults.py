"""Faults of the jobs that write results over time, through the one resumable-job layer.

Each test reproduces a fault the issue (18) found, with device work replaced by a fake
whose images say which checkpoint drew them (so a mix of checkpoints is visible), and
checks the fix against an independent expectation: what an uninterrupted run of the
same inputs writes, or the figures a fresh computation gives.

- The sampling job: a checkpoint that changed under a killed job (training advanced the
  workdir) is refused by name, or redrawn whole with `redo_changed`, never mixed; a
  part file cut short is redrawn with a warning naming it; the manifest is written only
  after every check; another device count finds the finished job; a second job on the
  same output is refused naming the holder.
- The FID table: a row is computed again when its sample count, steps, reference,
  feature weights or checkpoint change, and its note describes the figures under it;
  `converted/` is made again from another --checkpoint_dir; the workdir is locked.
- The sweep and the quickstart: a locked workdir is refused naming the holder; the
  sweep's identity holds the checkpoint's step and content.
- The layer itself: field diffs, identities of files and training workdirs.
"""

import json
import os
import socket
import time
import types

import _sampling_models as sm
import jax
import numpy as np
import pytest

from diffusion_jax import locks, parallel, resumable
from diffusion_jax.checkpoints import workdir as workdir_lib
from diffusion_jax.jobs import fid_table, sweep
from diffusion_jax.sampling import job as job_lib

# ----- a sampling job whose images name their checkpoint -------------------------------


def fake_checkpoint(directory, version: int = 1) -> str:
    """A converted-checkpoint directory: the config (what the checks read) and a version
    file standing for the parameters (what the fake sampler reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(sm.load(sm.BASE).to_json_best_effort())
    write_version(directory, version)
    return str(directory)


def write_version(directory, version: int) -> None:
    path = directory / "params.version"
    path.write_text(str(version))
    stamp = time.time_ns() + version * 10**9  # another content identity, whatever the clock
    os.utime(path, ns=(stamp, stamp))


class FakeSampler:
    """Images filled with (index + 10 * checkpoint version) % 256: a mix shows."""

    def __init__(self, checkpoint, die_at=None):
        with open(os.path.join(checkpoint, "params.version")) as f:
            self.version = int(f.read())
        self.die_at, self.calls = die_at, []

    def sample(self, indices, labels, low_res):
        self.calls.append(int(indices[0]))
        if self.die_at is not None and len(self.calls) > self.die_at:
            raise KeyboardInterrupt("killed")
        value = (np.asarray(indices) + 10 * self.version) % 256
        images = np.broadcast_to(value[:, None, None, None], (len(indices), 16, 16, 3))
        return np.ascontiguousarray(images, np.uint8), np.asarray(indices)


@pytest.fixture()
def fake_device(monkeypatch):
    """Replaces the restore + compile step of the job by FakeSampler; returns its log."""
    made = []
    fake_device_die_at.clear()

    def create(plan, checkpoint, mesh):
        made.append(FakeSampler(checkpoint, die_at=fake_device_die_at.pop(0)))
        return made[-1]

    monkeypatch.setattr(job_lib, "_create_sampler", create)
    return made


fake_device_die_at: list = []


def job_config(**fields):
    config = sm.load(sm.BASE)
    config.sampling.update(dict(num_samples=20, batch_size=8, classifier_scale=0.0, **fields))
    return config


def expected_images(version: int, n: int = 20) -> np.ndarray:
    value = (np.arange(n) + 10 * version) % 256
    return np.broadcast_to(value[:, None, None, None], (n, 16, 16, 3)).astype(np.uint8)


def run_job(checkpoint, out, *, die_at=None, **kwargs):
    fake_device_die_at.append(die_at)
    return job_lib.run_sampling_job(job_config(), checkpoint, str(out), **kwargs)


def test_a_checkpoint_changed_under_a_killed_job_is_refused_by_name_never_mixed(
    tmp_path, fake_device
):
    checkpoint = fake_checkpoint(tmp_path / "ckpt", version=1)
    out = tmp_path / "s.npz"
    with pytest.raises(KeyboardInterrupt):
        run_job(checkpoint, out, die_at=1)  # batch 0 drawn from version 1, then killed
    write_version(tmp_path / "ckpt", 2)  # meanwhile training saved a newer step
    with pytest.raises(ValueError, match=r"other inputs: checkpoint_identity\.content \(was"):
        run_job(checkpoint, out)
    assert not out.exists()
    # A job that owns its output draws every sample again from the new checkpoint.
    run_job(checkpoint, out, redo_changed=True)
    np.testing.assert_array_equal(sm.read_npz(out)["arr_0"], expected_images(2))
    assert fake_device[-1].calls == [0, 8, 16]


def test_a_part_file_cut_short_is_redrawn_naming_it(tmp_path, fake_device, caplog):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "s.npz"
    with pytest.raises(KeyboardInterrupt):
        run_job(checkpoint, out, die_at=2)
    part = tmp_path / "s.npz.parts" / "000001.p0000.npz"
    part.write_bytes(part.read_bytes()[:100])  # a write cut short
    for _ in range(2):  # and on every later run: no BadZipFile traceback
        run_job(checkpoint, out)
    assert fake_device[1].calls == [8, 16] and len(fake_device) == 2
    assert f"{part} is damaged" in caplog.text
    np.testing.assert_array_equal(sm.read_npz(out)["arr_0"], expected_images(1))


def test_the_manifest_is_written_only_after_every_check(tmp_path, monkeypatch):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")

    def bad_parameters(plan, checkpoint, mesh):
        raise ValueError("its parameters do not have the shapes config.model describes")

    monkeypatch.setattr(job_lib, "_create_sampler", bad_parameters)
    with pytest.raises(ValueError, match=r"shapes config\.model describes"):
        job_lib.run_sampling_job(job_config(), checkpoint, str(tmp_path / "s.npz"))
    assert not (tmp_path / "s.npz.parts").exists()  # nothing to refuse the fixed command


def test_a_finished_job_is_found_on_another_device_count(tmp_path, fake_device):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "s.npz"
    run_job(checkpoint, out)
    one = parallel.create_mesh(jax.devices()[:1])
    run_job(checkpoint, out, mesh=one)  # before: refused ('devices' changed)
    assert len(fake_device) == 1
    np.testing.assert_array_equal(sm.read_npz(out)["arr_0"], expected_images(1))


def hold_lock(directory, job="another job"):
    """A lock held by a live process of this host (pid 1) that is not this one."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "job": job, "started": "today"}
    (directory / locks.LOCK_FILE).write_text(json.dumps(record))


def test_a_second_job_on_the_same_output_is_refused_naming_the_holder(tmp_path, fake_device):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    hold_lock(tmp_path / "s.npz.parts", job="the sampling job of s.npz")
    with pytest.raises(locks.WorkdirLockedError, match=r"in use by the sampling job of s\.npz"):
        run_job(checkpoint, tmp_path / "s.npz")
    assert not fake_device


# ----- the FID table ---------------------------------------------------------------


@pytest.fixture()
def table(tmp_path, monkeypatch):
    """imagenet128's ADM row on a fake checkpoint, a fake sampler and a fake evaluator
    whose FID counts its calls; returns (settings maker, evaluations, sampling calls)."""
    checkpoints = tmp_path / "released"
    fake_checkpoint(checkpoints / "imagenet128")
    (tmp_path / "ref.npz").write_bytes(b"reference batch v1")
    (tmp_path / "w.npz").write_bytes(b"inception weights v1")
    evaluations, sampled, redo = [], [], []

    def sample(config, checkpoint, out, **kwargs):
        sampled.append((int(config.sampling.num_samples), config.sampling.timestep_respacing))
        redo.append(kwargs.get("redo_changed"))
        return out

    def evaluate(reference, samples):
        evaluations.append(reference)
        return types.SimpleNamespace(**{m: float(len(evaluations)) for m in fid_table.METRICS})

    monkeypatch.setattr(fid_table, "run_sampling_job", sample)

    def settings(**changes):
        fields = dict(
            checkpoint_dir=str(checkpoints), reference=str(tmp_path / "ref.npz"),
            workdir=str(tmp_path / "out"), evaluate=evaluate, num_samples=8, steps=4,
            variant="tiny", rows=("ADM",), feature_weights=str(tmp_path / "w.npz"),
        )  # fmt: skip
        return fid_table.TableSettings(**{**fields, **changes})

    yield settings, evaluations, sampled, tmp_path
    assert all(redo)  # the table owns its samples: changed inputs draw them again


def figure(markdown: str) -> str:
    return markdown.split("| ADM | imagenet128 | ")[1].split(" / ")[0]


def test_a_table_row_is_computed_again_when_an_input_changes(table):
    settings, evaluations, sampled, tmp = table
    assert figure(fid_table.run_table("imagenet128", settings())) == "1.00"
    assert figure(fid_table.run_table("imagenet128", settings())) == "1.00"  # kept
    assert len(evaluations) == 1
    # Each change below used to return the first figure under the new flags' note.
    changes = [
        ("num_samples", lambda: settings(num_samples=16)),
        ("steps", lambda: settings(num_samples=16, steps=6)),
        ("reference", lambda: settings(num_samples=16, steps=6)),
        ("features", lambda: settings(num_samples=16, steps=6)),
        ("checkpoint", lambda: settings(num_samples=16, steps=6)),
    ]
    for i, (what, make) in enumerate(changes, start=2):
        if what == "reference":
            (tmp / "ref.npz").write_bytes(b"another reference batch")
        if what == "features":
            (tmp / "w.npz").write_bytes(b"other weights")
        if what == "checkpoint":
            write_version(tmp / "released" / "imagenet128", 7)
        markdown = fid_table.run_table("imagenet128", make())
        assert figure(markdown) == f"{i}.00", what
        assert len(evaluations) == i, what
    assert "16 samples per row, 6 steps" in markdown
    assert sampled == [(8, 4), (16, 4), (16, 6), (16, 6), (16, 6), (16, 6)]


def test_converted_checkpoints_follow_the_checkpoint_dir(tmp_path, monkeypatch):
    from diffusion_jax.checkpoints import openai

    conversions = []

    def convert(pt, config, directory):
        conversions.append(pt.read_bytes())
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(config.to_json_best_effort())

    monkeypatch.setattr(openai, "convert_to_orbax", convert)
    for name, content in (("a", b"release A"), ("b", b"release B")):
        (tmp_path / name).mkdir()
        (tmp_path / name / fid_table.RELEASED["imagenet128"]).write_bytes(content)
    settings = fid_table.TableSettings(
        checkpoint_dir=str(tmp_path / "a"), reference="", workdir=str(tmp_path / "out"),
        evaluate=None, variant="tiny",
    )  # fmt: skip
    fid_table._checkpoint("imagenet128", settings)
    fid_table._checkpoint("imagenet128", settings)  # cached
    settings.checkpoint_dir = str(tmp_path / "b")
    fid_table._checkpoint("imagenet128", settings)  # before: A's conversion reused
    assert conversions == [b"release A", b"release B"]


def test_a_second_table_on_the_workdir_is_refused_naming_the_holder(table):
    settings, evaluations, _, tmp = table
    hold_lock(tmp / "out", job="fid_table")
    with pytest.raises(locks.WorkdirLockedError, match=r"in use by fid_table \(host .*pid 1"):
        fid_table.run_table("imagenet128", settings())
    assert not evaluations


# ----- the sweep and the quickstart ----------------------------------------------------


def test_a_busy_sweep_or_quickstart_workdir_is_refused_naming_the_holder(tmp_path, monkeypatch):
    from configs import quickstart
    from diffusion_jax.quickstart import job as quickstart_job

    hold_lock(tmp_path / "q", job="quickstart")
    monkeypatch.setattr(quickstart_job, "_run_phases", lambda *a: pytest.fail("ran"))
    with pytest.raises(locks.WorkdirLockedError, match=r"in use by quickstart"):
        quickstart_job.run_quickstart(quickstart.get_config(), tmp_path / "q")

    hold_lock(tmp_path / "sw", job="sweep")
    monkeypatch.setattr(sweep, "check_sampling_job", lambda *a, **k: None)
    monkeypatch.setattr(sweep, "_run_points", lambda *a: pytest.fail("ran"))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    settings = sweep.SweepSettings(
        checkpoint=fake_checkpoint(tmp_path / "ckpt"), reference=str(tmp_path / "ref.npz"),
        workdir=str(tmp_path / "sw"), scales=(1.0,),
    )  # fmt: skip
    with pytest.raises(locks.WorkdirLockedError, match=r"in use by sweep"):
        sweep.run_sweep(sm.load(sm.BASE), settings)


def test_a_sweep_of_a_changed_checkpoint_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "ckpt"
    settings = sweep.SweepSettings(
        checkpoint=fake_checkpoint(ckpt), reference="", workdir=str(tmp_path), scales=(1.0,)
    )
    config = sm.load(sm.BASE)
    sweep._check_workdir(tmp_path, sweep._identity(config, settings, None))
    sweep._check_workdir(tmp_path, sweep._identity(config, settings, None))  # same: fine
    write_version(ckpt, 3)
    with pytest.raises(ValueError, match=r"sweep of other inputs: checkpoint_identity\.content"):
        sweep._check_workdir(tmp_path, sweep._identity(config, settings, None))


# ----- the layer ---------------------------------------------------------------------


def test_differences_name_each_changed_field_with_both_values():
    saved = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "mesh": {"data": 8}}
    now = {"a": {"b": 2, "c": (1, 2)}, "e": None, "mesh": {"data": 1}}
    assert resumable.differences(saved, now, ignore=("mesh",)) == [
        "a.b (was: 1, now: 2)",
        "d (was: 'x', now: '<absent>')",
        "e (was: '<absent>', now: None)",
    ]
    implicit = lambda key, value: value is None  # noqa: E731
    assert resumable.differences(saved, now, ignore=("mesh", "d"), implicit=implicit) == [
        "a.b (was: 1, now: 2)"
    ]


def test_a_training_workdir_identity_names_its_newest_step_and_follows_it(tmp_path):
    from test_workdir_faults import CONFIG, fake_state

    from diffusion_jax.training import checkpointing

    POSITION = [{"epoch": 0, "position": 0, "skipped": 0}]
    manager = workdir_lib.create_manager(tmp_path, keep=5)
    checkpointing.save(manager, fake_state(2), POSITION, json.dumps(CONFIG))
    checkpointing.finish_saves(manager)
    first = workdir_lib.checkpoint_identity(tmp_path)
    assert first["step"] == 2 and first == workdir_lib.checkpoint_identity(tmp_path)
    manager = workdir_lib.create_manager(tmp_path, keep=5)  # training resumed
    checkpointing.save(manager, fake_state(4), POSITION, json.dumps(CONFIG))
    checkpointing.finish_saves(manager)
    second = workdir_lib.checkpoint_identity(tmp_path)
    assert second["step"] == 4 and second["content"] != first["content"]


def test_corrupt_job_state_names_its_file(tmp_path, fake_device, table):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    run_job(checkpoint, tmp_path / "s.npz")
    manifest = tmp_path / "s.npz.parts" / job_lib.MANIFEST
    manifest.write_text('{"sampling": ')
    with pytest.raises(ValueError, match=rf"{manifest} is corrupt or truncated"):
        run_job(checkpoint, tmp_path / "s.npz")

    settings, _, _, tmp = table
    fid_table.run_table("imagenet128", settings())
    result = tmp / "out" / "results" / "imagenet128_adm.json"
    result.write_text("{")
    with pytest.raises(ValueError, match=rf"{result} is corrupt or truncated"):
        fid_table.run_table("imagenet128", settings())
    record = tmp_path / "sweep.json"
    record.write_text("[")
    with pytest.raises(ValueError, match=rf"{record} is corrupt or truncated"):
        sweep._check_workdir(tmp_path, {"config": {}})


def test_a_damaged_newest_step_of_a_workdir_falls_back_and_a_rerun_finds_the_job(
    tmp_path, monkeypatch, caplog
):
    from test_workdir_faults import fake_state

    from diffusion_jax.training import checkpointing

    config_json = sm.load(sm.BASE).to_json_best_effort()
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text(config_json)
    manager = workdir_lib.create_manager(workdir, keep=5)
    for step in (2, 4):
        position = [{"epoch": 0, "position": step, "skipped": 0}]
        checkpointing.save(manager, fake_state(step), position, config_json)
    checkpointing.finish_saves(manager)
    made = []

    def create(plan, checkpoint, mesh):  # step 4's arrays are cut short on disk
        if plan.checkpoint_step == 4:
            where = workdir / workdir_lib.CHECKPOINTS_DIR / "4"
            raise workdir_lib.DamagedCheckpointError(f"checkpoint {where} is damaged: cut short")
        (workdir / "params.version").write_text(str(plan.checkpoint_step))
        made.append(FakeSampler(checkpoint))
        return made[-1]

    monkeypatch.setattr(job_lib, "_create_sampler", create)
    out = tmp_path / "s.npz"
    job_lib.run_sampling_job(job_config(), str(workdir), str(out))
    np.testing.assert_array_equal(sm.read_npz(out)["arr_0"], expected_images(2))  # step 2's
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert warnings and "checkpoints/4 is damaged" in warnings[0]
    assert "sampling from step 2, instead" in warnings[0]
    manifest = json.loads((tmp_path / "s.npz.parts" / job_lib.MANIFEST).read_text())
    assert manifest["checkpoint_identity"]["step"] == 2
    # The same command again: the finished job is found (no refusal, nothing redrawn).
    job_lib.run_sampling_job(job_config(), str(workdir), str(out))
    assert len(made) == 1 and made[0].calls == [0, 8, 16]
