"""launch.plan and the ahead-of-time compile of every run (issue: know the machine first).

The plan's per-device figure equals what a real run's compiled step reports; FSDP over n
devices divides the state's bytes by n, and the compiler's argument bytes agree with that
count from the shapes; a run whose step cannot fit a stated device memory is refused in
one line before it reads data or writes to its workdir. The plan's variants are compiled
once (module fixture); the run, the refusal and the launcher compile the same programs,
which the session's persistent compilation cache (conftest) hands back.
"""

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import imagenet64
from diffusion_jax import aot, parallel
from diffusion_jax.jobs import plan
from diffusion_jax.training import aot as training_aot
from diffusion_jax.training import loop, train

REPO = Path(__file__).resolve().parents[1]
# The tiny config, smaller still (one level, no attention: a train step compiles in ~10 s
# here); batch 32 so that a quarter batch (8) splits over 8 devices (4 variants);
# fsdp_min_size 1024 shards most of its arrays.
OVERRIDES = {"model.channel_mult": (1,), "model.attention_resolutions": (),
             "training.batch_size": 32, "training.num_steps": 1, "training.ema_rates": (0.9,),
             "training.checkpoint_every": 1, "training.log_every": 1,
             "training.fsdp_min_size": 1024}  # fmt: skip
LAUNCH = [sys.executable, "-m", "launch.plan", "--config=configs/imagenet64.py:tiny"]
LAUNCH += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def tiny_config():
    config = imagenet64.get_config("tiny")
    for key, value in OVERRIDES.items():
        section, field = key.split(".")
        config[section][field] = value
    config.data.dataset = "mnist_5k"
    return config


@pytest.fixture(scope="module")
def planned():
    """The plan of the tiny config on 8 devices, its 4 variants compiled, 1 MiB devices."""
    return plan.plan(tiny_config(), 8, device_memory_gb=0.001, sampling=False)


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """`train` on 1 MiB devices: (its refusal, the report of the step it compiled, workdir).

    The run compiles its step through its own code path before anything else (the
    executable it would then run: test_training_e2e runs it); its images cannot be
    decoded, so reading one would fail the run another way.
    """
    config = tiny_config()
    config.data.dataset = "folder"
    images = tmp_path_factory.mktemp("broken_images")
    for i in range(32):  # one batch, listed (class 'cat'), none decodable
        (images / f"cat_{i}.png").write_bytes(b"not a png")
    config.data.data_dir = str(images)
    config.mesh.device_memory_gb = 0.001
    workdir = tmp_path_factory.mktemp("run") / "run"
    reports, original = [], aot.memory_report

    def spy(*args, **kwargs):
        reports.append(original(*args, **kwargs))
        return reports[-1]

    aot.memory_report = spy
    try:
        with pytest.raises(aot.DoesNotFitError) as e:
            train(config, workdir)
    finally:
        aot.memory_report = original
    return str(e.value), reports, workdir


def test_plan_figure_equals_the_runs_compiled_figure(refused, planned):
    _, reports, _ = refused
    assert len(reports) == 1  # the run compiled one program: its step
    row = planned["rows"][0]
    assert row["variant"] == "data-parallel" and reports[0].temp_bytes > 0
    for key in ("total_bytes", "temp_bytes", "argument_bytes", "output_bytes", "alias_bytes"):
        assert row[key] == getattr(reports[0], key), key


def _state(config, n, fsdp):
    config = plan.variant_config(config, plan.Variant(fsdp=fsdp))
    mesh = parallel.create_mesh_from_config(config, jax.devices()[:n])
    return loop.create_setup(config, mesh, "diffusion").abstract_state


def test_fsdp_divides_parameter_ema_and_optimiser_bytes_by_the_device_count():
    config = tiny_config()
    whole = _state(config, 1, fsdp=True)
    assert aot.sharded_bytes(_state(config, 8, fsdp=False)) == aot.sharded_bytes(whole)
    for n in (2, 4, 8):
        state = _state(config, n, fsdp=True)
        # Small arrays (biases, norms, counters) stay replicated: "about" 1/n.
        for part in ("params", "ema", "opt_state"):
            full, per_device = (aot.sharded_bytes(getattr(s, part)) for s in (whole, state))
            assert full / n <= per_device < 1.1 * full / n, (n, part, per_device, full)


def test_compiled_argument_bytes_are_the_sharded_state_and_batch(planned):
    row = planned["rows"][1]
    assert row["variant"] == "fsdp"
    config = plan.variant_config(tiny_config(), plan.Variant(fsdp=True))
    mesh = parallel.create_mesh_from_config(config)
    batch = aot.sharded_bytes(training_aot.abstract_batch(config, mesh))
    assert batch == (32 * 16 * 16 * 3 + 32) * 4 // 8  # float32 images, int32 labels; 1/8 each
    assert row["argument_bytes"] == row["state_bytes"] + batch
    assert row["state_bytes"] < 1.1 * aot.sharded_bytes(_state(config, 1, fsdp=True)) / 8


def test_a_step_that_cannot_fit_is_refused_in_one_line_before_data_is_read(refused, planned):
    message, _, workdir = refused
    assert "\n" not in message
    total = planned["rows"][0]["total_bytes"] / aot.GIB
    assert f"needs {total:.2f} GiB per device" in message
    assert "a device holds 0.00 GiB" in message
    for lever in ("--config.mesh.fsdp", "--config.training.microbatch", "--config.model.remat"):
        assert lever in message
    assert not workdir.exists()  # no config.json, no checkpoints


def test_plan_marks_what_does_not_fit_and_counts_the_anchor_flops(planned):
    assert [r["fits"] for r in planned["rows"]] == [False] * 4
    forward = planned["forward_flops"]
    # The first conv alone: 16x16 pixels x 3x3x3 inputs x 32 outputs, 2 FLOPs a MAC.
    assert forward > 2 * 16 * 16 * 27 * 32
    assert planned["step_flops"] == 3 * forward * 32
    step_s = planned["step_flops"] / (8 * 782e12 * plan.ASSUMED_MFU)
    assert planned["step_s"] == pytest.approx(step_s)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--devices=0"], "--devices=0 must be a positive device count"),
        (["--devices=3"], "batch_size=32 must be divisible by the number of devices (3)"),
        (["--devices=8", "--device_memory_gb=-1"], "device_memory_gb=-1.0 must be positive"),
    ],
)
def test_launcher_bad_input_is_one_line(args, expected):
    proc = subprocess.run([*LAUNCH, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last


def test_launcher_prints_the_variants_that_fit_and_the_cost(planned):
    proc = subprocess.run(
        [*LAUNCH, "--devices=8", "--device_memory_gb=0.001", "--nosampling", "--mfu=0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("imagenet64:tiny: batch 32 on 8 cpu devices")
    rows = [line.split() for line in lines[2:6]]
    variants = [" ".join(r[:-5]) for r in rows]
    assert variants == [
        "data-parallel", "fsdp", "fsdp + remat", "fsdp + remat + microbatch 8"
    ]  # fmt: skip
    assert all(r[-1] == "NO" for r in rows)  # 1 MiB holds none
    # The launcher's totals are the in-process plan's.
    assert [r[-5] for r in rows] == [f"{x['total_bytes'] / aot.GIB:.2f}" for x in planned["rows"]]
    assert "device memory: 0.00 GiB" in proc.stdout
    assert "at 50% MFU of 782 TFLOP/s" in proc.stdout
