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


def global_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds whole -> a global array sharded over `'data'`."""
    return jax.make_array_from_callback(x.shape, data_sharding(mesh), lambda index: x[index])


def global_replicated(tree: Any, mesh: Mesh) -> Any:
    """Host values every process holds whole (parameters) -> arrays replicated on `mesh`.

    Global arrays no process holds whole (FSDP-sharded training state) are resharded.
    """
    sharding = replicated_sharding(mesh)

    def place(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        x = np.asarray(leaf)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start in seen:  # replicated over another mesh axis
            continue
        seen.add(start)
        rows.append(np.asarray(shard.data))
    return np.concatenate(rows, axis=0)


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


# ----- parameter / optimiser-state layout --------------------------------------------


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int) -> P:
    """The FSDP rule for one array: split its largest evenly divisible dimension.

    Arrays smaller than `min_size` elements (biases, norms, scalars) stay replicated: the
    all-gather of a tiny array costs more than holding it. Among the dimensions divisible
    by `num_shards`, the largest is sharded over `'data'` (ties: the last, the output
    channels of a conv kernel); an array with none stays replicated.

    Args:
      shape: the array's shape.
      num_shards: devices on the `'data'` axis.
      min_size: smallest element count that is sharded.

    Returns:
      A PartitionSpec.
    """
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    best = None
    for dim, size in enumerate(shape):
        if size % num_shards == 0 and (best is None or size >= shape[best]):
            best = dim
    if best is None:
        return P()
    return P(*([None] * best + [DATA_AXIS]))


def state_shardings(abstract_tree: Any, mesh: Mesh, *, fsdp: bool, min_size: int = 2**16) -> Any:
    """Shardings for a pytree of parameters / optimiser state / EMA copies.

    The one place the layout of model state is decided: replicated (data parallelism)
    unless `fsdp`, then each array by `fsdp_spec`. Scalars and integer bookkeeping
    arrays (step counts, timestep-sampler history) follow the same rule, so small ones
    stay replicated.

    Args:
      abstract_tree: pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape`).
      mesh: the training mesh.
      fsdp: shard over `'data'` instead of replicating.
      min_size: arrays with fewer elements stay replicated under FSDP.

    Returns:
      A matching pytree of `NamedSharding`s.
    """
    shards = num_data_shards(mesh)

    def rule(leaf):
        if not fsdp:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(np.shape(leaf), shards, min_size))

    return jax.tree.map(rule, abstract_tree)


# ----- processes ---------------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
    cpu_collectives: str = "gloo",
) -> None:
    """Starts `jax.distributed` when this is one of several processes.

    With an explicit `coordinator_address` (GPU clusters without SLURM, CPU tests) all
    three values must be given. Without one, `auto_detect` (the launcher found a cluster
    launcher's environment: a multi-task SLURM job, a multi-host TPU slice) lets
    `jax.distributed.initialize()` read the cluster; otherwise nothing is started (one
    process drives all local devices).
    On CPU, cross-process collectives go through `cpu_collectives` (gloo).

    Raises:
      ValueError: if only some of the three values are given, or they are inconsistent.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "multi-process runs need all of --coordinator_address=HOST:PORT, "
            "--num_processes=N and --process_id=I (or none of them on TPU pods / SLURM)."
        )
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
            )
        if num_processes == 1:
            return
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return
    if auto_detect:
        jax.distributed.initialize()  # TPU pod slices, SLURM: jax reads the cluster
