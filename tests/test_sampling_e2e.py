"""End to end through `python -m launch.sample`: killed (SIGKILL) and restarted ==
uninterrupted byte for byte, 2 processes x 4 devices == 1 process x 8, one-line errors."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import _sampling_models as sm
import multiprocess
import numpy as np
import pytest

from diffusion_jax import sampling

pytest.importorskip("guided_diffusion")

REPO = Path(__file__).resolve().parents[1]
SAMPLING = {
    "num_samples": 36,  # 5 batches of 8, the last one padded
    "batch_size": 8,
    "timestep_respacing": 12,
    "classifier_scale": 2.0,
    "method": "ddim",
    "eta": 0.5,
}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return sm.make_checkpoints(tmp_path_factory.mktemp("ckpt"))


def cli_args(ck, output):
    return [
        f"--config={sm.BASE}",
        f"--checkpoint={ck['base_dir']}",
        f"--classifier_checkpoint={ck['classifier_dir']}",
        f"--output={output}",
        *(f"--config.sampling.{k}={v}" for k, v in SAMPLING.items()),
    ]


@pytest.fixture(scope="module")
def in_process(ck, tmp_path_factory):
    """The uninterrupted job, 1 process x the suite's 8 devices."""
    config = sm.load(sm.BASE)
    config.sampling.update(SAMPLING)
    out = tmp_path_factory.mktemp("ref") / "samples.npz"
    sampling.run_sampling_job(
        config, str(ck["base_dir"]), str(out), classifier_checkpoint=str(ck["classifier_dir"])
    )
    return sm.read_npz(out)


def start(args):
    return subprocess.Popen(
        [sys.executable, "-m", "launch.sample", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_same(got, want):
    assert sorted(got) == sorted(want) == ["arr_0", "arr_1"]
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
        assert got[key].tobytes() == want[key].tobytes(), key


@pytest.mark.slow
def test_killed_and_restarted_job_equals_uninterrupted(ck, in_process, tmp_path):
    out = tmp_path / "samples.npz"
    parts = Path(str(out) + ".parts")
    proc = start(cli_args(ck, out))
    deadline = time.time() + 300
    while not (parts / "000001.p0000.npz").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = sorted(p.name for p in parts.glob("*.p0000.npz"))
    assert 2 <= len(done) < 5 and not out.exists(), done
    resumed = start(cli_args(ck, out))
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    # The restarted run continued after the finished batches (its first report).
    first = re.search(r"sampling: (\d+)/36 images", stderr)
    assert first and int(first.group(1)) == 8 * (len(done) + 1), stderr[-2000:]
    assert_same(sm.read_npz(out), in_process)


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_of_eight(ck, in_process, tmp_path):
    out = tmp_path / "samples.npz"
    multiprocess.run_processes(
        "-m launch.sample",
        cli_args(ck, out),
        num_processes=2,
        devices_per_process=4,
        timeout=400,
    )
    assert_same(sm.read_npz(out), in_process)
    assert not list(Path(str(out) + ".parts").glob("*.npz"))  # folded into the output


def _one_error_line(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.sample", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert not (tmp_path / "o.npz.parts").exists()
    return line


def test_upsampler_base_samples_errors_are_one_line(tmp_path):
    upsampler = tmp_path / "up"
    upsampler.mkdir()
    (upsampler / "config.json").write_text(sm.load(sm.UPSAMPLER).to_json_best_effort())
    np.savez(tmp_path / "base16.npz", np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64))
    args = [f"--config={sm.UPSAMPLER}", f"--checkpoint={upsampler}", f"--output={tmp_path}/o.npz"]
    line = _one_error_line([*args, f"--base_samples={tmp_path}/base16.npz"], tmp_path)
    assert line.startswith("error: --base_samples=") and "needs 8x8x3" in line, line
    line = _one_error_line(args, tmp_path)
    assert line == "error: an upsampler config needs --base_samples=FILE.npz (a base job's output)."


def test_launcher_errors_are_one_line(ck, tmp_path):
    bad = [*cli_args(ck, tmp_path / "o.npz"), "--config.sampling.num_samples=-3"]
    proc = subprocess.run(
        [sys.executable, "-m", "launch.sample", *bad],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: sampling.num_samples must be a positive integer, got -3."
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.npz.parts").exists()
