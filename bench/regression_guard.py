"""CPU performance-regression guard: tiny-config step times as ratios to a fixed reference.

  PYTHONPATH=. python bench/regression_guard.py            # check against the baseline
  PYTHONPATH=. python bench/regression_guard.py --update   # store a new baseline

Run it by hand whenever performance-relevant code changes (models, diffusion, steps,
samplers). In one process it times, interleaved round by round, (a) the library's train
step at `configs/imagenet64.py:tiny`, (b) one classifier-guided sampling step there, and
(c) a fixed reference program (convolutions and matmuls of similar size, code that no
change here touches). Each figure is the median over rounds of time / reference time of
the same round, so the machine's speed and load cancel. It fails (exit 1) when a ratio
exceeds the stored baseline (`bench/regression_baseline.json`) by more than the margin,
or when the train steps or sampling batches compile more than once.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import benchlib
from configs import classifier64, imagenet64
from diffusion_jax import models, parallel
from diffusion_jax.diffusion import classifier_cond_fn, create_diffusion
from diffusion_jax.training import loop

_BASELINE = os.path.join(os.path.dirname(__file__), "regression_baseline.json")
_UPDATE = flags.DEFINE_bool("update", False, "Write the measured ratios as the new baseline.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved rounds (median ratio reported).")
_MARGIN = flags.DEFINE_float("margin", 0.25, "Allowed slowdown over the baseline ratio.")


def reference_program():
    """A fixed float32 workload of the tiny model's size and kind (3x3 convs + matmuls)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 64)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.05, jnp.float32) for _ in range(6)]
    m = jnp.asarray(rng.standard_normal((64, 64)) * 0.1, jnp.float32)

    @jax.jit
    def run(x, ws, m):
        for w in ws:
            x = jax.nn.silu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                            dimension_numbers=("NHWC", "HWIO", "NHWC")))  # fmt: skip
            x = x @ m
        return x

    return lambda: run(x, ws, m)


def train_program():
    config = imagenet64.get_config("tiny")
    mesh = parallel.create_mesh(jax.devices()[:1])
    setup = loop.create_setup(config, mesh, "diffusion")
    rng = np.random.default_rng(1)
    b, s = config.training.batch_size, config.model.image_size
    batch = jax.device_put(
        {"image": benchlib.random_images(rng, (b, s, s, 3)),
         "label": rng.integers(0, 1000, (b,)).astype(np.int32)},
        parallel.data_sharding(mesh),
    )  # fmt: skip
    holder = {"state": setup.init()}

    def step():
        holder["state"], metrics = setup.train_step(holder["state"], batch)
        return holder["state"], metrics

    return step


def guided_program():
    config, cls_config = imagenet64.get_config("tiny"), classifier64.get_config("tiny")
    model = models.create_model(config.model)
    classifier = models.create_classifier(cls_config.model)
    rng = np.random.default_rng(2)
    b, s = config.sampling.batch_size, config.model.image_size
    x = jnp.asarray(benchlib.random_images(rng, (b, s, s, 3)))
    y = jnp.asarray(rng.integers(0, 1000, (b,)).astype(np.int32))
    t0 = jnp.zeros((1,), jnp.int32)
    params = model.init(jax.random.key(0), x[:1], t0, y=y[:1])["params"]
    cls_params = classifier.init(jax.random.key(1), x[:1], t0)["params"]
    diffusion = create_diffusion(config.diffusion, timestep_respacing=10)
    t = jnp.full((b,), 5, jnp.int32)

    @jax.jit
    def step(p, cp, x):
        model_fn = jax.tree_util.Partial(model.apply, {"params": p})
        cond_fn = classifier_cond_fn(classifier.apply, {"params": cp}, 1.0)
        return diffusion.p_sample(model_fn, x, t, jax.random.key(3), cond_fn=cond_fn,
                                 model_kwargs={"y": y})["sample"]  # fmt: skip

    return lambda: step(params, cls_params, x)


def _time(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv):
    del argv
    with benchlib.CompileCounter() as counter:
        programs = {"reference": reference_program(), "train": train_program(),
                    "guided": guided_program()}  # fmt: skip
        for fn in programs.values():  # warm-up: compile and first run
            jax.block_until_ready(fn())
            jax.block_until_ready(fn())
        warm = counter.count()
        times = {k: [] for k in programs}
        for _ in range(_ROUNDS.value):
            for name, fn in programs.items():
                times[name].append(_time(fn))
        recompiles = counter.count() - warm
    ratios = {
        f"{k}_over_reference": statistics.median(
            t / r for t, r in zip(times[k], times["reference"])
        )
        for k in ("train", "guided")
    }
    env = benchlib.environment()
    print(f"{env['device']}, {env['host']}, jax {env['jax']}, {env['date']}")
    for name, ts in times.items():
        print(f"  {name:<10} median {statistics.median(ts) * 1e3:8.2f} ms")
    failures = []
    if recompiles:
        failures.append(f"{recompiles} compiles after warm-up: {counter.events[warm:]}")
    if _UPDATE.value:
        payload = dict(ratios, margin=_MARGIN.value, measured=env, rounds=_ROUNDS.value)
        benchlib.write_json(_BASELINE, payload)
        print(f"baseline written to {_BASELINE}: {ratios}")
    else:
        with open(_BASELINE) as f:
            baseline = json.load(f)
        margin = float(baseline.get("margin", _MARGIN.value))
        for key, value in ratios.items():
            limit = baseline[key] * (1 + margin)
            status = "ok" if value <= limit else "REGRESSION"
            print(f"  {key:<24} {value:7.3f}  baseline {baseline[key]:7.3f}  limit {limit:7.3f}"
                  f"  {status}")  # fmt: skip
            if value > limit:
                failures.append(f"{key} {value:.3f} > {limit:.3f}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    app.run(main)
