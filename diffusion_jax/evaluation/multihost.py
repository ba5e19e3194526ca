"""Sharded evaluation across processes: pad each host's rows, run globally, gather, unpad.

General helpers (candidates for `diffusion_jax/parallel.py`): every process holds its own
rows of an evaluation set (generated samples, a data shard), any number of them; a
global-view jitted function runs over the mesh of every device of every process; every
process gets the results for all rows back, in process order (process 0's rows first),
as numpy, so statistics computed from them are identical everywhere.

A mesh of only this process's devices (`create_mesh(jax.local_devices())`) is a local
computation: nothing is exchanged with other processes. A mesh must hold either only
this process's devices or devices of every process.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import parallel, resumable


def mesh_processes(mesh: Mesh) -> list[int]:
    """The process indices whose devices `mesh` holds, sorted.

    Raises:
      ValueError: if the mesh spans several, but not all, processes (its collectives
        would need processes outside it), or none of this process's devices.
    """
    procs = sorted({d.process_index for d in mesh.devices.flat})
    if procs == [jax.process_index()] or len(procs) == jax.process_count():
        return procs
    raise ValueError(
        f"the mesh holds devices of processes {procs}; it must hold either only this "
        f"process's devices ({jax.process_index()}) or devices of all "
        f"{jax.process_count()} processes."
    )


def _is_local(mesh: Mesh) -> bool:
    return mesh_processes(mesh) == [jax.process_index()]


def allgather_host(x: np.ndarray, mesh: Mesh) -> np.ndarray:
    """Stacks a host array that every process of `mesh` passes (same shape and dtype).

    A collective: every process of the mesh must call it, in the same order.

    Returns:
      `[num_mesh_processes, *x.shape]` numpy, row p from the p-th process of the mesh.
    """
    x = np.asarray(x)[None]
    return x if _is_local(mesh) else resumable.gather_rows(x)


def process_rows(mesh: Mesh, global_batch: int) -> list[np.ndarray]:
    """Which rows of a `[global_batch, ...]` array sharded over `'data'` each process holds.

    One sorted int array per process of the mesh (in process order): the global rows
    that `jax.make_array_from_process_local_data` fills from that process's local rows
    0, 1, ... (its devices' slices in increasing order).
    """
    index_map = parallel.data_sharding(mesh).devices_indices_map((global_batch,))
    rows: dict[int, set[int]] = {p: set() for p in mesh_processes(mesh)}
    for device, (index,) in index_map.items():
        rows[device.process_index].update(range(*index.indices(global_batch)))
    return [np.asarray(sorted(r), np.int64) for _, r in sorted(rows.items())]


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == 0:  # a process with nothing (left) to contribute
        return np.zeros((size, *x.shape[1:]), x.dtype)
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)


@dataclasses.dataclass(frozen=True)
class PadShardUnpad:
    """Runs a global-view function on per-process batches of any size (big_vision's
    `pad_shard_unpad`, across processes).

    `PadShardUnpad(fn, mesh, batch_size)(local_x)`: each process passes its own `[n, ...]`
    numpy rows, `n <= local_batch_size` (n may differ between processes and may be 0).
    The rows are padded to `local_batch_size` (by repeating the last, zeros when n == 0),
    assembled into one global array sharded over `'data'`, `fn` runs on it, its outputs
    are gathered to every host and the padding dropped. A collective: every process of
    the mesh calls it together, with arrays of the same trailing shape and dtype.

    Attributes:
      fn: `fn(x) -> pytree of [batch_size, ...] arrays`, row i computed from input row i
        (jitted, or calling jitted functions).
      mesh: a `parallel.create_mesh` mesh (the batch is split over all its axes).
      batch_size: global batch size, a multiple of the mesh's device count.
    """

    fn: Callable[[jax.Array], Any]
    mesh: Mesh
    batch_size: int

    def __post_init__(self):
        shards = parallel.num_data_shards(self.mesh)
        if self.batch_size <= 0 or self.batch_size % shards:
            raise ValueError(
                f"batch_size={self.batch_size} must be a positive multiple of the "
                f"{shards} devices the mesh splits a batch over."
            )

    @functools.cached_property
    def rows(self) -> list[np.ndarray]:
        """The global rows each process of the mesh feeds (`process_rows`)."""
        return process_rows(self.mesh, self.batch_size)

    @functools.cached_property
    def local_batch_size(self) -> int:
        """How many rows this process feeds per call."""
        procs = mesh_processes(self.mesh)
        return len(self.rows[procs.index(jax.process_index())])

    def __call__(self, local_x: np.ndarray, counts: Sequence[int] | None = None) -> list[Any]:
        """Runs `fn` on every process's `[n <= local_batch_size, ...]` rows `local_x`.

        `counts`: every mesh process's n, if the caller already exchanged them (saves
        one small collective). Returns one pytree of numpy arrays per process of the
        mesh, in process order, each with that process's n rows of `fn`'s outputs (the
        same on every process).
        """
        local_x = np.asarray(local_x)
        size = self.local_batch_size
        if local_x.shape[0] > size:
            raise ValueError(
                f"this process passed {local_x.shape[0]} rows; at most {size} per call."
            )
        if counts is None:
            counts = allgather_host(np.int64(local_x.shape[0]), self.mesh)
        x = parallel.host_to_global(_pad_rows(local_x, size), self.mesh)
        out = self.fn(x)
        if _is_local(self.mesh):
            out = jax.tree.map(np.asarray, out)
        else:  # replicated to every host
            out = resumable.fetch_global(out)
        return [
            jax.tree.map(lambda y, r=rows[: int(n)]: y[r], out)
            for rows, n in zip(self.rows, counts, strict=True)
        ]
