"""`launch.fid_table` end to end: two rows of the imagenet128 table on tiny random models.

The released file names hold tiny random guided-diffusion models (saved by the reference
package); the table converts them, samples both rows, evaluates them with random
Inception weights (pytorch-fid format) and prints them beside the paper's figures; the
printed figures must equal the evaluator run separately on the same sample files (real
FID and sFID: the eigenvalue form of the Frechet distance).
"""

import re
import subprocess
import sys
from pathlib import Path

import _evaluation_inputs as ev
import _sampling_models as sm
import numpy as np
import pytest

from diffusion_jax import evaluation
from diffusion_jax.jobs import fid_table

torch = pytest.importorskip("torch")
pytest.importorskip("guided_diffusion")

REPO = Path(__file__).resolve().parents[1]
N = 8


def test_tables_hold_the_paper_rows():
    rows = {t: [r.label for r in rows] for t, rows in fid_table.TABLES.items()}
    assert rows["imagenet256"] == ["ADM", "ADM-G", "ADM-G DDIM-25", "ADM-G + ADM-U"]
    stack = fid_table.TABLES["imagenet256"][3]
    assert stack.config == "upsample64_256" and stack.base.config == "imagenet64"
    assert dict(stack.paper)["fid"] == 3.94 and dict(stack.base.sampling)["classifier_scale"] == 1.0
    ddim = dict(fid_table.TABLES["imagenet128"][2].sampling)
    assert ddim == {"classifier_scale": 1.25, "method": "ddim", "timestep_respacing": 25}
    for name in {r.config for rows in fid_table.TABLES.values() for r in rows}:
        assert name in fid_table.RELEASED and (REPO / "configs" / f"{name}.py").exists()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table")
    weights = ev.write_random_inception(tmp)
    released = tmp / "released"
    released.mkdir()
    for name, seed in (("imagenet128", 1), ("classifier128", 2)):
        net = sm.reference_model(sm.load(f"configs/{name}.py:tiny"), seed)
        torch.save(net.state_dict(), released / fid_table.RELEASED[name])
    # Images only: the evaluator computes the reference statistics (and caches them).
    ev.write_reference(tmp / "ref.npz")
    return tmp, evaluation.load_inception(weights)


def run_table(tmp):
    cmd = [
        sys.executable, "-m", "launch.fid_table", "--table=imagenet128",
        "--rows=ADM,ADM-G",
        "--variant=tiny", f"--num_samples={N}", "--steps=4", "--batch_size=8",
        f"--checkpoint_dir={tmp / 'released'}", f"--reference={tmp / 'ref.npz'}",
        f"--workdir={tmp / 'out'}", f"--inception_weights={tmp / 'w.npz'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_two_row_table_matches_the_evaluator_run_separately(inputs):
    tmp, inception = inputs
    stdout = run_table(tmp)
    assert "NOT comparable" in stdout
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r"\| (ADM(?:-G)?) \| imagenet128 \| (.*) \|$", line)
        if match:
            cells = [c.split(" / ") for c in match.group(2).split(" | ")]
            rows[match.group(1)] = [(float(ours), theirs) for ours, theirs in cells]
    assert sorted(rows) == ["ADM", "ADM-G"], stdout
    assert [p for _, p in rows["ADM-G"]] == ["2.97", "5.09", "0.78", "0.59", "-"]
    for label, slug in (("ADM", "imagenet128_adm"), ("ADM-G", "imagenet128_adm_g")):
        samples = tmp / "out" / "samples" / f"{slug}.npz"
        assert sm.read_npz(samples)["arr_0"].shape == (N, 16, 16, 3)
        # The evaluator on the same files (their Inception activations from the cache the
        # table's run wrote beside them, keyed by contents and weights: no second pass).
        want = evaluation.evaluate_npz(tmp / "ref.npz", samples, inception, split_size=N)
        values = [want.fid, want.sfid, want.precision, want.recall, want.inception_score]
        np.testing.assert_allclose([o for o, _ in rows[label]], values, atol=0.006)  # 2 decimals
    guided = sm.read_npz(tmp / "out" / "samples" / "imagenet128_adm_g.npz")["arr_0"]
    plain = sm.read_npz(tmp / "out" / "samples" / "imagenet128_adm.npz")["arr_0"]
    assert not np.array_equal(guided, plain)  # same x_T: the guided row was guided
    assert (tmp / "out" / "imagenet128.md").read_text().strip() in stdout
    assert (tmp / "out" / "imagenet128.csv").read_text().count("\n") == 3
    assert (tmp / "out" / "converted" / "imagenet128" / "config.json").exists()
    # Finished rows are not redone: without their sample files the table still prints.
    for path in (tmp / "out" / "samples").glob("*.npz"):
        path.unlink()
    assert run_table(tmp) == stdout
    assert not list((tmp / "out" / "samples").glob("*.npz"))
