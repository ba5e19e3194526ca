"""Ahead-of-time compilation: a step's compiled per-device memory, compile time and FLOPs.

A run compiles its step (`jit(...).lower(abstract args).compile()`) before it reads any
data, logs what XLA's memory analysis says one device holds, and is refused in one line
when that cannot fit the device (`compile_and_check`). `launch.plan` uses the same pieces
to size a run without running it. The analytic FLOP count (`matmul_flops`) is the one the
benchmarks use (2 x MACs of convolutions and dots, as ../shared/ANCHORS.md counts).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

GIB = 2**30
TRAINING_LEVERS = (
    "shard the state with --config.mesh.fsdp=-1 --config.mesh.data=1, accumulate "
    "gradients with --config.training.microbatch=B (a divisor of the batch), or "
    "recompute activations with --config.model.remat=True"
)


class DoesNotFitError(ValueError):
    """A compiled step needs more memory per device than the device holds."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """XLA's memory analysis of one compiled program, bytes per device.

    Attributes:
      argument_bytes: inputs (state shards, batch shards).
      output_bytes: outputs (the new state, metrics).
      alias_bytes: outputs written into donated inputs (counted once).
      temp_bytes: scratch: activations kept for the backward pass, gradients, buffers.
      compile_seconds: lower + compile wall time.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        """Live at once: inputs, outputs not aliased to (donated) inputs, and scratch."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def summary(self) -> str:
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        return (
            f"{g(self.total_bytes)} GiB per device (arguments {g(self.argument_bytes)}, "
            f"outputs {g(self.output_bytes)}, donated {g(self.alias_bytes)}, temporaries "
            f"{g(self.temp_bytes)} GiB)"
        )


def memory_report(compiled: Any, compile_seconds: float = 0.0) -> MemoryReport:
    """The `MemoryReport` of a `jax.stages.Compiled`."""
    mem = compiled.memory_analysis()
    kinds = ("argument", "output", "alias", "temp")
    sizes = (int(getattr(mem, f"{kind}_size_in_bytes")) for kind in kinds)
    return MemoryReport(*sizes, float(compile_seconds))


def sharded_bytes(abstract_tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `jax.ShapeDtypeStruct`s / arrays.

    Exact for parameters, EMA copies and optimiser state: their layout is decided by the
    shardings, not by the compiler. Leaves without a sharding count whole.
    """
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        sharding = getattr(leaf, "sharding", None)
        shape = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def device_memory_bytes(device_memory_gb: float = 0.0) -> int | None:
    """Memory of one device: `device_memory_gb` GiB when > 0, else what the backend says.

    None where neither is known (the CPU backend reports no memory).

    Raises:
      ValueError: for a negative `device_memory_gb`.
    """
    if device_memory_gb < 0:
        raise ValueError(
            f"device_memory_gb={device_memory_gb} must be positive (GiB per device), or 0 "
            "for what the backend reports."
        )
    if device_memory_gb > 0:
        return int(device_memory_gb * GIB)
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")  # addressable
    return int(limit) if limit else None


def compile_and_check(
    jitted: Callable,
    abstract_args: Sequence[Any],
    *,
    what: str,
    device_memory_gb: float = 0.0,
    levers: str = TRAINING_LEVERS,
) -> tuple[Any, MemoryReport]:
    """Compiles `jitted` for abstract arguments, logs its memory, refuses what cannot fit.

    `abstract_args` are sharded `jax.ShapeDtypeStruct` trees; `what` names the step in
    messages ('train step'); `device_memory_gb` 0 = what the backend reports (none on
    CPU: nothing is refused there). Returns `(compiled, report)`.

    Raises:
      DoesNotFitError: one line: the figures and the `levers` to pull.
    """
    limit = device_memory_bytes(device_memory_gb)
    start = time.perf_counter()
    compiled = jitted.lower(*abstract_args).compile()
    report = memory_report(compiled, time.perf_counter() - start)
    logging.info("Compiled the %s in %.1f s: %s.", what, report.compile_seconds, report.summary())
    if limit is not None and report.total_bytes > limit:
        raise DoesNotFitError(
            f"the {what} needs {report.summary()} but a device holds "
            f"{limit / GIB:.2f} GiB; {levers}."
        )
    return compiled, report


# ----- analytic FLOPs from the jaxpr ---------------------------------------------------


def _eqn_macs(eqn) -> int:
    prim = eqn.primitive.name
    if prim == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval
        return math.prod(out.shape) * math.prod(lhs[d] for d in lhs_contract)
    if prim == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        return math.prod(out) * math.prod(rhs) // rhs[out_feature_dim]
    return 0


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _subs(eqn):
            total += mult * _jaxpr_macs(sub)
    return total


def _subs(eqn):
    for v in eqn.params.values():
        for item in v if isinstance(v, tuple | list) else (v,):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def matmul_flops(fn: Callable, *args, **kwargs) -> float:
    """2 x MACs of every convolution and dot in `fn(*args)` (traced abstractly, no compile).

    The count of ANCHORS.md (convolutions, matmuls, linears; elementwise work excluded).
    Arguments may be `jax.ShapeDtypeStruct`s.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return 2.0 * _jaxpr_macs(closed.jaxpr)


__all__ = [
    "DoesNotFitError",
    "MemoryReport",
    "compile_and_check",
    "device_memory_bytes",
    "matmul_flops",
    "memory_report",
    "sharded_bytes",
]
