"""The multi-process flags every job launcher shares (train, train_classifier, sample).

  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
Omitted on TPU pod slices and SLURM jobs, where `jax.distributed.initialize()` reads
the cluster, and on a single machine (one process drives all its devices).
"""

import os

from absl import flags

from diffusion_jax import parallel

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _cluster_detected() -> bool:
    # A multi-task SLURM job, or a multi-host TPU slice (its worker list names several).
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize() -> None:
    """Starts jax.distributed from the flags (or auto-detection); call before any jax work."""
    parallel.initialize_distributed(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        auto_detect=_cluster_detected(),
    )
