"""Training learns on the built-in real data (mnist_5k): figures asserted, not just "it runs".

- A tiny class-conditional ADM (imagenet64:tiny, 16x16, hybrid loss with learned sigmas):
  over 200 CPU steps its L_simple (mse) falls from ~0.6 (mean of steps 1-20) to ~0.07
  (seen); asserted: below 0.2 and below a third of the first window.
- A tiny noise-aware classifier through `python -m launch.train_classifier` (the README
  command): 300 steps reach ~0.81 clean held-out accuracy on mnist_5k's test split (seen;
  chance 0.1); asserted: >= 0.6 clean, and noisier quartiles are harder (q0 > q3).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import imagenet64
from diffusion_jax.training import train

REPO = Path(__file__).resolve().parents[1]


def read_metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_diffusion_loss_falls_on_mnist(tmp_path):
    config = imagenet64.get_config("tiny")
    config.data.dataset = "mnist_5k"
    config.optim.lr = 1e-3
    config.training.update(
        num_steps=200,
        batch_size=16,
        log_every=20,
        checkpoint_every=200,
        sample_every=200,
        sample_grid_size=8,
        sample_steps=5,
    )
    train(config, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "mse" in r]
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    first, last = rows[0]["mse"], np.mean([r["mse"] for r in rows[-2:]])
    assert last < 0.2 and last < first / 3, (first, last)
    assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows)
    assert rows[-1]["images_per_sec"] > 0 and rows[-1]["lr"] == pytest.approx(1e-3)
    # The EMA sample grid: 8 images of 16x16 (3 x 3 tiles with 2-pixel gaps), not blank.
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000200.png"))
    assert grid.shape == (3 * 18 + 2, 3 * 18 + 2, 3)
    assert grid[2:18, 2:18].std() > 5


@pytest.mark.slow
def test_classifier_learns_mnist_through_the_launcher(tmp_path):
    args = [
        "--config=configs/classifier64.py:tiny",
        "--config.data.dataset=mnist_5k",
        "--config.data.eval_split=test",
        "--config.model.num_classes=10",
        "--config.training.num_steps=300",
        "--config.training.batch_size=32",
        "--config.training.log_every=50",
        "--config.training.eval_every=300",
        "--config.training.eval_num_samples=480",
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train_classifier", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ETA" in proc.stderr  # progress lines
    evals = [r for r in read_metrics(tmp_path) if "eval_clean_acc@1" in r]
    assert len(evals) == 1 and evals[0]["step"] == 300
    ev = evals[0]
    assert ev["eval_clean_acc@1"] >= 0.6, ev
    assert ev["eval_clean_acc@5"] >= ev["eval_clean_acc@1"]
    assert ev["eval_acc@1_q0"] > ev["eval_acc@1_q3"], ev
    train_rows = [r for r in read_metrics(tmp_path) if "acc@1" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert {"acc@5", "loss_q0", "acc@1_q3", "grad_norm", "lr"} <= set(train_rows[-1])
