"""Reproducing the paper's FID tables from the configs (behind `launch.fid_table`).

A row names a config, the sampling settings that make it that row and, for the
upsampling stacks, the base row whose samples feed the upsampler. A row's identity
(`results/<slug>.json`, `row_identity`) is every input its figures depend on; a finished
row of the same identity is not redone, a changed input redoes that row (its sampling
job draws again), so the table's note always describes the figures under it. A
conversion in `converted/` records the `.pt` it came from and is made again when that
file (or --checkpoint_dir) changes. The workdir is locked while the table runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath

from diffusion_jax import files, locks, resumable
from diffusion_jax.checkpoints import workdir as workdir_lib
from diffusion_jax.jobs import tables
from diffusion_jax.sampling import inputs
from diffusion_jax.sampling.job import run_sampling_job

PAPER_NUM_SAMPLES = 50_000
SOURCE_FILE = "source.json"  # in converted/<name>/: the .pt it was converted from
METRICS = ("fid", "sfid", "precision", "recall", "inception_score")
_HEADERS = dict(zip(METRICS, ("FID", "sFID", "Prec", "Rec", "IS"), strict=True))
# config name -> the released file (openai/guided-diffusion README).
RELEASED = {
    **{f"imagenet{n}": f"{n}x{n}_diffusion.pt" for n in (64, 128, 256, 512)},
    "imagenet256_uncond": "256x256_diffusion_uncond.pt",
    **{f"upsample{a}_{b}": f"{a}_{b}_upsampler.pt" for a, b in ((64, 256), (128, 512))},
    **{f"classifier{n}": f"{n}x{n}_classifier.pt" for n in (64, 128, 256, 512)},
    **{f"lsun_{c}": f"lsun_{c}.pt" for c in ("bedroom", "cat", "horse")},
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a paper table.

    Attributes:
      label: the row's name in the paper ('ADM-G', 'ADM-G + ADM-U', ...).
      config: the config's name (configs/<config>.py).
      sampling: `config.sampling` fields that make this row (method, steps, scale).
      classifier: the guidance classifier's config name, or None (unguided).
      paper: the paper's figures (ANCHORS.md), metric -> value.
      base: for an upsampling stack, the row whose samples the upsampler refines.
    """

    label: str
    config: str
    sampling: tuple = ()
    classifier: str | None = None
    paper: tuple = ()
    base: Row | None = None

    @property
    def slug(self) -> str:
        """A file name for the row's outputs."""
        return "".join(c if c.isalnum() else "_" for c in f"{self.config}_{self.label}").lower()


def _paper(fid, sfid, prec, rec, is_=None) -> tuple:
    values = dict(fid=fid, sfid=sfid, precision=prec, recall=rec, inception_score=is_)
    return tuple((k, v) for k, v in values.items() if v is not None)


def _guided(size: int, scale: float, **sampling) -> dict:
    return dict(sampling=tuple({"classifier_scale": scale, **sampling}.items()),
                classifier=f"classifier{size}")  # fmt: skip


_UNGUIDED = (("classifier_scale", 0.0),)
_DDIM25 = {"method": "ddim", "timestep_respacing": 25}
_BASE64_G = Row("ADM-G", "imagenet64", **_guided(64, 1.0))
_BASE128_G = Row("ADM-G", "imagenet128", **_guided(128, 0.5))

TABLES: dict[str, list[Row]] = {
    "imagenet64": [
        Row("ADM (dropout)", "imagenet64", _UNGUIDED, paper=_paper(2.07, 4.29, 0.74, 0.63)),
    ],
    "imagenet128": [
        Row("ADM", "imagenet128", _UNGUIDED, paper=_paper(5.91, 5.09, 0.70, 0.65)),
        Row("ADM-G", **_guided(128, 0.5), config="imagenet128",
            paper=_paper(2.97, 5.09, 0.78, 0.59)),
        Row("ADM-G DDIM-25", **_guided(128, 1.25, **_DDIM25), config="imagenet128",
            paper=_paper(5.98, 7.04, 0.78, 0.51)),
    ],
    "imagenet256": [
        Row("ADM", "imagenet256", _UNGUIDED, paper=_paper(10.94, 6.02, 0.69, 0.63, 100.98)),
        Row("ADM-G", **_guided(256, 1.0), config="imagenet256",
            paper=_paper(4.59, 5.25, 0.82, 0.52, 186.70)),
        Row("ADM-G DDIM-25", **_guided(256, 2.5, **_DDIM25), config="imagenet256",
            paper=_paper(5.44, 5.32, 0.81, 0.49)),
        Row("ADM-G + ADM-U", "upsample64_256", base=_BASE64_G,
            paper=_paper(3.94, 6.14, 0.83, 0.53, 215.84)),
    ],
    "imagenet512": [
        Row("ADM-G", **_guided(512, 4.0), config="imagenet512",
            paper=_paper(7.72, 6.57, 0.87, 0.42, 172.71)),
        Row("ADM-G + ADM-U", "upsample128_512", base=_BASE128_G,
            paper=_paper(3.85, 5.86, 0.84, 0.53, 221.72)),
    ],
    "lsun": [
        Row("ADM (dropout) bedroom", "lsun_bedroom", paper=_paper(1.90, 5.59, 0.66, 0.51)),
        Row("ADM (dropout) horse", "lsun_horse", paper=_paper(2.57, 6.81, 0.71, 0.55)),
        Row("ADM (dropout) cat", "lsun_cat", paper=_paper(5.57, 6.69, 0.63, 0.52)),
    ],
}  # fmt: skip


@dataclasses.dataclass
class TableSettings:
    """How to run a table.

    Attributes:
      checkpoint_dir: the released `.pt` files under their released names, or converted
        directories named by config (DIR/imagenet128/).
      reference: the reference batch (.npz) of the table's resolution.
      workdir: conversions, sample files, per-row results and the table go here.
      num_samples: per row; None = the paper's 50,000.
      steps: override every row's timestep_respacing (quick runs; not comparable).
      variant: a config variant for every config (e.g. 'tiny' for a smoke test).
      configs_dir: where configs/<name>.py live.
      rows: only the rows with these labels (default: all).
      evaluate: `evaluate(reference, samples) -> EvaluationResult`.
      batch_size: global sampling batch size (no figure depends on it).
      feature_weights: what `evaluate` scores with (Inception weights file or a
        classifier checkpoint directory; None = the default Inception download): part
        of every row's identity.
    """

    checkpoint_dir: str
    reference: str
    workdir: str
    evaluate: Callable[[str, str], Any]
    num_samples: int | None = None
    steps: int | None = None
    variant: str | None = None
    configs_dir: str = "configs"
    rows: tuple[str, ...] | None = None
    batch_size: int | None = None
    feature_weights: str | None = None


def _spec(name: str, settings: TableSettings) -> str:
    """configs/<name>.py[:variant]."""
    return f"{settings.configs_dir}/{name}.py" + (
        f":{settings.variant}" if settings.variant else ""
    )


def _config(name: str, settings: TableSettings):
    return inputs.load_config_spec(_spec(name, settings), f"the config of {name}")


def _checkpoint(name: str, settings: TableSettings) -> str:
    """A converted checkpoint of config `name`: DIR/<name>/, or DIR/<released>.pt converted."""
    given = epath.Path(settings.checkpoint_dir) / name
    if (given / inputs.CONFIG_FILE).exists():
        return str(given)
    converted = epath.Path(settings.workdir) / "converted" / name
    pt = epath.Path(settings.checkpoint_dir) / RELEASED[name]
    if not pt.exists():
        raise FileNotFoundError(
            f"--checkpoint_dir={settings.checkpoint_dir} holds neither {RELEASED[name]} (the "
            f"released checkpoint) nor a converted {name}/ directory."
        )
    source = {"pt": str(pt), "identity": resumable.path_identity(pt), "variant": settings.variant}
    if (converted / inputs.CONFIG_FILE).exists():
        saved, diffs = resumable.read_record(converted / SOURCE_FILE, source)
        if saved is not None and not diffs:
            return str(converted)
        logging.warning("%s was converted from another file: converting %s again.", converted, pt)
        converted.rmtree()
    from diffusion_jax.checkpoints import openai  # second floor: conversion

    partial = converted.parent / f"{name}.partial"
    if partial.exists():
        partial.rmtree()
    openai.convert_to_orbax(pt, _config(name, settings), partial)
    files.write_json_atomic(partial / SOURCE_FILE, source, indent=2)
    partial.rename(converted)
    return str(converted)


def _sample_row(row: Row, settings: TableSettings) -> str:
    """Runs (or continues) the row's sampling job; returns its sample file."""
    config = _config(row.config, settings)
    sampling = dict(row.sampling)
    if row.classifier:
        sampling["classifier_config"] = _spec(row.classifier, settings)
        sampling["classifier_checkpoint"] = _checkpoint(row.classifier, settings)
    overrides = (settings.num_samples, settings.steps, settings.batch_size)
    for field, value in zip(("num_samples", "timestep_respacing", "batch_size"), overrides):
        if value:
            sampling[field] = value
    config.sampling.update(sampling)
    base_samples = _sample_row(row.base, settings) if row.base is not None else None
    out = epath.Path(settings.workdir) / "samples" / f"{row.slug}.npz"
    run_sampling_job(
        config,
        _checkpoint(row.config, settings),
        str(out),
        base_samples=base_samples,
        redo_changed=True,  # the table owns its samples: a changed input draws them again
    )
    return str(out)


def row_identity(row: Row, settings: TableSettings) -> dict:
    """Every input the row's figures depend on (its base row's included)."""

    def sampled(r: Row) -> dict:
        names = filter(None, (r.config, r.classifier))
        return {
            "row": [r.label, r.config, [list(kv) for kv in r.sampling], r.classifier],
            "checkpoints": {
                n: workdir_lib.checkpoint_identity(_checkpoint(n, settings)) for n in names
            },
            "base": sampled(r.base) if r.base is not None else None,
        }

    return resumable.normalise(
        {
            **sampled(row),
            "num_samples": settings.num_samples or PAPER_NUM_SAMPLES,
            "steps": settings.steps,
            "variant": settings.variant,
            "reference": str(settings.reference),
            "reference_identity": resumable.path_identity(settings.reference),
            "feature_weights": settings.feature_weights,
            "feature_weights_identity": resumable.path_identity(settings.feature_weights),
        }
    )


def _row_result(row: Row, settings: TableSettings) -> dict:
    done = epath.Path(settings.workdir) / "results" / f"{row.slug}.json"
    identity = row_identity(row, settings)
    hint = "Delete it to compute the row again."
    record, diffs = resumable.read_record(done, {"identity": identity}, hint=hint)
    if record is not None and not diffs:
        return record
    if record is not None:
        logging.warning("row %s: computing again, its inputs changed (%s).", row.label,
                        resumable.summarise(diffs))  # fmt: skip
    samples = _sample_row(row, settings)
    result = settings.evaluate(settings.reference, samples)
    values = {m: float(getattr(result, m)) for m in METRICS}
    record = {
        "row": row.label,
        "config": row.config,
        "samples": samples,
        "ours": values,
        "identity": identity,
    }
    resumable.write_text(done, json.dumps(record, indent=2))
    return record


def format_table(table: str, rows: list[Row], results: list[dict], note: str) -> tuple[str, str]:
    """(markdown, csv) of our figures beside the paper's."""
    head = ["row", "config"] + [f"{_HEADERS[m]} ours / paper" for m in METRICS]
    cells = []
    csv_rows = [["row", "config", *(f"{m}_{w}" for m in METRICS for w in ("ours", "paper"))]]
    for row, result in zip(rows, results, strict=True):
        paper, ours = dict(row.paper), result["ours"]
        theirs = {m: f"{paper[m]:.2f}" if m in paper else "-" for m in METRICS}
        cells.append([row.label, row.config, *(f"{ours[m]:.2f} / {theirs[m]}" for m in METRICS)])
        csv_rows.append(
            [row.label, row.config, *(v for m in METRICS for v in (ours[m], paper.get(m, "")))]
        )
    lines = [f"### {table}", "", note, "", *tables.markdown(head, cells)]
    return "\n".join(lines) + "\n", tables.csv_text(csv_rows)


def run_table(table: str, settings: TableSettings) -> str:
    """Runs the rows of `table`; returns the markdown table (also written to the workdir).

    Raises:
      ValueError: an unknown table or row, or a bad setting (one sentence).
      FileNotFoundError: a checkpoint the table needs is missing.
    """
    if table not in TABLES:
        raise ValueError(f"--table={table!r}: the tables are {sorted(TABLES)}.")
    rows = TABLES[table]
    if settings.rows:
        unknown = sorted(set(settings.rows) - {r.label for r in rows})
        if unknown:
            raise ValueError(
                f"--rows: {unknown} not in table {table}; its rows are {[r.label for r in rows]}."
            )
        rows = [r for r in rows if r.label in settings.rows]
    if not epath.Path(settings.reference).exists():
        raise FileNotFoundError(f"--reference={settings.reference}: no such file.")
    if settings.feature_weights and not epath.Path(settings.feature_weights).exists():
        raise FileNotFoundError(f"{settings.feature_weights}: no such file or directory.")
    with locks.exclusive_workdir(settings.workdir, job="fid_table"):
        for row in rows:  # every checkpoint, before the first (long) sampling job
            for r in (row, row.base) if row.base else (row,):
                for name in filter(None, (r.config, r.classifier)):
                    _checkpoint(name, settings)
        results = [_row_result(row, settings) for row in rows]
        return _write_table(table, rows, results, settings)


def _write_table(table: str, rows: list[Row], results: list[dict], settings) -> str:
    n = settings.num_samples or PAPER_NUM_SAMPLES
    comparable = n >= PAPER_NUM_SAMPLES and not settings.steps and not settings.variant
    note = (
        f"{n} samples per row, paper settings."
        if comparable
        else f"{n} samples per row"
        + (f", {settings.steps} steps" if settings.steps else "")
        + (f", config variant {settings.variant!r}" if settings.variant else "")
        + ": NOT comparable with the paper's 50,000-sample figures."
    )
    markdown, csv_text = format_table(table, rows, results, note)
    resumable.write_text(epath.Path(settings.workdir) / f"{table}.md", markdown)
    resumable.write_text(epath.Path(settings.workdir) / f"{table}.csv", csv_text)
    return markdown


__all__ = [
    "RELEASED",
    "TABLES",
    "Row",
    "TableSettings",
    "format_table",
    "row_identity",
    "run_table",
]
