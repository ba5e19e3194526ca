"""Does XLA:CPU's compiled memory show what `model.remat` saves? Temporaries, MiB.

Two gradients compiled for one CPU device, each with and without rematerialisation:
  * a plain stack of 12 residual 3x3 convolutions (batch 64, 32x32x64), each layer
    under `jax.checkpoint`;
  * the quickstart's UNet at 32x32 (batch 128), `model.remat` (flax `nn.remat` on every
    ResBlock and AttentionBlock), with the number of remat equations in its gradient.

Usage (from the repository root):
  PYTHONPATH=. python bench/remat_probe.py
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp

from bench import benchlib
from configs import quickstart
from diffusion_jax import models

MIB = 2**20


def _temp_mib(fn, *args) -> float:
    return jax.jit(jax.grad(fn)).lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


def conv_stack(remat: bool) -> float:
    def layer(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return x + jnp.tanh(y) * jax.nn.silu(y)

    def loss(ws, x):
        f = jax.checkpoint(layer) if remat else layer
        for w in ws:
            x = f(w, x)
        return jnp.mean(x**2)

    ws = [jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)] * 12
    return _temp_mib(loss, ws, jax.ShapeDtypeStruct((64, 32, 32, 64), jnp.float32))


def unet(remat: bool) -> tuple[float, int]:
    cfg = quickstart.get_config().model
    cfg.image_size, cfg.remat = 32, remat
    model = models.create_model(cfg)
    small = (jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *small, y=small[1]))["params"]

    def loss(p, x, t):
        out = model.apply({"params": p}, x, t, y=t % 10, train=True,
                          rngs={"dropout": jax.random.key(0)})  # fmt: skip
        return jnp.mean(out**2)

    x = jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((128,), jnp.int32)
    remats = len(re.findall(r"\bremat2\b", str(jax.make_jaxpr(jax.grad(loss))(params, *small))))
    return _temp_mib(loss, params, x, t), remats


def main() -> None:
    rows = {
        "conv_stack_temp_mib": {str(r): round(conv_stack(r), 1) for r in (False, True)},
        "unet_temp_mib": {},
        "unet_remat_equations": {},
    }
    for remat in (False, True):
        mib, count = unet(remat)
        rows["unet_temp_mib"][str(remat)] = round(mib, 1)
        rows["unet_remat_equations"][str(remat)] = count
    print(json.dumps({**rows, **benchlib.environment()}))


if __name__ == "__main__":
    main()
