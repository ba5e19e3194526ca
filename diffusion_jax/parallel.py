"""Device mesh, shardings and multi-host array assembly.

The mesh has two axes, `('data', 'fsdp')`, sized by `config.mesh.data` and
`config.mesh.fsdp`. Batches are split along their leading dimension over both axes
(every device holds different rows); parameters, EMA copies and optimiser state are
sharded over `'fsdp'` by `fsdp_spec` (replicated over `'data'`), or replicated when
`mesh.fsdp = 1` (plain data parallelism, the default). Everything else in the library
asks this module for meshes and shardings instead of building its own, so the layout is
decided in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """Resolves `mesh.data` x `mesh.fsdp` (device counts, -1 = the rest) on `num_devices`.

    Returns:
      `(data, fsdp)`, positive, with `data * fsdp == num_devices`.

    Raises:
      ValueError: one line naming the `mesh.*` field and the fix.
    """
    n = int(num_devices)
    data, fsdp = int(data), int(fsdp)
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value == 0 or value < -1:
            raise ValueError(
                f"mesh.{name}={value} must be a positive device count or -1 (the rest of the "
                f"{n} devices); set --config.mesh.{name}=-1 or a divisor of {n}."
            )
    if data == -1 and fsdp == -1:
        raise ValueError(
            "mesh.data=-1 and mesh.fsdp=-1: at most one axis can take the rest of the "
            "devices; set the other to a device count (--config.mesh.data=1: every device on "
            "fsdp)."
        )
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value != -1 and n % value:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"mesh.{name}={value} does not divide the {n} devices; set "
                f"--config.mesh.{name} to one of {divisors} (or -1, the rest)."
            )
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(
            f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but there are {n}; "
            "make the product the device count, or set one of them to -1 (the rest)."
        )
    return data, fsdp


def create_mesh(
    devices: Sequence[jax.Device] | None = None, *, data: int = -1, fsdp: int = 1
) -> Mesh:
    """Returns the `('data', 'fsdp')` mesh over `devices` (default: all global devices).

    Devices fill the mesh in order, `'fsdp'` fastest: with several processes (devices
    listed process by process) an `fsdp` group lies within one process when `fsdp`
    divides the local device count, so parameter all-gathers stay on the fast links.
    `data` and `fsdp` are the axes' device counts (-1 = the rest; fsdp=1: replicated
    parameters).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, fsdp)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def mesh_axes(config: Any) -> dict[str, int]:
    """`{'data': ..., 'fsdp': ...}` from a run config's `mesh` section (-1 kept).

    Reads the deprecated `training.fsdp=True` as `mesh.fsdp=-1` (and `mesh.data=1` when
    the data axis was left at -1), logging the new spelling. A config without a `mesh`
    section (one saved before it existed) gets the defaults, data=-1, fsdp=1.

    Raises:
      ValueError: if `training.fsdp=True` contradicts an explicit `mesh.fsdp`.
    """
    section = config.get("mesh", None) or {}
    data, fsdp = int(section.get("data", -1)), int(section.get("fsdp", 1))
    training = config.get("training", None) or {}
    if training.get("fsdp", False):
        if fsdp not in (1, -1):
            raise ValueError(
                f"training.fsdp=True (deprecated: the old spelling of mesh.fsdp=-1) "
                f"contradicts mesh.fsdp={fsdp}; drop --config.training.fsdp."
            )
        fsdp = -1
        data = 1 if data == -1 else data
        logging.warning(
            "training.fsdp=True is deprecated and will be removed: use "
            "--config.mesh.fsdp=-1 --config.mesh.data=%d instead.",
            data,
        )
    return {"data": data, "fsdp": fsdp}


def create_mesh_from_config(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`create_mesh` sized by `config.mesh` (and the deprecated `training.fsdp`)."""
    return create_mesh(devices, **mesh_axes(config))


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in MESH_AXES if a in mesh.shape)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading dimension split over both mesh axes."""
    return NamedSharding(mesh, P(_batch_axes(mesh)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a value every device holds whole (parameters, scalars)."""
    return NamedSharding(mesh, P())


def num_data_shards(mesh: Mesh) -> int:
    """Number of devices the batch dimension is split over (`data` x `fsdp`)."""
    return int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)], dtype=np.int64))


def num_fsdp_shards(mesh: Mesh) -> int:
    """Number of devices parameters are sharded over (1 = replicated)."""
    return int(mesh.shape.get(FSDP_AXIS, 1))


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
    """Assembles per-process numpy batches into global arrays sharded as batches.

    Each process passes its own slice (leading dimension = global batch / processes);
    the result is one global `jax.Array` per leaf, as a jitted step expects.
    """
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def global_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds whole -> a global array sharded as a batch."""
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
    by_start = {}
    for shard in x.addressable_shards:  # the first of the copies replicated over an axis
        by_start.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(by_start[k].data) for k in sorted(by_start)], axis=0)


# ----- parameter / optimiser-state layout --------------------------------------------


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int) -> P:
    """The FSDP rule for one array: split its largest evenly divisible dimension.

    Arrays smaller than `min_size` elements (biases, norms, scalars) stay replicated: the
    all-gather of a tiny array costs more than holding it. Among the dimensions divisible
    by `num_shards`, the largest is sharded over `'fsdp'` (ties: the last, the output
    channels of a conv kernel); an array with none stays replicated. The spec is
    replicated over `'data'`.
    """
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    divisible = [dim for dim, size in enumerate(shape) if size % num_shards == 0]
    if not divisible:
        return P()
    best = max(divisible, key=lambda dim: (shape[dim], dim))
    return P(*([None] * best + [FSDP_AXIS]))


def state_shardings(abstract_tree: Any, mesh: Mesh, *, min_size: int = 2**16) -> Any:
    """Shardings for a pytree of parameters / optimiser state / EMA copies.

    The one place the layout of model state is decided: each array by `fsdp_spec` over
    the mesh's `'fsdp'` axis (so everything is replicated when it has one device, plain
    data parallelism). Scalars and integer bookkeeping arrays (step counts,
    timestep-sampler history) follow the same rule, so small ones stay replicated.
    `abstract_tree` holds arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape`'s).
    """
    shards = num_fsdp_shards(mesh)

    def rule(leaf):
        return NamedSharding(mesh, fsdp_spec(np.shape(leaf), shards, min_size))

    return jax.tree.map(rule, abstract_tree)


@dataclasses.dataclass(frozen=True)
class FsdpGather:
    """Where FSDP parameters are whole: gathered for the step's compute, scattered back.

    The train step computes with every parameter whole (`gather`: constrained to
    replicated, one all-gather per sharded array, placed by the compiler) and puts the
    gradients back in the state's layout (`scatter`: `state_shardings`, a reduce-scatter).
    Without it the SPMD partitioner propagates the parameters' channel sharding into the
    activations: the UNet's train step then moves activations between batch and channel
    layouts (all-to-alls) and gathers whole-batch activations for weight gradients
    (README: Plan a run). Hashable, so it can sit in a step's static settings.
    """

    mesh: Mesh
    min_size: int

    @classmethod
    def for_mesh(cls, mesh: Mesh, min_size: int) -> FsdpGather | None:
        """The gather for `mesh`, or None where parameters are not sharded (fsdp = 1)."""
        return cls(mesh, int(min_size)) if num_fsdp_shards(mesh) > 1 else None

    def gather(self, tree: Any) -> Any:
        whole = replicated_sharding(self.mesh)
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), tree)

    def scatter(self, tree: Any) -> Any:
        shardings = state_shardings(tree, self.mesh, min_size=self.min_size)
        return jax.lax.with_sharding_constraint(tree, shardings)


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
