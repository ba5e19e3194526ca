"""The train step compiled ahead of time, before a run reads data (`compile_train_step`).

`launch.train` and `launch.plan` compile the same program: the jitted step of
`loop.create_setup` for the sharded abstract state and an abstract global batch. The run
then calls the compiled executable, so the step is compiled once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import aot, parallel


def abstract_batch(config: Any, mesh) -> dict[str, Any]:
    """The global batch the input pipeline yields, as sharded `jax.ShapeDtypeStruct`s."""
    b, size = int(config.training.batch_size), int(config.data.image_size)
    rows = parallel.data_sharding(mesh)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows)

    batch = {"image": spec((b, size, size, 3), jnp.float32)}  # [B, H, W, C]
    if config.data.get("class_cond", False):
        batch["label"] = spec((b,), jnp.int32)  # [B]
    low = int(config.data.get("low_res_size", 0) or 0)
    if low:
        batch["low_res"] = spec((b, low, low, 3), jnp.float32)  # [B, s, s, C]
    return batch


def compile_train_step(config: Any, mesh, setup: Any, *, device_memory_gb: float | None = None):
    """Compiles `setup.train_step` for the run's state and batch; refuses what cannot fit.

    Args:
      config: the run's config.
      mesh: the training mesh.
      setup: `loop.create_setup(config, mesh, ...)`.
      device_memory_gb: GiB per device (default `mesh.device_memory_gb`; 0 = what the
        backend reports, nothing on CPU).

    Returns:
      `(compiled step, aot.MemoryReport)`; call the step as `setup.train_step`.

    Raises:
      aot.DoesNotFitError: one line with the figures and the levers.
    """
    if device_memory_gb is None:
        device_memory_gb = float(config.get("mesh", {}).get("device_memory_gb", 0.0) or 0.0)
    return aot.compile_and_check(
        setup.train_step,
        (setup.abstract_state, abstract_batch(config, mesh)),
        what="train step",
        device_memory_gb=device_memory_gb,
    )


__all__ = ["abstract_batch", "compile_train_step"]
