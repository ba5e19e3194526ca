"""A guidance-scale x sampling-steps grid for one model and checkpoint (`launch.sweep`).

Every grid point (method, steps, scale) is one sampling job (`run_sampling_job`: keys by
sample index, so a point's samples do not depend on the others), evaluated against one
reference batch whose activations are cached in the workdir (`ReferenceEvaluator`, keyed
by the reference file and the feature network's weights and platform: another reference
is recomputed, never reused).

The workdir:
  sweep.json                  what every point's samples depend on (config without the
                              grid fields, checkpoints with their step and content
                              identity, scale field)
  reference.inception.npz     the reference's activations and statistics (keyed)
  points/<slug>.npz / .png    a point's samples (and `.parts/` while it samples)
  points/<slug>.json          a point's metrics, seconds and the reference key used
  sweep.md, sweep.csv         the table (one row per point of this run's grid)
  fid_vs_is.png, precision_recall.png, fid_vs_steps.png

Re-running: a finished point (its .json, evaluated against the same reference key) is
kept; an unfinished one continues its sampling job; a point evaluated against another
reference or Inception is re-evaluated from its samples. The grid may change between
runs (the workdir then extends: new points are added, earlier ones stay on disk and
return when named again), but anything else the samples depend on may not: a different
config, checkpoint (a training workdir that advanced included), classifier or scale field
is refused with one line naming the changed fields. The workdir is locked while the sweep
runs: a second sweep on it is refused naming the holder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import jax
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import evaluation, locks, parallel, resumable
from diffusion_jax.checkpoints import workdir as workdir_lib
from diffusion_jax.jobs import tables
from diffusion_jax.progress import Progress
from diffusion_jax.sampling.job import check_sampling_job, run_sampling_job

SCALE_FIELDS = ("classifier_scale", "cfg_scale")
SWEEP_FILE = "sweep.json"
REFERENCE_CACHE = "reference.inception.npz"
PLOTS = ("fid_vs_is.png", "precision_recall.png", "fid_vs_steps.png")
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
_HEADERS = ("FID", "sFID", "IS", "Precision", "Recall")
_PAPER_NUM_SAMPLES = 50_000


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One point of the grid: `sampling.method`, `sampling.timestep_respacing`, the scale."""

    method: str
    steps: int
    scale: float

    @property
    def slug(self) -> str:
        """The point's file name (without suffix) under `points/`."""
        name = f"{self.method.replace('+', 'p')}_{self.steps}steps_scale{self.scale:g}"
        return re.sub(r"[^A-Za-z0-9.]+", "_", name)


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What to sweep, and against what.

    Attributes:
      checkpoint: a convert_checkpoint directory or a training workdir.
      reference: the reference batch (.npz) of the model's resolution.
      workdir: samples, per-point results, the reference cache, table and plots.
      scales: values of `scale_field`.
      steps: values of `sampling.timestep_respacing` (step counts); () = the config's.
      methods: values of `sampling.method`; () = the config's.
      scale_field: 'classifier_scale' (classifier guidance) or 'cfg_scale'
        (classifier-free guidance).
      classifier_checkpoint: the guidance classifier (default
        `sampling.classifier_checkpoint`); needed for non-zero classifier scales.
      inception_weights: pt_inception `.pth` or converted `.npz`; None = cached download.
      features: a classifier checkpoint directory as the evaluator's feature network
        instead of Inception (`evaluation.load_classifier_features`; sFID is then NaN).
    """

    checkpoint: str
    reference: str
    workdir: str
    scales: tuple[float, ...]
    steps: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    scale_field: str = "classifier_scale"
    classifier_checkpoint: str | None = None
    inception_weights: str | None = None
    features: str | None = None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What `run_sweep` did: the table and which points this run computed."""

    markdown: str
    rows: tuple[dict, ...]  # one record per grid point (as points/<slug>.json)
    computed: tuple[str, ...]  # slugs of the points sampled and/or evaluated by this run
    reference_computed: bool | None  # None: no point needed the reference


def _unique(values) -> tuple:
    return tuple(dict.fromkeys(values))


def _config_steps(config: Any) -> int:
    value = config.sampling.timestep_respacing
    if isinstance(value, int) or str(value).strip().isdigit():
        return int(value) or int(config.diffusion.steps)  # 0: every step
    raise ValueError(
        f"sampling.timestep_respacing={value!r} is not a step count: pass --steps=N[,M...]."
    )


def make_grid(config: Any, settings: SweepSettings) -> list[GridPoint]:
    """The points, methods outermost, then steps, then scales (duplicates dropped).

    Raises:
      ValueError: an empty axis, a step count outside [1, diffusion.steps], an unknown
        scale field.
    """
    if settings.scale_field not in SCALE_FIELDS:
        raise ValueError(f"--scale_field={settings.scale_field!r}: one of {SCALE_FIELDS}.")
    methods = _unique(str(m).lower() for m in settings.methods) or (
        str(config.sampling.get("method", "ancestral")).lower(),
    )
    steps = _unique(int(s) for s in settings.steps) or (_config_steps(config),)
    scales = _unique(float(s) for s in settings.scales)
    for name, axis in (("--methods", methods), ("--steps", steps), ("--scales", scales)):
        if not axis:
            raise ValueError(f"the grid is empty: {name} lists no values.")
    total = int(config.diffusion.steps)
    bad = [s for s in steps if not 1 <= s <= total]
    if bad:
        raise ValueError(f"--steps={bad}: each must be in [1, {total}] (diffusion.steps).")
    return [GridPoint(m, n, s) for m, n, s in itertools.product(methods, steps, scales)]


def point_config(config: Any, point: GridPoint, scale_field: str) -> Any:
    """A copy of `config` whose `config.sampling` draws `point`."""
    out = config.copy_and_resolve_references()
    with out.unlocked(), out.ignore_type():
        out.sampling.method = point.method
        out.sampling.timestep_respacing = point.steps
        out.sampling[scale_field] = point.scale
    return out


def _identity(config: Any, settings: SweepSettings, classifier: str | None) -> dict:
    """What every point's samples depend on besides the point itself."""
    whole = config.to_dict()
    whole.pop("mesh", None)  # the device layout changes no sample
    for field in ("method", "timestep_respacing", settings.scale_field):
        whole["sampling"].pop(field, None)
    whole["sampling"].pop("classifier_checkpoint", None)  # resolved below
    return resumable.normalise(
        {
            "config": whole,
            "checkpoint": str(settings.checkpoint),
            "checkpoint_identity": workdir_lib.checkpoint_identity(settings.checkpoint),
            "classifier_checkpoint": classifier,
            "classifier_identity": classifier and workdir_lib.checkpoint_identity(classifier),
            "scale_field": settings.scale_field,
        }
    )


def _check_workdir(workdir: epath.Path, identity: dict) -> None:
    """Refuses a workdir holding a sweep of other settings; records ours otherwise."""
    known = resumable.check_fingerprint(
        workdir / SWEEP_FILE,
        identity,
        what="a sweep",
        remedy="A sweep's workdir only extends its grid: re-run with the same config and "
        "checkpoints, or choose another --workdir.",
    )
    if not known:
        resumable.record_fingerprint(workdir / SWEEP_FILE, identity)


def _finished(path: epath.Path, point: GridPoint, key: str) -> dict | None:
    """The point's record if it was evaluated against `key`, else None."""
    expected = {"point": dataclasses.asdict(point), "evaluated_against": key}
    hint = "Delete it to evaluate the point again."
    record, diffs = resumable.read_record(path, expected, hint=hint)
    return None if diffs else record


def run_sweep(
    config: Any,
    settings: SweepSettings,
    *,
    mesh: Mesh | None = None,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Runs (or continues) the grid; writes the table, CSV and plots into the workdir.

    Every input is checked before any sampling (each point's sampling job included) or
    Inception pass.

    Args:
      config: the model's config; `config.sampling` holds the settings the grid does not
        vary (num_samples, batch_size, eta, labels, use_ema, ...), `config.seed` the key.
      settings: the grid and its inputs.
      mesh: default: every device of every process.
      progress: called on process 0 with a line per point (points done / total, ETA).

    Returns:
      The `SweepResult`.

    Raises:
      ValueError / FileNotFoundError / OSError: one sentence per bad input.
    """
    say = progress if progress is not None and jax.process_index() == 0 else (lambda _: None)
    mesh = parallel.create_mesh_from_config(config) if mesh is None else mesh
    points = make_grid(config, settings)
    workdir = epath.Path(settings.workdir)
    if not epath.Path(settings.reference).exists():
        raise FileNotFoundError(f"--reference={settings.reference}: no such file.")
    reference = evaluation.open_image_npz(settings.reference)
    size = int(config.model.image_size)
    if reference.resolution != (size, size):
        raise ValueError(
            f"--reference={settings.reference} holds {reference.resolution[0]}x"
            f"{reference.resolution[1]} images; the model samples {size}x{size}: use the "
            "reference batch of the model's resolution."
        )
    features = None
    if settings.features:
        features = evaluation.load_classifier_features(settings.features)
        features.check_resolution(reference.resolution)
    classifier = settings.classifier_checkpoint or config.sampling.classifier_checkpoint or None
    for point in points:  # every job's checks, before the first (long) one samples
        check_sampling_job(
            *_job(config, settings, point), classifier_checkpoint=classifier, mesh=mesh
        )
    with locks.exclusive_workdir(workdir, job="sweep"):
        _check_workdir(workdir, _identity(config, settings, classifier))
        return _run_points(config, settings, points, features, classifier, mesh, say)


def reference_evaluator(
    reference: str,
    workdir: str | epath.PathLike,
    num_samples: int | None,
    features: Any = None,
    inception_weights: str | None = None,
    mesh: Mesh | None = None,
) -> evaluation.ReferenceEvaluator:
    """The evaluator of a job's samples against `reference`, the reference's activations
    cached in `workdir` (a file per feature network: Inception, or `features`)."""
    devices = jax.device_count() if mesh is None else int(mesh.devices.size)
    split, batch = evaluation.evaluation_sizes(num_samples, devices)
    cache = REFERENCE_CACHE if features is None else "reference.classifier.npz"
    return evaluation.ReferenceEvaluator(
        reference,
        features or evaluation.load_inception(inception_weights),
        cache_path=epath.Path(workdir) / cache,
        mesh=mesh,
        batch_size=batch,
        split_size=split,
    )


def _job(config, settings: SweepSettings, point) -> tuple[Any, str, str]:
    """A point's sampling job: its config, the checkpoint and its output `.npz`."""
    output = epath.Path(settings.workdir) / "points" / f"{point.slug}.npz"
    return point_config(config, point, settings.scale_field), settings.checkpoint, str(output)


def _run_points(config, settings, points, features, classifier, mesh, say) -> SweepResult:
    workdir, samples_dir = epath.Path(settings.workdir), epath.Path(settings.workdir) / "points"
    num_samples = int(config.sampling.num_samples)
    evaluator = reference_evaluator(
        settings.reference, workdir, num_samples, features, settings.inception_weights, mesh
    )
    todo = sum(_finished(samples_dir / f"{p.slug}.json", p, evaluator.key) is None for p in points)
    records, computed, meter = [], [], Progress("sweep", todo, unit="points", quiet=True)
    for i, point in enumerate(points):
        done_path = samples_dir / f"{point.slug}.json"
        record = _finished(done_path, point, evaluator.key)
        if not resumable.agree(record is not None):  # process 0's view
            start = time.perf_counter()
            samples = run_sampling_job(
                *_job(config, settings, point), classifier_checkpoint=classifier, mesh=mesh
            )
            sampled = time.perf_counter() - start
            need_reference = evaluator.computed_reference is None
            result = evaluator(samples)
            if need_reference:
                how = "computed and cached in" if evaluator.computed_reference else "read from"
                say(f"reference statistics: {how} {workdir / REFERENCE_CACHE}")
            record = {
                "point": dataclasses.asdict(point),
                "scale_field": settings.scale_field,
                "samples": str(samples),
                "num_samples": num_samples,
                "seconds": sampled,  # sampling wall-clock of the run that finished it
                "evaluated_against": evaluator.key,
                "metrics": {m: float(getattr(result, m)) for m in METRICS},
            }
            resumable.write_text(done_path, json.dumps(record, indent=2))
            computed.append(point.slug)
            meter.update()
            status = f"FID {record['metrics']['fid']:.2f} ({time.perf_counter() - start:.0f} s)"
        else:
            status = "done earlier"
        records.append(record)
        say(
            f"[{i + 1}/{len(points)}] {point.method}, {point.steps} steps, "
            f"{settings.scale_field}={point.scale:g}: {status}; {meter.eta()}"
        )
    markdown, csv_text = format_table(records, settings, num_samples)
    resumable.write_text(workdir / "sweep.md", markdown)
    resumable.write_text(workdir / "sweep.csv", csv_text)
    if jax.process_index() == 0:
        write_plots(records, workdir, settings.scale_field)
    return SweepResult(markdown, tuple(records), tuple(computed), evaluator.computed_reference)


def format_table(records: list[dict], settings: SweepSettings, num_samples: int) -> tuple[str, str]:
    """(markdown, csv) of the points' metrics, one row per point."""
    field = settings.scale_field
    note = f"{num_samples} samples per point against {settings.reference}" + (
        ": NOT comparable with the paper's 50,000-sample figures."
        if num_samples < _PAPER_NUM_SAMPLES
        else "."
    )
    rows, csv_rows = [], [["method", "steps", field, *METRICS, "samples", "seconds"]]
    for r in records:
        p, m = r["point"], r["metrics"]
        rows.append([p["method"], p["steps"], f"{p['scale']:g}", *(f"{m[k]:.3f}" for k in METRICS),
                     epath.Path(r["samples"]).name, f"{r['seconds']:.1f}"])  # fmt: skip
        csv_rows.append([p["method"], p["steps"], p["scale"], *(repr(m[k]) for k in METRICS),
                         r["samples"], f"{r['seconds']:.3f}"])  # fmt: skip
    head = ["method", "steps", field, *_HEADERS, "samples", "seconds"]
    lines = [f"### Sweep of {field}", "", note, "", *tables.markdown(head, rows)]
    return "\n".join(lines) + "\n", tables.csv_text(csv_rows, lineterminator="\n")


def write_plots(records: list[dict], workdir: epath.Path, scale_field: str) -> None:
    """FID vs IS and precision vs recall (one line per method and steps, points labelled
    by scale) and FID vs steps (one line per method and scale), as PNGs in `workdir`."""
    from matplotlib.figure import Figure  # lazy: only the sweep needs matplotlib

    def series(by: Callable[[dict], tuple], order: str) -> dict:
        out: dict[tuple, list[dict]] = {}
        for r in records:
            out.setdefault(by(r["point"]), []).append(r)
        return {k: sorted(v, key=lambda r: r["point"][order]) for k, v in out.items()}

    by_run = series(lambda p: (p["method"], p["steps"]), "scale")
    for name, (x, y), (xlabel, ylabel) in (
        (PLOTS[0], ("inception_score", "fid"), ("Inception Score", "FID")),
        (PLOTS[1], ("recall", "precision"), ("Recall", "Precision")),
    ):
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for (method, steps), rs in by_run.items():
            xs = [r["metrics"][x] for r in rs]
            ys = [r["metrics"][y] for r in rs]
            ax.plot(xs, ys, marker="o", label=f"{method}, {steps} steps")
            for r, xi, yi in zip(rs, xs, ys):
                ax.annotate(f"{r['point']['scale']:g}", (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)  # fmt: skip
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} vs {xlabel} (labels: {scale_field})")
        ax.legend(fontsize=8)
        tables.save_png(fig, workdir / name, dpi=120)
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for (method, scale), rs in series(lambda p: (p["method"], p["scale"]), "steps").items():
        steps = [r["point"]["steps"] for r in rs]
        ax.plot(steps, [r["metrics"]["fid"] for r in rs], marker="o",
                label=f"{method}, {scale_field}={scale:g}")  # fmt: skip
    ax.set(xlabel="sampling steps", ylabel="FID", title="FID vs sampling steps")
    ax.legend(fontsize=8)
    tables.save_png(fig, workdir / PLOTS[2], dpi=120)


__all__ = [
    "GridPoint",
    "SweepResult",
    "SweepSettings",
    "format_table",
    "make_grid",
    "point_config",
    "reference_evaluator",
    "run_sweep",
    "write_plots",
]
