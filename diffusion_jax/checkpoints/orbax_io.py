"""Orbax save/restore of network parameters together with the effective config.

Layout of a parameter checkpoint directory (what `launch.convert_checkpoint` writes):
  DIR/params/       Orbax StandardCheckpointer pytree: the Flax params tree
  DIR/config.json   the full effective config (ConfigDict as JSON)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import orbax.checkpoint as ocp
from etils import epath

if TYPE_CHECKING:  # ml_collections is imported lazily: the GPU image lacks it
    import ml_collections

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def save_params(
    directory: str | epath.PathLike, params: Any, config: ml_collections.ConfigDict
) -> epath.Path:
    """Writes `params` and the effective `config` under `directory`.

    Args:
      directory: output directory (local or `gs://`); created if needed. Its `params`
        subdirectory must not exist yet.
      params: the Flax params tree (not the `{'params': ...}` wrapper).
      config: the effective config the params belong to.

    Returns:
      The directory, as an `epath.Path`.
    """
    directory = epath.Path(directory)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(
            f"{directory / PARAMS_DIR} already exists; choose a new --output directory."
        )
    if isinstance(params, dict) and set(params) == {"params"}:
        raise ValueError("save_params takes the params tree, not {'params': ...} variables.")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((directory / PARAMS_DIR).resolve(), params)
    checkpointer.wait_until_finished()
    (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    return directory


def restore_config(directory: str | epath.PathLike) -> ml_collections.ConfigDict:
    """Reads the config saved beside the params (lists in place of tuples)."""
    path = epath.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a save_params directory?")
    import ml_collections  # lazy: only restoring a config needs it

    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_params(
    directory: str | epath.PathLike, target: Any = None
) -> tuple[Any, ml_collections.ConfigDict]:
    """Restores params and config written by `save_params`.

    Args:
      directory: the directory given to `save_params`.
      target: optional abstract params tree (`jax.ShapeDtypeStruct`s, with shardings
        for a mesh) to restore into; None restores as saved.

    Returns:
      (params tree, config).
    """
    directory = epath.Path(directory)
    params_dir = directory / PARAMS_DIR
    if not params_dir.exists():
        raise FileNotFoundError(f"{params_dir} not found: is {directory} a save_params directory?")
    config = restore_config(directory)
    params = ocp.StandardCheckpointer().restore(params_dir.resolve(), target)
    return params, config
