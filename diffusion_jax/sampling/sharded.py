"""Mesh-aware sampling: one compiled program draws a global batch over every device.

A batch is named by the global indices of its samples. Inside the program sample i
gets the key `fold_in(job_key, i)`, from which the diffusion loop derives its x_T and
its step noise (see `diffusion_jax.diffusion.samplers`), so image i does not depend on
the batch it was drawn in, the device count or the process count. Indices, labels and
low-resolution inputs go in sharded over the mesh's `'data'` axis, parameters
replicated; the uint8 images come out sharded the same way, each process keeping its
own rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import aot, models, parallel
from diffusion_jax.checkpoints import abstract_params
from diffusion_jax.diffusion import Diffusion, SamplerOptions, classifier_cond_fn, create_diffusion
from diffusion_jax.diffusion.conditioning import Conditioning
from diffusion_jax.diffusion.options import sampling_respacing

JOB_PURPOSE = 0  # sample i of a sampling job: fold_in(fold_in(key(seed), 0), i)


def to_uint8(x: jnp.ndarray) -> jnp.ndarray:
    """[-1, 1] floats -> uint8 as the paper code's sample script: clamp((x+1)*127.5), truncated.

    The one conversion of samples to pixels (jobs, grids, in-training FID).
    """
    return jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class SamplingProgram:
    """The static description of a sampling program (a hashable jit static argument).

    Attributes:
      diffusion: the (respaced) sampling diffusion.
      options: the sampler (kind, eta, clipping).
      model: the diffusion model's Flax module (hashable by its fields, so equal
        configs share the compiled program).
      image_shape: (H, W, C) of the samples.
      mesh: the mesh with a `'data'` axis the batch is sharded over.
      class_conditional: the model takes `y=` labels.
      classifier: the guidance classifier's Flax module, or None.
      null_label: classifier-free guidance with this null class (`models.null_label`
        of the model's config); None = no classifier-free guidance (the model runs
        once per step, not on a doubled batch).
    """

    diffusion: Diffusion
    options: SamplerOptions
    model: Any
    image_shape: tuple[int, int, int]
    mesh: Mesh
    class_conditional: bool = False
    classifier: Any = None
    null_label: int | None = None

    def __post_init__(self):
        if self.null_label is not None and not self.class_conditional:
            raise ValueError(
                "classifier-free guidance (null_label) needs a class-conditional model"
            )


def _conditioning(program, classifier_params, scale, cfg_scale, labels, low_res) -> Conditioning:
    model_kwargs = {}
    if program.class_conditional:
        model_kwargs["y"] = labels
    if low_res is not None and low_res.dtype == jnp.uint8:  # -> [-1, 1], as the paper code
        low_res = low_res.astype(jnp.float32) / 127.5 - 1.0
    if low_res is not None:
        model_kwargs["low_res"] = low_res
    cond_fn = None
    if program.classifier is not None:
        cond_fn = classifier_cond_fn(program.classifier.apply, {"params": classifier_params}, scale)
    return Conditioning(
        model_kwargs,
        cond_fn,
        # Guidance labels reach the classifier only: an unconditional model refuses y.
        cond_kwargs=None if labels is None else {"y": labels},
        cfg_scale=None if program.null_label is None else cfg_scale,
        null_label=program.null_label,
    )


@functools.partial(jax.jit, static_argnums=0)
def _program(
    program: SamplingProgram,
    params,
    classifier_params,
    scale,
    cfg_scale,
    key_data,
    indices,
    labels,
    low_res,
):
    job_key = jax.random.wrap_key_data(key_data)
    rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(job_key, indices)  # [B] keys
    model_fn = jax.tree_util.Partial(program.model.apply, {"params": params})
    shape = (indices.shape[0], *program.image_shape)
    out = program.diffusion.sample_loop(
        model_fn,
        shape,
        rngs,
        program.options,
        cond=_conditioning(program, classifier_params, scale, cfg_scale, labels, low_res),
    )["sample"]
    return jax.lax.with_sharding_constraint(to_uint8(out), parallel.data_sharding(program.mesh))


def sampling_program(config: Any, mesh: Mesh, *, classifier: Any = None) -> SamplingProgram:
    """The program `config.sampling` describes: the one reading of that section.

    The sampler's kind decides the diffusion's respacing (`options.sampling_respacing`),
    `SamplerOptions.from_config` the loop; a `cfg_scale` other than 1.0 runs
    classifier-free guidance with the model's null class.

    Args:
      config: a model config (`model`, `diffusion`, `sampling` sections).
      mesh: the mesh with a `'data'` axis.
      classifier: the guidance classifier's Flax module, or None.
    """
    sampling, model = config.sampling, config.model
    settings = models.validate_model_config(model)
    size = int(model.image_size)
    cfg = float(sampling.get("cfg_scale", 1.0)) != 1.0
    return SamplingProgram(
        diffusion=create_diffusion(
            config.diffusion, timestep_respacing=sampling_respacing(sampling)
        ),
        options=SamplerOptions.from_config(sampling),
        model=models.create_model(model),
        image_shape=(size, size, int(model.get("in_channels", 3))),
        mesh=mesh,
        class_conditional=settings["num_classes"] is not None,
        classifier=classifier,
        null_label=models.null_label(model) if cfg else None,
    )


def job_key(seed: int, purpose: int = JOB_PURPOSE) -> jax.Array:
    """The key sample i of a job draws from with `fold_in(job_key, i)`."""
    return jax.random.fold_in(jax.random.key(int(seed)), purpose)


class ShardedSampler:
    """Draws batches of a sampling job over every device of every process.

    Every process calls `sample` with the same global indices (a collective); each gets
    back its own rows. The program compiles once per global batch size.
    """

    def __init__(
        self,
        program: SamplingProgram,
        params: Any,
        job_key: jax.Array,
        *,
        classifier_params: Any = None,
        classifier_scale: float = 0.0,
        cfg_scale: float = 1.0,
        compiled: Any = None,
    ):
        """Places the parameters on the mesh (replicated).

        Args:
          program: what to run.
          params: the diffusion model's params tree (host or device arrays).
          job_key: the job's typed key; sample i uses fold_in(job_key, i).
          classifier_params: the classifier's params tree when guided.
          classifier_scale: the guidance scale s.
          cfg_scale: the classifier-free guidance scale (1.0 = plain conditional); a
            value other than 1.0 needs `program.null_label`.
          compiled: the program compiled ahead of time for the job's batch
            (`compile_program`), run instead of compiling again.
        """
        if float(cfg_scale) != 1.0 and program.null_label is None:
            raise ValueError(
                f"cfg_scale={cfg_scale} needs a SamplingProgram with null_label (a model "
                "trained with training.label_dropout > 0)"
            )
        mesh = program.mesh
        self.program = program
        self._run = functools.partial(_program, program) if compiled is None else compiled
        self._params = parallel.global_replicated(params, mesh)
        self._classifier_params = (
            None
            if program.classifier is None
            else parallel.global_replicated(classifier_params, mesh)
        )
        self._scale = parallel.global_replicated(np.float32(classifier_scale), mesh)
        self._cfg_scale = parallel.global_replicated(np.float32(cfg_scale), mesh)
        self._job_key = parallel.global_replicated(jax.random.key_data(job_key), mesh)

    def sample(
        self,
        indices: np.ndarray,
        labels: np.ndarray | None = None,
        low_res: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Samples the global batch `indices` (a multiple of the device count).

        Args:
          indices: int [B] global sample indices (the same on every process).
          labels: int [B] class labels (model's y and/or the guidance target), or None.
          low_res: [B, h, w, C] upsampler inputs (uint8, or floats in [-1, 1]), or None.

        Returns:
          (images uint8 [b, H, W, C], their global indices [b]): this process's rows,
          in global order (all rows with one process).
        """
        mesh = self.program.mesh
        indices = np.asarray(indices, np.int32)
        rows = parallel.global_rows(indices, mesh)
        put = functools.partial(parallel.global_rows, mesh=mesh)
        images = self._run(
            self._params,
            self._classifier_params,
            self._scale,
            self._cfg_scale,
            self._job_key,
            rows,
            None if labels is None else put(np.asarray(labels, np.int32)),
            None if low_res is None else put(np.asarray(low_res)),
        )
        return parallel.local_rows(images), parallel.local_rows(rows)


SAMPLING_LEVERS = "draw fewer rows at once with --config.sampling.batch_size, or use more devices"


def compile_program(
    program: SamplingProgram,
    model_config: Any,
    batch_size: int,
    *,
    classifier_config: Any = None,
    labels: bool = False,
    low_res: tuple[tuple[int, ...], Any] | None = None,
    device_memory_gb: float = 0.0,
) -> tuple[Any, aot.MemoryReport]:
    """Compiles `program` for a global batch of `batch_size` rows; refuses what cannot fit.

    The loop is one scan, so the program's memory is one step's. Called before a job reads
    its checkpoints; hand the executable to `ShardedSampler(..., compiled=)`.

    Args:
      program: the job's `SamplingProgram`.
      model_config: the diffusion model's `config.model` (parameter shapes).
      batch_size: global rows of one call.
      classifier_config: the guidance classifier's model config when guided.
      labels: the job passes labels.
      low_res: `(per-row shape, dtype)` of an upsampler's inputs, or None.
      device_memory_gb: GiB per device (0 = what the backend reports).

    Returns:
      `(compiled, aot.MemoryReport)`.

    Raises:
      aot.DoesNotFitError: one line with the figures and the levers.
    """
    rows, rep = parallel.data_sharding(program.mesh), parallel.replicated_sharding(program.mesh)

    def replicated(tree):
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)  # noqa: E731
        return jax.tree.map(spec, tree)

    def row(shape, dtype):  # [B, ...] split over the devices
        return jax.ShapeDtypeStruct((int(batch_size), *shape), dtype, sharding=rows)

    args = (
        program,
        replicated(abstract_params(model_config)),
        None if classifier_config is None else replicated(abstract_params(classifier_config)),
        *replicated((jnp.float32(0), jnp.float32(0), jax.random.key_data(job_key(0)))),
        row((), jnp.int32),
        row((), jnp.int32) if labels else None,
        None if low_res is None else row(*low_res),
    )
    return aot.compile_and_check(
        _program, args, what="sampling program", device_memory_gb=device_memory_gb,
        levers=SAMPLING_LEVERS,
    )  # fmt: skip


__all__ = [
    "SamplingProgram",
    "ShardedSampler",
    "compile_program",
    "job_key",
    "sampling_program",
    "to_uint8",
]
