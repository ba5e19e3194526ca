"""The quickstart's report: sample grids and loss curves (PNG) and `summary.md`."""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from diffusion_jax import files
from diffusion_jax.jobs import tables
from diffusion_jax.training.writers import read_metrics

GRID_FILE = "samples_grid.png"
CURVES_FILE = "loss_curves.png"
SUMMARY_FILE = "summary.md"
_TITLES = {
    "unguided": "conditional, unguided",
    "guided": "classifier guidance",
    "cfg": "classifier-free guidance",
}


def class_rows(images: np.ndarray, labels: np.ndarray, columns: int = 10) -> np.ndarray:
    """One row per class (its first `columns` samples), uint8 [K*H, columns*W, C]."""
    classes = np.unique(labels)
    h, w, c = images.shape[1:]
    grid = np.zeros((len(classes) * h, columns * w, c), np.uint8)
    for r, k in enumerate(classes):
        members = images[labels == k][:columns]
        for j, image in enumerate(members):
            grid[r * h : (r + 1) * h, j * w : (j + 1) * w] = image
    return grid


def write_grid(path: epath.Path, panels: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Writes the sample sets side by side, one row per class, titled.

    Args:
      path: the PNG to write.
      panels: (title, uint8 images [N, H, W, C], labels [N]) per sample set.
    """
    from matplotlib.figure import Figure  # lazy: only the report draws

    fig = Figure(figsize=(4.2 * len(panels), 4.6), layout="tight")
    for ax, (title, images, labels) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        grid = class_rows(images, labels)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray")
        h = images.shape[1]
        classes = np.unique(labels)
        ax.set_yticks((np.arange(len(classes)) + 0.5) * h, [str(k) for k in classes])
        ax.set_xticks([])
        ax.set_title(title, fontsize=10)
    tables.save_png(fig, path, dpi=110)


def write_curves(path: epath.Path, workdir: epath.Path) -> None:
    """Training curves of the three runs from their metrics.jsonl."""
    from matplotlib.figure import Figure

    runs = [
        ("diffusion", ("loss", "mse", "vb"), "diffusion model (hybrid loss)"),
        ("classifier", ("loss", "acc@1"), "noise-aware classifier"),
        ("clean_classifier", ("loss", "acc@1"), "clean classifier"),
    ]
    fig = Figure(figsize=(13, 3.6), layout="tight")
    for ax, (name, keys, title) in zip(fig.subplots(1, len(runs)), runs):
        records = read_metrics(workdir / name)
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key)
        ax.set(yscale="log", xlabel="step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    tables.save_png(fig, path, dpi=110)


def write_report(
    config: Any, workdir: epath.Path, figures: dict, outputs: dict, samples: dict
) -> None:
    """Writes the grid, the curves and summary.md into `workdir`.

    Args:
      config: the job's effective config.
      workdir: the job's workdir.
      figures: what `run_quickstart` measured.
      outputs: sample set name -> its `.npz` path.
      samples: sample set name -> (uint8 images, requested labels), as read from it.
    """
    runs = {name: (scale, cfg) for name, scale, cfg in figures["runs"]}
    panels = []
    for name, (images, labels) in samples.items():
        scale, cfg = runs[name]
        knob = f"scale {scale:g}" if name == "guided" else f"cfg {cfg:g}" if name == "cfg" else ""
        acc = figures["recognised"][name]["accuracy"]
        title = f"{_TITLES.get(name, name)} {knob}\nrecognised {acc:.0%}".replace("  ", " ")
        panels.append((title, images, labels))
    write_grid(workdir / GRID_FILE, panels)
    write_curves(workdir / CURVES_FILE, workdir)
    files.write_text_atomic(
        workdir / SUMMARY_FILE, summary_markdown(config, workdir, figures, outputs)
    )


def tradeoff_statement(rows: list[dict]) -> str:
    """Whether the paper's trade-off shows in a scale series: precision and IS rise and
    recall falls from the smallest scale to the largest."""
    rows = sorted(rows, key=lambda r: r["scale"])
    lo, hi = rows[0], rows[-1]
    moves = {
        "precision": hi["precision"] - lo["precision"],
        "IS": hi["inception_score"] - lo["inception_score"],
        "recall": hi["recall"] - lo["recall"],
    }
    seen = moves["precision"] > 0 and moves["IS"] > 0 and moves["recall"] < 0
    detail = ", ".join(f"{k} {v:+.3f}" for k, v in moves.items())
    verdict = "the paper's trade-off appears" if seen else "the paper's trade-off does not appear"
    return f"from scale {lo['scale']:g} to {hi['scale']:g}: {detail}: {verdict}"


def _scores(m: dict, fd: str) -> list[str]:
    """The FD (under key `fd`), precision, recall and IS cells of a metrics table."""
    return [f"{m[fd]:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}",
            f"{m['inception_score']:.2f}"]  # fmt: skip


def _colour_and_metric_lines(figures: dict) -> list[str]:
    """The colour statistics and the paper's metrics (clean-classifier features)."""
    lines = []
    colour, metrics = figures.get("colour"), figures.get("metrics")
    if colour:
        lines += [
            "",
            "Colour statistics (0-255; the digits are grey on black): the median pixel "
            "(the background) and the mean difference between channels.",
            "",
            *tables.markdown(
                ["images", "median background", "channel difference"],
                [[_TITLES.get(name, name), f"{c['median_background']:.1f}",
                  f"{c['channel_difference']:.2f}"] for name, c in colour.items()],
                "|---|---:|---:|",
            ),
        ]  # fmt: skip
    if metrics:
        lines += [
            "",
            "The paper's metrics in miniature, on the clean classifier's features (its "
            "penultimate layer for the Frechet distance FD and precision/recall, its softmax "
            "for the Inception-Score analogue IS), against the held-out test digits. The "
            "floor: the test digits themselves scored against the training digits.",
            "",
            *tables.markdown(
                ["samples", "FD", "precision", "recall", "IS"],
                [["floor (test vs train digits)" if name == "floor" else _TITLES.get(name, name),
                  *_scores(m, "fd")] for name, m in metrics.items()],
                "|---|---:|---:|---:|---:|",
            ),
        ]  # fmt: skip
    for field, study in (figures.get("study") or {}).items():
        name = "Classifier guidance" if field == "classifier_scale" else "Classifier-free guidance"
        lines += [
            "",
            f"{name} study (`{study['workdir']}`: sweep.md and the FD-vs-IS and "
            "precision-recall plots), clean-classifier features against the test digits:",
            "",
            *tables.markdown(
                ["scale", "FD", "precision", "recall", "IS"],
                [[f"{r['scale']:g}", *_scores(r, "fid")]
                 for r in sorted(study["rows"], key=lambda r: r["scale"])],
                "|---:|---:|---:|---:|---:|",
            ),
            "",
            f"Measured {tradeoff_statement(study['rows'])}.",
        ]  # fmt: skip
    return lines


def summary_markdown(config: Any, workdir: epath.Path, figures: dict, outputs: dict) -> str:
    """summary.md: what was trained, the figures, where each file is, what to run next."""
    bpd, steps, secs = figures["bpd"], figures["steps"], figures["seconds"]
    ev = figures["classifier_eval"]
    job, sampling = config.quickstart, config.sampling
    k = int(config.model.num_classes)
    size = int(config.model.image_size)
    lines = [
        "# Quickstart: classifier guidance on mnist_5k, in miniature",
        "",
        f"Backend: {figures['backend']} ({figures['num_devices']} device(s)). "
        f"Images: {size}x{size} mnist_5k digits ({k} classes).",
        "",
        "## What was trained",
        "",
        "| model | steps | batch | time (s) | workdir |",
        "|---|---:|---:|---:|---|",
        f"| class-conditional ADM UNet, learned sigmas, hybrid loss, "
        f"{config.diffusion.noise_schedule} schedule, {config.diffusion.steps} steps | "
        f"{steps['diffusion']} | {config.training.batch_size} | {secs['diffusion']:.0f} | "
        f"`diffusion/` |",
        f"| noise-aware classifier (guidance) | {steps['classifier']} | "
        f"{config.classifier.training.batch_size} | {secs['classifier']:.0f} | `classifier/` |",
        f"| clean classifier (judges samples; clean training images only) | "
        f"{steps['clean_classifier']} | {config.clean_classifier.training.batch_size} | "
        f"{secs['clean_classifier']:.0f} | `clean_classifier/` |",
        "",
        "## Figures",
        "",
        f"Samples: {job.samples_per_class} per class, the same labels and the same x_T for "
        f"every set; {sampling.method} sampling with {sampling.timestep_respacing} steps "
        f"(EMA parameters). A sample counts as recognised when the clean classifier "
        f"(held-out test accuracy {figures['clean_classifier_test_accuracy']:.1%}) "
        "predicts the requested digit; chance is "
        f"{1 / k:.0%}.",
        "",
        *tables.markdown(
            ["samples", "classifier scale", "cfg scale", "recognised as requested", "file"],
            [[_TITLES.get(name, name), f"{scale:g}", f"{cfg:g}",
              f"{figures['recognised'][name]['accuracy']:.1%}", f"`{outputs[name].name}`"]
             for name, scale, cfg in figures["runs"]],
            "|---|---:|---:|---:|---|",
        ),
        *_colour_and_metric_lines(figures),
    ]  # fmt: skip
    lines += [
        "",
        f"Negative log-likelihood on {bpd['num_images']} held-out test images "
        f"(`calc_bpd_loop`, all {config.diffusion.steps} steps, EMA parameters): "
        f"**{bpd['bpd']:.3f} bits/dim** (± {bpd['bpd_stderr']:.3f} standard error). "
        f"Baseline, an independent categorical per pixel and channel fitted on the "
        f"training images: {bpd['baseline_bpd']:.3f} bits/dim on the same images "
        f"({bpd['baseline_bpd_all_test']:.3f} on all {bpd['num_test_images']} test images).",
        "",
    ]
    if ev:
        keys = ["eval_acc@1", *(f"eval_acc@1_q{i}" for i in range(4)), "eval_clean_acc@1"]
        lines += [
            "Noise-aware classifier, held-out accuracy per t-quartile "
            "(q0 = least noise, at uniformly drawn t):",
            "",
            *tables.markdown(
                ["overall", "q0", "q1", "q2", "q3", "clean (t=0)"],
                [[f"{ev.get(k, float('nan')):.1%}" for k in keys]],
                "|" + "---:|" * 6,
            ),
            "",
        ]
    lines += [
        "Times (s): "
        + ", ".join(f"{name} {value:.0f}" for name, value in secs.items() if name != "total"),
        "",
        "## Files",
        "",
        f"- `{GRID_FILE}`: the sample sets side by side, one row per class.",
        f"- `{CURVES_FILE}`: training curves of the three models.",
        "- `samples_*.npz`: the samples in the paper's layout (`arr_0` uint8 images, "
        "`arr_1` the requested labels), each with a PNG beside it.",
        "- `diffusion/`, `classifier/`, `clean_classifier/`: training workdirs "
        "(config.json, Orbax checkpoints, metrics.jsonl, TensorBoard events).",
        "- `figures.json`: every figure above; `quickstart.json`: the job's config.",
        "",
        "## What to run next",
        "",
        "- The same command again reuses all of this; with `--config.training.num_steps=N` "
        "it trains on and redraws the samples.",
        f"- Sample more: `python -m launch.sample --config=configs/quickstart.py "
        f"--checkpoint={workdir}/diffusion --classifier_checkpoint={workdir}/classifier "
        f"--config.sampling.classifier_scale={job.classifier_scale:g} "
        f"--config.sampling.labels=3 --output=threes.npz`",
        f"- Classifier-free guidance with DPM-Solver++ in 20 steps: `python -m launch.sample "
        f"--config=configs/quickstart.py --checkpoint={workdir}/diffusion "
        "--config.sampling.cfg_scale=3 --config.sampling.method=dpm_solver++ "
        "--config.sampling.timestep_respacing=20 --output=cfg_dpm.npz`",
        f"- Watch the curves: `tensorboard --logdir={workdir}`",
        "- Train a paper model: see the README (`python -m launch.train "
        "--config=configs/imagenet64.py --workdir=DIR`).",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "class_rows",
    "summary_markdown",
    "tradeoff_statement",
    "write_curves",
    "write_grid",
    "write_report",
]
