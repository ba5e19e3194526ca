"""Orbax save/restore of network parameters together with the effective config.

`restore_params` also reads training workdirs (see `checkpoints.workdir`).

Layout of a parameter checkpoint directory (what `launch.convert_checkpoint` writes):
  DIR/params/       Orbax StandardCheckpointer pytree: the Flax params tree
  DIR/config.json   the full effective config (ConfigDict as JSON)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax.files import absolute, read_json, write_text_atomic

if TYPE_CHECKING:  # ml_collections is imported lazily: the GPU image lacks it
    import ml_collections

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def save_params(
    directory: str | epath.PathLike, params: Any, config: ml_collections.ConfigDict
) -> epath.Path:
    """Writes the Flax `params` tree (not the `{'params': ...}` wrapper) and the effective
    `config` under `directory` (returned as an `epath.Path`; created if needed, its
    `params` subdirectory must not exist yet)."""
    directory = epath.Path(directory)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(
            f"{directory / PARAMS_DIR} already exists; choose a new --output directory."
        )
    if isinstance(params, dict) and set(params) == {"params"}:
        raise ValueError("save_params takes the params tree, not {'params': ...} variables.")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(absolute(directory / PARAMS_DIR), params)
    checkpointer.wait_until_finished()
    write_text_atomic(directory / CONFIG_FILE, config.to_json_best_effort(indent=2))
    return directory


def restore_config(directory: str | epath.PathLike) -> ml_collections.ConfigDict:
    """Reads the config saved beside the params (lists in place of tuples)."""
    path = epath.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} a save_params directory?")
    import ml_collections  # lazy: only restoring a config needs it

    return ml_collections.ConfigDict(
        read_json(path, hint="Re-create it with launch.convert_checkpoint.")
    )


def restore_params(
    directory: str | epath.PathLike,
    target: Any = None,
    *,
    step: int | None = None,
    ema_rate: float | None = None,
) -> tuple[Any, ml_collections.ConfigDict]:
    """Restores parameters and config from a `save_params` directory or a training workdir.

    Args:
      directory: a `convert_checkpoint` / `save_params` output directory, or a
        `launch.train` / `launch.train_classifier` workdir.
      target: optional abstract params tree (`jax.ShapeDtypeStruct`s, with shardings
        for a mesh) to restore into; None restores as saved.
      step: workdirs only: which checkpoint (default: the latest complete one).
      ema_rate: workdirs only: None = the raw parameters, else the EMA copy of that rate
        (one of the run's `training.ema_rates`).

    Returns:
      (params tree, config).

    Raises:
      FileNotFoundError: if `directory` is neither kind, or has no complete checkpoint.
      ValueError: `ema_rate`/`step` given for a converted checkpoint, or an ema_rate the
        run did not keep.
    """
    from diffusion_jax.checkpoints import workdir as workdir_lib

    directory = epath.Path(directory)
    if workdir_lib.is_workdir(directory):
        import ml_collections  # lazy: only restoring a config needs it

        params, config = workdir_lib.restore_workdir_params(
            directory, step=step, ema_rate=ema_rate, target=target
        )
        return params, ml_collections.ConfigDict(config)
    params_dir = directory / PARAMS_DIR
    if not params_dir.exists():
        raise FileNotFoundError(
            f"{directory} is neither a convert_checkpoint directory (no {PARAMS_DIR}/) nor a "
            "training workdir (no checkpoints/)."
        )
    if step is not None or ema_rate is not None:
        raise ValueError(
            f"{directory} is a converted checkpoint (one set of parameters): step and "
            "ema_rate apply to training workdirs only."
        )
    config = restore_config(directory)
    try:
        params = ocp.StandardCheckpointer().restore(absolute(params_dir), target)
    except Exception as e:  # Orbax/tensorstore: many types, multi-line specs
        raise workdir_lib.DamagedCheckpointError(
            f"{params_dir} cannot be read: {workdir_lib.short_reason(e)}; re-create it with "
            "launch.convert_checkpoint."
        ) from e
    return params, config


def check_param_shapes(params: Any, abstract: Any, where: str) -> None:
    """Checks that restored `params` has exactly the parameters and shapes of `abstract`.

    Raises:
      ValueError: starting with `where` (the checkpoint's flag or directory), naming the
        first parameter that is missing, mis-shaped or extra.
    """
    import jax  # lazy, as Orbax's own import of it

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k): tuple(int(d) for d in v.shape) for k, v in leaves}

    got, want = shapes(params), shapes(abstract)
    fields = "the model.* fields (num_channels, channel_mult, num_classes, learn_sigma, ...)"
    for name, shape in want.items():
        if name not in got:
            raise ValueError(
                f"{where}: parameter {name} of this config is not in the checkpoint; "
                f"{fields} must describe the checkpoint's network."
            )
        if got[name] != shape:
            raise ValueError(
                f"{where}: parameter {name} has shape {got[name]} in the checkpoint but "
                f"{shape} in this config; check {fields}."
            )
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(
            f"{where}: the checkpoint has parameters this config lacks ({extra[:3]}); "
            f"{fields} must describe the checkpoint's network."
        )
