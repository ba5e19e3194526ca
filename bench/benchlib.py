"""Shared pieces of the benchmarks: timing, compile counting, FLOPs, memory, the table.

Method (../shared/BENCHMARKING.md): warm up first so compilation stays out of the
numbers, time with `block_until_ready`, repeat and take the median, never time on zeros.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# The bf16 matmul rate of the H200 the anchors were measured on (ANCHORS.md), and the
# analytic forward FLOPs per image of the paper's models there (2 x MACs of convolutions,
# matmuls and linears at batch 1), for cross-checking the jaxpr count.
H200_BF16_FLOPS = 782e12
ANCHOR_GFLOPS = {
    "imagenet64": 219.4,
    "imagenet128": 613.9,
    "imagenet256": 2239.7,
    "imagenet256_uncond": 2239.7,
    "imagenet512": 3964.7,
    "upsample64_256": 1263.3,
    "upsample128_512": 5009.6,
    "classifier64": 38.2,
    "classifier128": 42.1,
    "classifier256": 146.7,
    "classifier512": 225.5,
}
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list]:
    """Median wall time of `fn()` (its result blocked on) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring) while active, by function name.

    A persistent-cache hit still counts: what matters is that jit asked for a program.
    """

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self._active = False

    def _listener(self, event, duration, **kwargs):
        if self._active and event == _BACKEND_COMPILE:
            self.events.append((str(kwargs.get("fun_name", "?")), float(duration)))

    def __enter__(self):
        self.events = []
        self._active = True
        self._callback = self._listener
        jax.monitoring.register_event_duration_secs_listener(self._callback)
        return self

    def __exit__(self, *exc):
        self._active = False
        jax.monitoring.unregister_event_duration_listener(self._callback)

    def count(self, name: str | None = None) -> int:
        """Compilations seen (of functions whose name contains `name`, if given)."""
        return sum(1 for n, _ in self.events if name is None or name in n)

    def seconds(self) -> float:
        return sum(d for _, d in self.events)


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


def compiled_stats(compiled) -> dict[str, Any]:
    """XLA's own figures for a compiled program: cost-analysis flops, memory analysis."""
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out["xla_flops"] = float(cost.get("flops", float("nan")))
    with contextlib.suppress(Exception):
        mem = compiled.memory_analysis()
        args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
        alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
        # Live at once: inputs, outputs not aliased to (donated) inputs, and scratch.
        out["program_bytes"] = int(args + outs - alias + temp)
        out["temp_bytes"] = int(temp)
    return out


def peak_memory_bytes() -> int | None:
    """The device's peak bytes in use so far (None where the backend has no stats)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def environment() -> dict[str, Any]:
    """Card, date and versions for RESULTS.md."""
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{dev.device_kind} x{jax.device_count()} ({jax.default_backend()})",
        "host": f"{platform.processor() or platform.machine()}, {_cpu_count()} cores",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def random_images(rng: np.random.Generator, shape, dtype=np.float32) -> np.ndarray:
    """Uniform [-1, 1] images: never zeros (they can run faster than real data)."""
    return rng.uniform(-1.0, 1.0, shape).astype(dtype)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Prints rows as an aligned table; columns are (key, header, format)."""

    def cell(row, key, fmt):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        return format(v, fmt) if fmt else str(v)

    table = [[h for _, h, _ in columns]]
    table += [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for j, line in enumerate(table):
        cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
