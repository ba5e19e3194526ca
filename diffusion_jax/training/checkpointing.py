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

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from diffusion_jax.training.state import TrainState

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


def _join(items: dict[str, Any]) -> TrainState:
    extra = items["extra"]
    return TrainState(
        step=extra["step"],
        params=items["params"],
        opt_state=items["opt_state"],
        ema=items.get("ema", {}),
        sampler=extra["sampler"],
        nonfinite=extra["nonfinite"],
        rng=extra["rng"],
    )


def gather_data_positions(position: dict[str, int]) -> list[dict[str, int]]:
    """Every process's input position, in process order (a collective: all must call).

    Hosts skip unreadable images on their own, so one host's position is not another's.
    """
    keys = ("epoch", "position", "skipped")
    local = np.asarray([int(position.get(k, 0)) for k in keys], np.int64)
    if jax.process_count() == 1:
        rows = local[None]
    else:
        rows = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys))
    return [dict(zip(keys, map(int, row))) for row in rows]


def save(
    manager: ocp.CheckpointManager,
    state: TrainState,
    data_positions: list[dict[str, int]],
    config_json: str,
    *,
    force: bool = True,
) -> None:
    """Starts an async save of `state` at its step (all processes call it)."""
    step = int(jax.device_get(state.step))
    items = {name: ocp.args.StandardSave(value) for name, value in _split(state).items()}
    items["data"] = ocp.args.JsonSave(
        {"process_count": len(data_positions), "processes": data_positions}
    )
    items["config"] = ocp.args.JsonSave(json.loads(config_json))
    manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
    manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None
) -> tuple[TrainState, list[dict[str, int]], dict]:
    """Restores a step (default: the latest complete one) into `abstract_state`.

    Args:
      manager: from `create_manager`.
      abstract_state: `jax.ShapeDtypeStruct` leaves with the shardings to restore into.
      step: which step; None = latest.

    Returns:
      (state, data positions of every process, saved config as a dict).
    """
    step = manager.latest_step() if step is None else step
    abstract = _split(abstract_state)
    args = {
        name: ocp.args.StandardRestore(abstract[name]) for name in _ARRAY_ITEMS if name in abstract
    }
    args["data"] = ocp.args.JsonRestore()
    args["config"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    state = _join({name: restored[name] for name in _ARRAY_ITEMS if name in abstract})
    return state, restored["data"]["processes"], restored["config"]
