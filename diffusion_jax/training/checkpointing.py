"""Training checkpoints: Orbax CheckpointManager over composite items.

Layout of a training workdir:
  DIR/config.json                      the effective config of the run
  DIR/checkpoints/<step>/params/       raw parameters
  DIR/checkpoints/<step>/ema/          {rate: parameters} for every training.ema_rates
  DIR/checkpoints/<step>/opt_state/    optimiser state
  DIR/checkpoints/<step>/extra/        step, timestep-sampler state, non-finite counts, rng
  DIR/checkpoints/<step>/data/         the input position of EVERY process (JSON)
  DIR/checkpoints/<step>/config/       the effective config (JSON)
Orbax writes each step into a temporary directory and renames it when every item is
complete, so a save killed half-way is never listed as a step and never restored.
Parameters can be read alone (`restore_params`) without the optimiser state.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import resumable
from diffusion_jax.checkpoints.workdir import (
    array_restore,
    array_save,
    read_step,
    restore_newest_readable,
)
from diffusion_jax.training.state import TrainState


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (read-only or full disk): the run stops."""


_ARRAY_ITEMS = ("params", "ema", "opt_state", "extra")


def _split(state: TrainState) -> dict[str, Any]:
    # A run without EMA (the paper's classifiers) saves no "ema" item: Orbax refuses
    # empty trees.
    items = {
        "params": state.params,
        "ema": state.ema,
        "opt_state": state.opt_state,
        "extra": {
            "step": state.step,
            "sampler": state.sampler,
            "nonfinite": state.nonfinite,
            "rng": state.rng,
        },
    }
    if not state.ema:
        del items["ema"]
    return items


def gather_data_positions(position: dict[str, int]) -> list[dict[str, int]]:
    """Every process's input position, in process order (a collective: all must call).

    Hosts skip unreadable images on their own, so one host's position is not another's.
    """
    keys = ("epoch", "position", "skipped")
    rows = resumable.gather_rows(np.asarray([[int(position.get(k, 0)) for k in keys]], np.int64))
    return [dict(zip(keys, map(int, row))) for row in rows]


def save(
    manager: ocp.CheckpointManager,
    state: TrainState,
    data_positions: list[dict[str, int]],
    config_json: str,
) -> None:
    """Starts an async save of `state` at its step (all processes call it).

    Raises:
      CheckpointSaveError: this save or the previous (asynchronous) one failed; one line
        naming the directory and the cause.
    """
    step = int(jax.device_get(state.step))
    items = {name: array_save(value) for name, value in _split(state).items()}
    items["data"] = ocp.args.JsonSave(
        {"process_count": len(data_positions), "processes": data_positions}
    )
    items["config"] = ocp.args.JsonSave(json.loads(config_json))
    with save_errors(manager, step):
        manager.save(step, args=ocp.args.Composite(**items), force=True)


@contextlib.contextmanager
def save_errors(manager: ocp.CheckpointManager, step: int | None = None) -> Iterator[None]:
    """Turns any error of an Orbax save (or wait for one) into a `CheckpointSaveError`."""
    try:
        yield
    except Exception as error:
        # Orbax reports a background write's failure at the next save or wait.
        when = "" if step is None else f" (saving step {step}, or the save before it)"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise CheckpointSaveError(
            f"writing a checkpoint under {manager.directory} failed{when}: {reason[:300]}; "
            "the run stops: check that the directory is writable and the disk has space."
        ) from error


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raises `CheckpointSaveError` now if an asynchronous save has failed already.

    Multi-process a collective (all must call it): a failure on one process stops all of
    them, so none waits out Orbax's barrier timeout in the next save.
    """
    error = None
    try:
        manager.check_for_errors()
    except Exception as e:
        error = e
    if resumable.any_process(error is not None) and error is None:
        raise CheckpointSaveError(
            f"writing a checkpoint under {manager.directory} failed on another process "
            "(see its log); the run stops."
        )
    if error is not None:
        with save_errors(manager):
            raise error


def finish_saves(manager: ocp.CheckpointManager) -> None:
    """Waits for pending saves and closes the manager; a failed save raises."""
    try:
        with save_errors(manager):
            manager.wait_until_finished()
    except CheckpointSaveError:
        abandon(manager)
        raise
    manager.close()


def abandon(manager: ocp.CheckpointManager, timeout_s: float = 60.0) -> None:
    """Closes the manager after an error, in at most `timeout_s`, never raising.

    Without it an exception leaving the loop leaves Orbax's save threads behind, and the
    process waits for them at exit.
    """

    def close():
        try:
            manager.close()
        except Exception as e:  # the run is failing already; its own error is what counts
            logging.warning("closing the checkpoint manager: %s", " ".join(str(e).split()))

    thread = threading.Thread(target=close, daemon=True)
    thread.start()
    thread.join(timeout_s)


def restore(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    step: int | None = None,
    *,
    check_config: Callable[[dict, int], None] | None = None,
) -> tuple[TrainState, list[dict[str, int]], dict]:
    """Restores a step (default: the latest complete one) into `abstract_state`.

    Args:
      manager: from `create_manager`.
      abstract_state: `jax.ShapeDtypeStruct` leaves with the shardings to restore into.
      step: which step; None = latest.
      check_config: called with (saved config, step) before the arrays are read; raises
        for a run of another config.

    Returns:
      (state, data positions of every process, saved config as a dict).

    Raises:
      DamagedCheckpointError: the step cannot be read (names it and what is wrong).
    """
    step = manager.latest_step() if step is None else step
    directory = manager.directory.parent
    json_args = {"data": ocp.args.JsonRestore(), "config": ocp.args.JsonRestore()}
    saved = read_step(
        directory, step, lambda: manager.restore(step, args=ocp.args.Composite(**json_args))
    )
    if check_config is not None:
        check_config(saved["config"], step)
    abstract = _split(abstract_state)
    args = {name: array_restore(abstract[name]) for name in _ARRAY_ITEMS if name in abstract}
    restored = read_step(
        directory, step, lambda: manager.restore(step, args=ocp.args.Composite(**args))
    )
    state = TrainState(
        params=restored["params"],
        opt_state=restored["opt_state"],
        ema=restored["ema"] if "ema" in abstract else {},
        **restored["extra"],  # step, sampler, nonfinite, rng
    )
    return state, saved["data"]["processes"], saved["config"]


DAMAGED_DIR = "damaged_checkpoints"


def set_aside_newer(manager: ocp.CheckpointManager, step: int) -> None:
    """Moves the checkpoints newer than `step` (damaged ones) to DIR/damaged_checkpoints/.

    The resumed run saves those steps again; Orbax refuses to save a step that exists.
    All processes call it (process 0 moves, then every manager re-reads its steps).
    """
    newer = [s for s in manager.all_steps() if s > step]
    if not newer:
        return
    root = manager.directory
    if jax.process_index() == 0:
        aside = root.parent / DAMAGED_DIR
        aside.mkdir(parents=True, exist_ok=True)
        for s in newer:
            target = aside / str(s)
            n = 1
            while target.exists():
                target, n = aside / f"{s}.{n}", n + 1
            (root / str(s)).rename(target)
            logging.warning("Moved damaged checkpoint %s to %s.", root / str(s), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("diffusion_jax: damaged checkpoints set aside")
    manager.reload()


def restore_newest(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    *,
    check_config: Callable[[dict, int], None] | None = None,
) -> tuple[tuple[TrainState, list[dict[str, int]], dict], int] | None:
    """`restore` of the newest readable step, skipping damaged ones with a warning.

    Returns:
      ((state, data positions, saved config), step), or None without any checkpoint.

    Raises:
      FileNotFoundError: every checkpoint is damaged.
    """

    def read(step):
        return restore(manager, abstract_state, step, check_config=check_config)

    return restore_newest_readable(manager, manager.directory.parent, read)
