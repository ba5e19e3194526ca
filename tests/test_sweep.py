"""`launch.sweep` end to end: a 2 scales x 2 steps grid on tiny random models, resumed.

The first run is the command a user runs (a subprocess): guided ancestral sampling on the
tiny 16x16 class-conditional model with its tiny classifier, 8 samples a point, random
Inception weights. The re-runs (a point's results deleted, a sub-grid, changed
settings) and the bad inputs call `run_sweep` in-process. `sampling.method` is just one
more field the grid sets, so DDIM (and DPM-Solver++) points take the same path.

FIDs are real (the eigenvalue form of the Frechet distance, ~1-2 s per 2048-d pair on
this 2-core machine): each row must hold what the evaluator computes from that point's
samples and the reference. Scales 0.5 and 2 share one compiled guided program per step count;
the 4-step one is test_sampling_job's (a persistent-cache hit in a suite run).
"""

import json
import subprocess
import sys
from pathlib import Path

import _evaluation_inputs as ev
import _sampling_models as sm
import numpy as np
import pytest

from diffusion_jax import evaluation
from diffusion_jax.jobs import sweep

pytest.importorskip("torch")
pytest.importorskip("guided_diffusion")

REPO = Path(__file__).resolve().parents[1]
GRID = ["--methods=ancestral", "--steps=2,4", "--scales=0.5,2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny checkpoints, random Inception weights, a 16x16 reference batch."""
    tmp = tmp_path_factory.mktemp("sweep")
    checkpoints = sm.make_checkpoints(tmp / "ckpt")
    ev.write_random_inception(tmp)
    ev.write_reference(tmp / "ref.npz", num_images=16)  # 2 Inception batches
    return tmp, checkpoints


@pytest.fixture(scope="module")
def swept(inputs):
    """The inputs, and the first run of the grid (its command line and stdout)."""
    tmp, checkpoints = inputs
    args = [
        f"--config={REPO / sm.BASE}",
        f"--checkpoint={checkpoints['base_dir']}",
        f"--classifier_checkpoint={checkpoints['classifier_dir']}",
        f"--reference={tmp / 'ref.npz'}",
        f"--workdir={tmp / 'out'}",
        f"--inception_weights={tmp / 'w.npz'}",
        *GRID,
    ]
    return tmp, args, checkpoints, run_sweep(args)


def run_sweep(args) -> str:
    cmd = [sys.executable, "-m", "launch.sweep", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the sweep's first run: ~40 s cold on 2 busy cores (compiles)
def test_grid_table_matches_the_evaluator_run_separately(swept):
    tmp, _, _, stdout = swept
    out = tmp / "out"
    assert "reference statistics: computed and cached in" in stdout
    assert "[4/4] ancestral, 4 steps, classifier_scale=2: FID" in stdout and "; done" in stdout
    assert (out / "sweep.md").read_text().strip() in stdout
    rows = read_csv(out / "sweep.csv")
    assert [(r["method"], r["steps"], r["classifier_scale"]) for r in rows] == [
        ("ancestral", "2", "0.5"), ("ancestral", "2", "2.0"),
        ("ancestral", "4", "0.5"), ("ancestral", "4", "2.0"),
    ]  # fmt: skip
    for name in sweep.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The evaluator on the same files, as `launch.evaluate` runs it (reference activations
    # computed afresh beside ref.npz; the first point's samples without their cache).
    inception = evaluation.load_inception(tmp / "w.npz")
    images = []
    for i, row in enumerate(rows):
        assert Path(row["samples"]).parent == out / "points"
        images.append(sm.read_npz(row["samples"])["arr_0"])
        want = evaluation.evaluate_npz(
            tmp / "ref.npz", row["samples"], inception, split_size=8, batch_size=8, cache=i > 0
        )
        got = [float(row[m]) for m in sweep.METRICS]
        np.testing.assert_allclose(got, [getattr(want, m) for m in sweep.METRICS], rtol=1e-6)
    assert images[0].shape == (8, 16, 16, 3)
    assert not np.array_equal(images[0], images[1])  # the scale reached the sampler
    assert not np.array_equal(images[0], images[2])  # and the step count


def settings(tmp, checkpoints, **changes) -> sweep.SweepSettings:
    """The fixture's sweep (as its command line says), with `changes`."""
    fields = dict(
        checkpoint=str(checkpoints["base_dir"]),
        reference=str(tmp / "ref.npz"),
        workdir=str(tmp / "out"),
        scales=(0.5, 2.0),
        steps=(2, 4),
        methods=("ancestral",),
        classifier_checkpoint=str(checkpoints["classifier_dir"]),
        inception_weights=str(tmp / "w.npz"),
    )
    return sweep.SweepSettings(**{**fields, **changes})


@pytest.mark.slow
def test_rerun_recomputes_only_the_missing_point(swept):
    tmp, _, checkpoints, first = swept
    out, points = tmp / "out", tmp / "out" / "points"
    cache = out / sweep.REFERENCE_CACHE
    stamps = {p.name: p.stat().st_mtime_ns for p in (*points.glob("*.json"), cache)}
    (points / "ancestral_4steps_scale0.5.json").unlink()  # its metrics, and its samples
    (points / "ancestral_4steps_scale0.5.npz").unlink()
    lines = []
    result = sweep.run_sweep(sm.load(sm.BASE), settings(tmp, checkpoints), progress=lines.append)
    assert result.computed == ("ancestral_4steps_scale0.5",)
    assert result.reference_computed is False  # read from the workdir's cache
    assert f"reference statistics: read from {cache}" in lines
    assert sum("done earlier" in line for line in lines) == 3
    after = {p.name: p.stat().st_mtime_ns for p in (*points.glob("*.json"), cache)}
    assert {k for k in stamps if after[k] != stamps[k]} == {"ancestral_4steps_scale0.5.json"}

    # Same keys, same samples: the table is the first run's (but for the timing column).
    def table(text):
        return [r[:-1] for r in (line.split(" | ") for line in text.splitlines()) if len(r) > 5]

    assert table(result.markdown) == table(first)
    # A sub-grid is part of the same sweep: every point done, nothing computed (on
    # another mesh too: the layout is no part of a sweep's identity).
    config = sm.load(sm.BASE)
    config.mesh.fsdp = 4
    result = sweep.run_sweep(config, settings(tmp, checkpoints, scales=(2.0,)))
    assert result.computed == () and result.reference_computed is None
    assert [(r["point"]["steps"], r["point"]["scale"]) for r in result.rows] == [(2, 2.0), (4, 2.0)]


@pytest.mark.slow
def test_a_changed_config_or_checkpoint_is_refused(swept):
    tmp, _, checkpoints, _ = swept
    config = sm.load(sm.BASE)
    config.seed = 1
    with pytest.raises(ValueError, match=r"sweep of other inputs: config\.seed \(was: 0, now: 1\)"):
        sweep.run_sweep(config, settings(tmp, checkpoints))
    other = settings(tmp, checkpoints, classifier_checkpoint=None, scales=(0.0,))
    with pytest.raises(ValueError, match=r"other inputs: classifier_checkpoint \(was: '"):
        sweep.run_sweep(sm.load(sm.BASE), other)
    assert json.loads((tmp / "out" / sweep.SWEEP_FILE).read_text())["config"]["seed"] == 0


@pytest.mark.slow
def test_a_point_scored_against_another_reference_or_features_is_rescored(swept, tmp_path):
    """Its samples are kept; its figures are those of the evaluator run on them with the
    new feature network, then against the new reference (the small classifier's features:
    no Inception pass)."""
    import shutil

    tmp, _, checkpoints, _ = swept
    shutil.copytree(tmp / "out", tmp_path / "out")  # the first run's workdir stays as it was
    one = dict(workdir=str(tmp_path / "out"), steps=(2,), scales=(2.0,))
    samples = tmp_path / "out" / "points" / "ancestral_2steps_scale2.npz"
    drawn = samples.stat().st_mtime_ns
    other_ref = ev.write_reference(tmp_path / "ref2.npz", num_images=16, seed=1)
    network = str(checkpoints["classifier_dir"])
    features = evaluation.load_classifier_features(network)
    for changes, reference in (
        (dict(features=network), tmp / "ref.npz"),  # Inception -> the classifier
        (dict(features=network, reference=str(other_ref)), other_ref),
    ):
        result = sweep.run_sweep(sm.load(sm.BASE), settings(tmp, checkpoints, **one, **changes))
        assert result.computed == ("ancestral_2steps_scale2",)  # before: 'done earlier'
        want = evaluation.evaluate_npz(reference, samples, features, split_size=8, batch_size=8)
        got = [result.rows[0]["metrics"][m] for m in sweep.METRICS]
        np.testing.assert_allclose(got, [getattr(want, m) for m in sweep.METRICS], rtol=1e-6)
    assert samples.stat().st_mtime_ns == drawn  # scored again, not drawn again


def test_bad_input_fails_before_any_work(inputs, tmp_path):
    tmp, checkpoints = inputs
    config = sm.load(sm.BASE)
    good = dict(workdir=str(tmp_path / "out"), scales=(0.0, 1.0), steps=(), methods=())
    ev.write_reference(tmp_path / "ref32.npz", size=32)
    cases = [
        (dict(scales=()), "the grid is empty: --scales lists no values"),
        (dict(steps=(0,)), r"--steps=\[0\]: each must be in \[1, 1000\]"),
        (dict(methods=("euler",)), "sampling.method: unknown value 'euler'"),
        (dict(checkpoint=str(tmp_path / "nope")), "--checkpoint=.*nope: no such directory"),
        (dict(reference=str(tmp_path / "nope.npz")), "--reference=.*nope.npz: no such file"),
        (dict(reference=str(tmp_path / "ref32.npz")), "holds 32x32 images; the model samples 16"),
        (dict(classifier_checkpoint=None), "classifier_scale=1.0 needs a classifier"),
        (dict(scale_field="cfg"), "--scale_field='cfg'"),
        (dict(scale_field="cfg_scale", scales=(3.0,)), "cfg_scale=3.0 .* needs a class-cond"),
        (dict(features=str(tmp_path / "nope")), "checkpoint .*nope does not exist"),
        (dict(features=str(checkpoints["base_dir"])), "is not a classifier checkpoint"),
    ]
    for change, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            sweep.run_sweep(config, settings(tmp, checkpoints, **{**good, **change}))
    assert not (tmp_path / "out" / sweep.SWEEP_FILE).exists()
