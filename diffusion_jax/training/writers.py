"""Metric writers and progress reporting for the training loops.

clu's writers (TensorBoard event files + log lines) and periodic actions
(`ReportProgress`: steps/s and ETA; `Profile`) when clu can be imported; clu's writers
import TensorFlow, so on machines without it (e.g. a GPU image with jax only) the same
interface is served by log lines. Either way process 0 also appends every scalar to
`DIR/metrics.jsonl` (one JSON object per logged step), which tests, the quickstart's
loss curves and users' scripts read without TensorFlow. Only process 0 writes files.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax.progress import Progress

METRICS_FILE = "metrics.jsonl"


class JsonlWriter:
    """Appends `{"step": s, name: value, ...}` lines to DIR/metrics.jsonl."""

    def __init__(self, workdir: epath.Path):
        self.path = epath.Path(workdir) / METRICS_FILE
        self._first = True

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        text = json.dumps(record) + "\n"
        if self._first:  # a line a killed run left unfinished keeps its own line
            self._first = False
            old = self.path.read_text() if self.path.exists() else ""
            if old and not old.endswith("\n"):
                text = "\n" + text
        with self.path.open("a") as f:
            f.write(text)


def read_metrics(workdir: epath.PathLike) -> list[dict]:
    """The records `JsonlWriter` appended to DIR/metrics.jsonl ([] when there are none).

    A line cut short (the run was killed while appending it) is skipped with a warning
    naming the file and the line; the lines after it are read.
    """
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            logging.warning(
                "%s line %d is not JSON (%s; cut short?): skipped.", path, number, e.msg
            )
    return records


class LoggingWriter:
    """Scalars as log lines (clu's LoggingWriter format) when clu cannot be imported."""

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        values = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, values)

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        for name, value in images.items():
            logging.info("[%d] image %s %s", step, name, np.shape(value))


class _Multi:
    """clu's writer interface over several writers; one that lacks a method (ours write
    scalars, and images as log lines) has nothing to do for it."""

    def __init__(self, writers):
        self.writers = writers

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for w in self.writers:
                if hasattr(w, name):
                    getattr(w, name)(*args, **kwargs)

        return call


def _clu():
    try:
        from clu import metric_writers, periodic_actions
    except ImportError:  # clu's writers need TensorFlow + TensorBoard
        return None, None
    return metric_writers, periodic_actions


def create_writer(workdir: epath.Path) -> Any:
    """The run's writer: TensorBoard + logs (+ metrics.jsonl) on process 0, logs elsewhere."""
    metric_writers, _ = _clu()
    primary = jax.process_index() == 0
    if metric_writers is not None:
        base = metric_writers.create_default_writer(
            str(workdir), just_logging=not primary, asynchronous=False
        )
    else:
        base = LoggingWriter()
    return _Multi([base, JsonlWriter(workdir)] if primary else [base])


def progress_actions(config: Any, workdir: epath.Path, writer: Any) -> list:
    """Periodic actions called after every step: progress report (+ profiler)."""
    training = config.training
    meter = Progress("training", training.num_steps, unit="steps", every_n=training.log_every,
                     also=(training.batch_size, "images"), untimed_first=True)  # fmt: skip
    actions = [meter.at]
    _, periodic_actions = _clu()
    if periodic_actions is None:
        return actions
    actions.append(
        periodic_actions.ReportProgress(
            num_train_steps=training.num_steps,
            writer=writer,
            every_steps=training.log_every,
            every_secs=None,
        )
    )
    if training.profile_steps and jax.process_index() == 0:
        actions.append(
            periodic_actions.Profile(
                logdir=str(workdir), num_profile_steps=training.profile_steps, every_secs=None
            )
        )
    return actions
