"""Device mesh, shardings and multi-host array assembly.

Data parallelism is `jax.jit` over a `Mesh` with one `'data'` axis: batches are sharded
along their leading dimension, parameters are replicated. Everything else in the library
asks this module for shardings instead of building its own, so the layout is decided in
one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh named `'data'` over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading dimension split over the `'data'` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a value every device holds whole (parameters, scalars)."""
    return NamedSharding(mesh, P())


def num_data_shards(mesh: Mesh) -> int:
    """Number of devices the batch dimension is split over."""
    return mesh.shape[DATA_AXIS]


def check_global_batch(global_batch_size: int, mesh: Mesh) -> int:
    """Validates a global batch size and returns this process's share of it.

    Raises:
      ValueError: if the batch does not split evenly over devices and processes.
    """
    shards = num_data_shards(mesh)
    if global_batch_size % shards:
        raise ValueError(
            f"batch_size={global_batch_size} must be divisible by the number of devices "
            f"({shards}); set the batch size to a multiple of {shards}."
        )
    return global_batch_size // jax.process_count()


def host_to_global(tree: Any, mesh: Mesh) -> Any:
    """Assembles per-process numpy batches into global arrays sharded over `'data'`.

    Each process passes its own slice (leading dimension = global batch / processes);
    the result is one global `jax.Array` per leaf, as a jitted step expects.
    """
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pads the leading dimension of `x` up to a multiple of `multiple` by repeating rows.

    Returns:
      The padded array and the number of real rows, so callers can drop the padding
      after a sharded computation (used for the last, short batch of an evaluation).
    """
    n = x.shape[0]
    pad = (-n) % multiple
    if pad == 0:
        return x, n
    filler = np.repeat(x[-1:], pad, axis=0)
    return np.concatenate([x, filler], axis=0), n
