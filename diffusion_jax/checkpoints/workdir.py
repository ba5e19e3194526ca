"""Reading a training workdir's checkpoints without the training code (for sampling).

A training workdir (`launch.train`) holds `checkpoints/<step>/` written by an Orbax
CheckpointManager with the items below; `diffusion_jax.training.checkpointing` writes
them. Here only the parameters (raw or one EMA copy) and the config are read, so a
sampling job never loads the optimiser state.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from diffusion_jax import files, resumable

CHECKPOINTS_DIR = "checkpoints"
ITEMS = ("params", "ema", "opt_state", "extra", "data", "config")
JSON_ITEMS = ("data", "config")
_T = TypeVar("_T")
# Orbax writes a replicated array cooperatively, a slice from each replica, so that the
# hosts of a pod share the writing. It pays for large arrays only: every slice is an
# eagerly dispatched (and, per shape, compiled) program, and on one host of 8 devices a
# tiny model's first save took 10 s, mostly compiling slices (bench/RESULTS.md,
# "Checkpoint saves"). Arrays are split over replicas only where each slice holds at
# least this much.
REPLICA_SLICE_MIN_BYTES = 1 << 20


class DamagedCheckpointError(OSError):
    """A listed checkpoint step that cannot be read (truncated arrays, missing metadata)."""


def short_reason(error: BaseException) -> str:
    """A short one-line account of a read failure (tensorstore's specs cut off)."""
    message = " ".join(str(error).split()) or type(error).__name__
    message = re.split(r" \[tensorstore_spec", message)[0].rstrip(".")
    return message if len(message) <= 240 else message[:237] + "..."


def read_step(directory: str | epath.PathLike, step: int, read: Callable[[], _T]) -> _T:
    """Runs `read()` (an Orbax read of checkpoint `step`), naming the step on failure.

    Raises:
      DamagedCheckpointError: whatever the read raised, as one line naming the step's
        directory and what was wrong.
    """
    try:
        return read()
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files
        where = epath.Path(directory) / CHECKPOINTS_DIR / str(step)
        raise DamagedCheckpointError(f"checkpoint {where} is damaged: {short_reason(e)}") from e


def restore_newest_readable(
    manager: ocp.CheckpointManager, directory: str | epath.PathLike, restore: Callable[[int], _T]
) -> tuple[_T, int] | None:
    """`restore(step)` of the newest step that reads; None when there are no steps.

    A step whose `restore` raises `DamagedCheckpointError` (see `read_step`) is skipped
    with a one-line warning naming it and what was wrong, and the previous complete step
    is tried. Any other error (a config that does not match, say) propagates.

    Raises:
      FileNotFoundError: every complete step is damaged (names the directory and the
        newest one's fault).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    damaged = []
    for step in steps:
        try:
            result = restore(step)
        except DamagedCheckpointError as e:
            damaged.append(str(e))
            continue
        for message in damaged:
            logging.warning("%s; using the newest readable one, step %d, instead.", message, step)
        return result, step
    raise FileNotFoundError(
        f"no readable checkpoint in {epath.Path(directory) / CHECKPOINTS_DIR}: all "
        f"{len(steps)} are damaged (the newest: {damaged[0]})."
    )


def ema_key(rate: float) -> str:
    """The name of an EMA copy in the train state and in checkpoints ('ema_0_9999').

    No dots: Orbax joins tree keys with dots in its on-disk names.
    """
    return "ema_" + repr(float(rate)).replace(".", "_").replace("-", "m")


def create_manager(
    workdir: str | epath.PathLike, *, keep: int, read_only: bool = False
) -> ocp.CheckpointManager:
    """The run's CheckpointManager (async saves, the newest `keep` steps kept), on the
    absolute path of `workdir` (Orbax's array writer refuses a relative one, such as the
    quickstart's default `quickstart_out`)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    arrays = functools.partial(ocp.PyTreeCheckpointHandler, type_handler_registry=_type_handlers())
    handlers = {n: ocp.JsonCheckpointHandler() if n in JSON_ITEMS else arrays() for n in ITEMS}
    return ocp.CheckpointManager(
        files.absolute(workdir) / CHECKPOINTS_DIR, options=options, item_handlers=handlers
    )


@functools.cache
def _type_handlers() -> Any:
    """Orbax's type handlers, its jax.Array one splitting over replicas only in slices of
    `REPLICA_SLICE_MIN_BYTES` (a registry of this module's own: nothing global changes)."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        *((t, th.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str))
    )
    default = th.get_type_handler(jax.Array)
    array = th.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_SLICE_MIN_BYTES,
        array_metadata_store=getattr(default, "_array_metadata_store", None),
    )
    registry.add(jax.Array, array)
    return registry


def array_save(tree: Any) -> ocp.args.CheckpointArgs:
    """The args that save a tree of arrays as a workdir item (the same files as Orbax's
    `StandardSave`)."""
    return ocp.args.PyTreeSave(tree)


def array_restore(abstract: Any) -> ocp.args.CheckpointArgs:
    """The args that restore a workdir item onto `abstract`'s shapes, dtypes, shardings."""
    return ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )


def saved_target(manager: ocp.CheckpointManager, step: int, item: str) -> Any:
    """Abstract tree of an array item as saved, on this process's first device.

    Restoring with it works whatever topology wrote the checkpoint (a pod's workdir
    read on one GPU); the arrays land on one local device.
    """

    metadata = manager.item_metadata(step)[item]
    if metadata is None:
        raise FileNotFoundError(f"checkpoint step {step} has no {item!r} item.")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
        metadata,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )


def is_workdir(directory: str | epath.PathLike) -> bool:
    """Whether `directory` is a training workdir (has a checkpoints/ folder)."""
    return (epath.Path(directory) / CHECKPOINTS_DIR).is_dir()


def restore_workdir_params(
    directory: str | epath.PathLike,
    *,
    step: int | None = None,
    ema_rate: float | None = None,
    target: Any = None,
) -> tuple[Any, dict]:
    """(params, saved config dict) of a training workdir, without optimiser state.

    The raw parameters (ema_rate None) or one of the run's EMA copies, of `step` (None:
    the latest complete one), restored into the abstract tree `target` if given.

    Raises:
      FileNotFoundError: no complete checkpoint (or not that step).
      ValueError: ema_rate is not one the run kept.
    """
    manager = create_manager(directory, keep=0, read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"{epath.Path(directory) / CHECKPOINTS_DIR} holds no complete checkpoint yet."
            )
        restore = functools.partial(_restore_params, manager, directory, ema_rate, target)
        if step is not None:  # the step asked for, or a one-line error
            if step not in steps:
                raise FileNotFoundError(
                    f"{directory} has no checkpoint at step {step}; it has {steps}."
                )
            return restore(step)
        return restore_newest_readable(manager, directory, restore)[0]
    finally:
        manager.close()


def _restore_params(
    manager: ocp.CheckpointManager, directory, ema_rate, target, step: int
) -> tuple[Any, dict]:
    json_args = ocp.args.Composite(config=ocp.args.JsonRestore())
    config = read_step(directory, step, lambda: manager.restore(step, args=json_args))["config"]
    if ema_rate is None:
        item, wrap = "params", target
    else:
        rates = config.get("training", {}).get("ema_rates", [])
        if ema_key(ema_rate) not in {ema_key(r) for r in rates}:
            raise ValueError(
                f"ema_rate={ema_rate} is not kept by the run in {directory}: its "
                f"training.ema_rates are {tuple(rates)} (use one of them, or None for the raw "
                "parameters)."
            )
        item = "ema"
        wrap = None if target is None else {ema_key(r): target for r in rates}

    def read():
        abstract = saved_target(manager, step, item) if wrap is None else wrap
        args = ocp.args.Composite(**{item: array_restore(abstract)})
        return manager.restore(step, args=args)[item]

    restored = read_step(directory, step, read)
    params = restored if ema_rate is None else restored[ema_key(ema_rate)]
    return params, config


def complete_steps(directory: str | epath.PathLike) -> list[int]:
    """The complete checkpoint steps of a training workdir, oldest first."""
    manager = create_manager(directory, keep=0, read_only=True)
    try:
        return sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()


def checkpoint_identity(directory: str | epath.PathLike, step: int | None = None) -> dict:
    """What a result drawn from the checkpoint `directory` was drawn from.

    `{"step": a training workdir's step (default: the newest complete one; None for a
    `convert_checkpoint` directory), "content": a digest of the names, sizes and
    modification times of that step's (or the directory's) files}`: it changes when
    training advances or re-saves the workdir, or the directory is converted again. No
    array is read.

    Raises:
      FileNotFoundError: no such directory, or a workdir without a complete checkpoint.
    """
    directory = epath.Path(directory)
    if not is_workdir(directory):
        return {"step": None, "content": resumable.path_identity(directory)}
    steps = complete_steps(directory)
    step = (steps[-1] if steps else None) if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory / CHECKPOINTS_DIR} holds no complete checkpoint yet.")
    where = directory / CHECKPOINTS_DIR / str(step)
    return {"step": int(step), "content": resumable.path_identity(where)}
