"""End to end through `python -m launch.train`: killed and resumed == uninterrupted (bit
for bit), preemption (SIGTERM) checkpoints and stops, a half-written checkpoint is
ignored, a damaged latest checkpoint falls back to the one before it, 2 processes x 4
devices (data=2 x fsdp=4) == 1 process x 8 devices (data=8), bad input fails in one line.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import multiprocess
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import imagenet64
from diffusion_jax.checkpoints import restore_params
from diffusion_jax.checkpoints.workdir import (
    CHECKPOINTS_DIR,
    array_restore,
    create_manager,
    saved_target,
)
from diffusion_jax.training import train

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 24
OVERRIDES = {
    "data.dataset": "mnist_5k",
    "training.num_steps": NUM_STEPS,
    "training.checkpoint_every": 6,
    "training.log_every": 3,
    "training.ema_rates": (0.9,),
    "training.schedule_sampler": "loss-second-moment",
    "model.dropout": 0.1,  # dropout keys are part of what must resume exactly
    # Adam's update g / (sqrt(v) + eps) is sign-like for small gradients at eps=1e-8,
    # so cross-process rounding of a near-zero gradient would flip whole updates; with
    # eps = 1 the update is smooth in the gradient and 2 processes == 1 can be checked
    # tightly (the kill/resume check is bit for bit either way).
    "optim.eps": 1.0,
    "optim.lr": 1e-2,
    # Under mesh.fsdp > 1 the 43 arrays of >= 4096 elements are sharded (the default
    # 2**16 would shard only two of this tiny model's).
    "training.fsdp_min_size": 4096,
}


def tiny_config():
    config = imagenet64.get_config("tiny")
    for key, value in OVERRIDES.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def cli_args(workdir):
    args = ["--config=configs/imagenet64.py:tiny", f"--workdir={workdir}"]
    for key, value in OVERRIDES.items():
        text = f"({','.join(map(str, value))},)" if isinstance(value, tuple) else str(value)
        args.append(f"--config.{key}={text}")
    return args


def start_train(workdir, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", *cli_args(workdir), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def complete_steps(workdir):
    root = Path(workdir) / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def wait_for_checkpoint(proc, workdir, at_least, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = complete_steps(workdir)
        if steps and steps[-1] >= at_least:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint in time")


def read_state(workdir, step=None):
    manager = create_manager(workdir, keep=0, read_only=True)
    step = manager.latest_step() if step is None else step
    items = ("params", "ema", "opt_state", "extra")
    args = ocp.args.Composite(**{k: array_restore(saved_target(manager, step, k)) for k in items})
    restored = manager.restore(step, args=args)
    manager.close()
    return step, jax.device_get({k: restored[k] for k in items})


def assert_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config(), workdir)
    return workdir, read_state(workdir)


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_bit_for_bit(uninterrupted, tmp_path):
    _, (ref_step, ref_state) = uninterrupted
    assert ref_step == NUM_STEPS
    workdir = tmp_path / "run"
    # 1. SIGKILL after the first checkpoint.
    proc = start_train(workdir)
    wait_for_checkpoint(proc, workdir, 6)
    proc.kill()
    proc.wait()
    killed_at = complete_steps(workdir)[-1]
    assert killed_at < NUM_STEPS, "the run finished before it could be killed"
    # A save killed half-way: Orbax's temporary directory of a later step, half there.
    partial = workdir / CHECKPOINTS_DIR / f"{killed_at + 3}.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\x00" * 100)
    # 2. Resume, then SIGTERM (preemption): it saves where it is and exits cleanly.
    proc = start_train(workdir)
    wait_for_checkpoint(proc, workdir, killed_at + 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in err
    preempted_at = complete_steps(workdir)[-1]
    # 3. The latest checkpoint is damaged (its parameter files cut short): resume to the
    # end from the one before it, with a warning naming the damaged one.
    previous = complete_steps(workdir)[-2]
    for data_file in (workdir / CHECKPOINTS_DIR / str(preempted_at) / "params").glob("**/d/*"):
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    proc = start_train(workdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    damaged = workdir / CHECKPOINTS_DIR / str(preempted_at)
    assert f"checkpoint {damaged} is damaged: " in err
    assert f"Resumed {workdir} at step {previous}" in err
    assert (workdir / "damaged_checkpoints" / str(preempted_at) / "params").is_dir()
    step, state = read_state(workdir)
    assert step == NUM_STEPS
    assert_bitwise_equal(state, ref_state)
    # The effective config was written beside the run; the grid/metric logs exist.
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["training"]["num_steps"] == NUM_STEPS
    assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())
    # restore_params reads the run for sampling (raw and EMA).
    params, config = restore_params(workdir, ema_rate=0.9)
    assert_bitwise_equal(params, ref_state["ema"]["ema_0_9"])
    assert config.training.num_steps == NUM_STEPS
    with pytest.raises(ValueError, match=r"ema_rate=0\.5 is not kept"):
        restore_params(workdir, ema_rate=0.5)


@pytest.mark.slow
def test_two_processes_equal_one(uninterrupted, tmp_path):
    ref_dir, (_, ref_state) = uninterrupted
    workdir = tmp_path / "mp"
    # Parameters, EMA and Adam state sharded over each process's 4 devices (mesh.fsdp=4),
    # the batch over all 8: the same training as replicated parameters on 8 devices.
    completed = multiprocess.run_processes(
        "-m launch.train",
        [*cli_args(workdir), "--config.mesh.fsdp=4"],
        num_processes=2,
        devices_per_process=4,
        timeout=600,
    )
    assert all("Mesh: data=2 x fsdp=4." in r.stderr for r in completed)
    step, state = read_state(workdir)
    assert step == NUM_STEPS
    # Same global batches, keys and program; only the cross-process reductions may
    # round differently, far below what training moves the parameters
    # by over the last 12 steps.
    _, earlier = read_state(ref_dir, NUM_STEPS - 12)
    moved = max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(earlier["params"]))
    )
    assert moved > 1e-3
    for name in ("params", "ema"):
        for x, y in zip(jax.tree.leaves(state[name]), jax.tree.leaves(ref_state[name])):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
    # Each process's data position is in the checkpoint.
    manager = create_manager(workdir, keep=0, read_only=True)
    data = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    assert data["process_count"] == 2 and len(data["processes"]) == 2
    local = 8 // 2
    assert all(p["position"] % local == 0 for p in data["processes"])
