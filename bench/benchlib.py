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

from diffusion_jax import aot

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


# ----- analytic FLOPs: the library's count (diffusion_jax.aot), used by launch.plan too

matmul_flops = aot.matmul_flops


def compiled_stats(compiled) -> dict[str, Any]:
    """XLA's own figures for a compiled program: cost-analysis flops, memory analysis."""
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out["xla_flops"] = float(cost.get("flops", float("nan")))
    with contextlib.suppress(Exception):
        mem = aot.memory_report(compiled)
        out["program_bytes"], out["temp_bytes"] = mem.total_bytes, mem.temp_bytes
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
