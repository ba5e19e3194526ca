"""The README's "Plan a run" table: per-device memory of every paper config at its batch.

  XLA_FLAGS=--xla_force_host_platform_device_count=256 PYTHONPATH=. \
    python bench/plan_table.py --mode=state --out=bench/plan_state.jsonl
  XLA_FLAGS=--xla_force_host_platform_device_count=64 PYTHONPATH=. \
    python bench/plan_table.py --mode=compile --jobs=imagenet64:8:dp,... \
      --out=bench/plan_compiled.jsonl

`state`: parameter + EMA + optimiser bytes per device from the shardings (exact on every
backend; no compile) for 8, 64, 256 devices, data-parallel and FSDP. `compile`: the train
step compiled by `diffusion_jax.jobs.plan` (launch.plan's code) for `config:devices:variant`
jobs (dp, fsdp, fsdp_remat), one JSON line each as it finishes. `sample`: the config's
sampling program (`config:devices` jobs). `render`: the README's tables.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import time

import jax
from absl import app, flags

from bench import benchlib
from diffusion_jax import aot, parallel
from diffusion_jax.jobs import plan
from diffusion_jax.training import loop

CONFIGS = (
    "imagenet64", "imagenet128", "imagenet256", "imagenet256_uncond", "imagenet512",
    "lsun_bedroom", "upsample64_256", "upsample128_512",
    "classifier64", "classifier128", "classifier256", "classifier512",
)  # fmt: skip
VARIANTS = {
    "dp": plan.Variant(),
    "fsdp": plan.Variant(fsdp=True),
    "fsdp_remat": plan.Variant(fsdp=True, remat=True),
}
_MODE = flags.DEFINE_enum("mode", "state", ["state", "compile", "sample", "render"], "What to do.")
_JOBS = flags.DEFINE_list(
    "jobs", [], "config:devices:variant for --mode=compile, config:devices for --mode=sample."
)
_OUT = flags.DEFINE_string("out", "", "JSON lines file to append to.")
_STATE = flags.DEFINE_string("state", "bench/plan_state.jsonl", "--mode=render: state rows.")
_COMPILED = flags.DEFINE_string(
    "compiled", "bench/plan_compiled.jsonl", "--mode=render: compiled rows."
)
_SAMPLING = flags.DEFINE_string(
    "sampling", "bench/plan_sampling.jsonl", "--mode=render: sampling rows."
)


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def _commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _write(row):
    env = {k: v for k, v in benchlib.environment().items() if k != "device"}
    flags = os.environ.get("XLA_FLAGS", "")  # e.g. --xla_backend_optimization_level=0
    row = {**row, **env, "commit": _commit(), "xla_flags": flags}
    print(json.dumps(row), flush=True)
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.write(json.dumps(row) + "\n")


def state_rows():
    done = {(r["config"], r["devices"], r["variant"]) for r in _read(_OUT.value)}
    for name in CONFIGS:
        config = plan.variant_config(_config(name), VARIANTS["dp"])
        mesh = parallel.create_mesh_from_config(config, jax.devices()[:1])
        abstract = loop.create_setup(config, mesh, plan.trainer_of(config)).abstract_state
        min_size = int(config.training.fsdp_min_size)
        for n in (8, 64, 256):
            for key in ("dp", "fsdp"):
                if (name, n, key) in done:
                    continue
                fsdp = -1 if key == "fsdp" else 1
                mesh = parallel.create_mesh(jax.devices()[:n], data=-1 if fsdp == 1 else 1,
                                            fsdp=fsdp)  # fmt: skip
                shardings = parallel.state_shardings(abstract, mesh, min_size=min_size)
                state = jax.tree.map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                    abstract,
                    shardings,
                )
                _write(
                    {
                        "config": name,
                        "batch": int(config.training.batch_size),
                        "devices": n,
                        "variant": key,
                        "state_bytes": aot.sharded_bytes(state),
                        "param_bytes": aot.sharded_bytes(state.params),
                    }
                )


def compile_rows():
    for job in _JOBS.value:
        name, n, key = job.split(":")
        start = time.perf_counter()
        row = plan.compile_train_variant(_config(name), jax.devices()[: int(n)], VARIANTS[key])
        _write({"config": name, "variant": key, "wall_s": time.perf_counter() - start, **row})


def sample_rows():
    """The config's sampling program (guided where it names a classifier), launch.plan's."""
    for job in _JOBS.value:
        name, n = job.split(":")
        config = plan.variant_config(_config(name), VARIANTS["dp"])
        start = time.perf_counter()
        row = plan.compile_sampling(config, jax.devices()[: int(n)])
        _write({"config": name, "wall_s": time.perf_counter() - start, **row})


def _read(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


COUNTS = (8, 64, 256)
_ORDER = {"data-parallel": 0, "fsdp": 1, "fsdp + remat": 2}
_STATE_KEY = {"data-parallel": "dp", "fsdp": "fsdp", "fsdp + remat": "fsdp"}


def newest_rows(rows):
    """{(config, variant): {devices: row}}: a row compiled again, the newest stands."""
    out = {}
    for r in rows:
        out.setdefault((r["config"], r["variant"]), {})[r["devices"]] = r
    return out


def estimate(compiled, state, variant, n):
    """Per-device bytes at `n` devices computed from the counts compiled below it.

    The state (parameters, EMA, Adam) at `n` is exact (`state`: {(devices, 'dp' or
    'fsdp'): row}). The rest (batch, activations, gradients, gathers) is split into a
    part that scales as 1/N and a fixed part: fitted as a + b/N through the two largest
    compiled counts, or with one count, the fixed part taken as the whole gradients
    (data-parallel) or the whole parameters and gradients (FSDP gathers them).
    """
    below = sorted(d for d in compiled if d < n)
    if not below or (n, _STATE_KEY[variant]) not in state:
        return None
    rest = {d: compiled[d]["total_bytes"] - compiled[d]["state_bytes"] for d in below}
    if len(below) >= 2:
        n1, n2 = below[-2:]
        b = (rest[n1] - rest[n2]) / (1 / n1 - 1 / n2)
        a = rest[n1] - b / n1
        if a < 0:
            a, b = 0.0, rest[n2] * n2
    else:
        n1 = below[0]
        whole = state[(n1, "dp")]["param_bytes"]
        a = min(rest[n1], whole * (1 if variant == "data-parallel" else 2))
        b = (rest[n1] - a) * n1
    return state[(n, _STATE_KEY[variant])]["state_bytes"] + a + b / n


def render():
    """Markdown: exact state bytes; compiled (or computed) bytes and compile seconds."""
    gib = lambda b: f"{b / aot.GIB:.2f}"  # noqa: E731
    state = {(r["config"], r["devices"], r["variant"]): r for r in _read(_STATE.value)}
    print("| config (batch) | params | params + EMA + Adam, data-parallel | FSDP 8 | FSDP 64 "
          "| FSDP 256 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name in CONFIGS:
        rows = {k[1:]: v for k, v in state.items() if k[0] == name}
        if (8, "dp") not in rows:
            continue
        dp = rows[(8, "dp")]
        cells = [gib(rows[(n, "fsdp")]["state_bytes"]) if (n, "fsdp") in rows else "-"
                 for n in COUNTS]  # fmt: skip
        print(f"| {name} ({dp['batch']}) | {gib(dp['param_bytes'])} | {gib(dp['state_bytes'])} | "
              + " | ".join(cells) + " |")  # fmt: skip
    compiled = newest_rows(_read(_COMPILED.value))
    keys = sorted(compiled, key=lambda k: (CONFIGS.index(k[0]), _ORDER.get(k[1], 3)))
    print()
    print("| config (batch) | variant | 8 devices | 64 devices | 256 devices |")
    print("|---|---|---:|---:|---:|")
    for name, variant in keys:
        rows = compiled[(name, variant)]
        own = {k[1:]: v for k, v in state.items() if k[0] == name}
        cells = []
        for n in COUNTS:
            if n in rows:
                cells.append(gib(rows[n]["total_bytes"]))
                continue
            value = estimate(rows, own, variant, n)
            cells.append("-" if value is None else f"*{gib(value)}*")
        batch = own[(8, "dp")]["batch"] if (8, "dp") in own else "?"
        print(f"| {name} ({batch}) | {variant} | " + " | ".join(cells) + " |")
    print()
    print("| config | variant | compile s, 8 devices | 64 | 256 |")
    print("|---|---|---:|---:|---:|")
    for name, variant in keys:
        rows = compiled[(name, variant)]
        cells = [f"{rows[n]['compile_s']:.0f}" if n in rows else "-" for n in COUNTS]
        print(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    sampling = _read(_SAMPLING.value)
    if sampling:
        newest = {(r["config"], r["devices"]): r for r in sampling}
        print()
        print("| config | program | devices | batch | steps | GiB per device | temporaries "
              "| compile s |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for (name, n), r in sorted(newest.items(), key=lambda kv: CONFIGS.index(kv[0][0])):
            sizes = f"{gib(r['total_bytes'])} | {gib(r['temp_bytes'])}"
            print(f"| {name} | {r['variant']} | {n} | {r['batch']} | {r['steps']} | {sizes} "
                  f"| {r['compile_s']:.0f} |")  # fmt: skip


def main(argv):
    del argv
    modes = {"state": state_rows, "compile": compile_rows, "sample": sample_rows, "render": render}
    modes[_MODE.value]()


if __name__ == "__main__":
    app.run(main)
