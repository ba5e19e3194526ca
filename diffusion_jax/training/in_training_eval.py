"""What the loops run besides the step: EMA sample grids, in-training FID, held-out eval.

Each `*_hooks` returns `hook(step, state) -> dict | None`, called after every step; it
acts on its own schedule (`training.sample_every`, `training.eval_every`) and returns
scalars to log. Grids and FID samples are drawn by the sampling job's sharded sampler
(`sampling.sharded`, configured by `config.sampling`), so they do not depend on the
device or process count, and the FID samples are those `launch.sample` draws.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import models, parallel, resumable
from diffusion_jax.sampling import grids
from diffusion_jax.sampling import inputs as sampling_inputs
from diffusion_jax.sampling.sharded import ShardedSampler, job_key, sampling_program
from diffusion_jax.training import steps
from diffusion_jax.training.state import TrainState, ema_key

_GRID_PURPOSE, _EVAL_PURPOSE = 1, 4
SAMPLES_DIR = "samples"


def sampling_params(state: TrainState, ema_rates) -> Any:
    """The parameters samples are drawn with: the first EMA copy, else the raw ones."""
    return state.ema[ema_key(ema_rates[0])] if ema_rates else state.params


def _low_res_images(config: Any, n: int) -> np.ndarray:
    """low_res inputs of the first n records (dataset order): fixed upsampler grid inputs."""
    from diffusion_jax.data import create_input_pipeline

    data = config.data.copy_and_resolve_references()
    data.update(shuffle_buffer=0, random_flip=False)
    with create_input_pipeline(
        data, global_batch_size=n, seed=config.seed, process_index=0, process_count=1
    ) as pipeline:
        return np.asarray(next(pipeline)["low_res"])


def _draw(program, config, key, params, indices, labels=None, low_res=None) -> np.ndarray:
    """Every process's copy of the uint8 images `indices` name, through the job's sampler."""
    cfg_scale = float(config.sampling.get("cfg_scale", 1.0))
    sampler = ShardedSampler(program, params, key, cfg_scale=cfg_scale)
    return resumable.gather_rows(sampler.sample(indices, labels, low_res)[0])


def diffusion_hooks(config: Any, mesh: Mesh, workdir: epath.Path):
    """Sample grids every `training.sample_every` steps and FID every `eval_every`.

    Both draw with the configured sampler (`config.sampling`, the sampling job's
    program, which builds the model from config.model); grids use `training.sample_steps`
    as the step count when set.
    """
    training = config.training
    num_classes = config.model.num_classes
    ema_rates = tuple(float(r) for r in training.ema_rates)
    grid = fid = None
    if float(config.sampling.get("classifier_scale", 0.0) or 0.0):
        logging.warning("in-training samples are not classifier-guided (no classifier here)")

    if training.sample_every:
        n = training.sample_grid_size
        grid_config = config
        if training.get("sample_steps"):
            grid_config = config.copy_and_resolve_references()
            grid_config.sampling.timestep_respacing = int(training.sample_steps)
        indices = np.arange(n)
        labels = None if num_classes is None else (indices % num_classes).astype(np.int32)
        upsampler = models.model_spec(config.model.kind).takes_low_res
        low_res = _low_res_images(config, n) if upsampler else None
        grid = functools.partial(
            _draw,
            sampling_program(grid_config, mesh),
            config,
            job_key(config.seed, _GRID_PURPOSE),
            indices=indices,
            labels=labels,
            low_res=low_res,
        )

    if training.eval_every and training.eval_reference:
        fid = _FidEvaluator(config, mesh)

    def hook(step: int, state: TrainState) -> dict | None:
        out = {}
        if grid is not None and step % training.sample_every == 0:
            images = grid(params=sampling_params(state, ema_rates))
            if jax.process_index() == 0:
                tiled = grids.make_grid(images)
                grids.write_png(workdir / SAMPLES_DIR / f"step_{step:08d}.png", tiled)
                out["_images"] = tiled
        if fid is not None and step % training.eval_every == 0:
            out["fid"] = fid(step, sampling_params(state, ema_rates))
        return out or None

    return hook


class _FidEvaluator:
    """FID of `training.eval_num_samples` EMA samples against `training.eval_reference`.

    The samples are the first `eval_num_samples` images `launch.sample` draws with this
    config (same program, keys and `sampling.labels`), at every evaluation.
    """

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.program = sampling_program(config, mesh)
        self.reference_stats = None
        self.inception = None
        n = config.training.eval_num_samples
        num_classes = config.model.num_classes
        self.labels = None
        if num_classes is not None:
            spec = config.sampling.get("labels", "random")
            self.labels = sampling_inputs.job_labels(spec, num_classes, n, int(config.seed))
        # Inception batches: no bigger than the evaluation (each batch is padded to it).
        shards = parallel.num_data_shards(mesh)
        self.feature_batch = min(256, -(-n // shards) * shards)

    def samples(self, params) -> np.ndarray:
        """uint8 [eval_num_samples, H, W, C]: the sampling job's first images for params."""
        n = self.config.training.eval_num_samples
        shards = parallel.num_data_shards(self.mesh)
        batch = min(n, max(self.config.sampling.batch_size, shards))
        batch -= batch % shards
        key = job_key(self.config.seed)
        parts = []
        for start in range(0, n, batch):
            idx = np.arange(start, start + batch)  # the last batch padded, then trimmed
            safe = np.minimum(idx, n - 1)
            labels = None if self.labels is None else self.labels[safe]
            parts.append(_draw(self.program, self.config, key, params, idx, labels))
        return np.concatenate(parts)[:n]

    def __call__(self, step: int, params) -> float:
        value = self.frechet(self.samples(params))
        n = self.config.training.eval_num_samples
        logging.info("step %d: FID %.4f over %d EMA samples", step, value, n)
        return value

    def frechet(self, images: np.ndarray) -> float:
        """FID of uint8 images against the reference (read on first use)."""
        from diffusion_jax import evaluation

        kw = {"mesh": self.mesh, "batch_size": self.feature_batch}
        if self.reference_stats is None:
            training = self.config.training
            self.inception = evaluation.load_inception(training.inception_weights)
            reference = evaluation.open_image_npz(training.eval_reference)
            _, self.reference_stats = evaluation.activations_and_statistics(
                reference, self.inception, **kw
            )
        feats = evaluation.compute_features(images, self.inception, **kw)
        mu, sigma = evaluation.compute_statistics(feats["pool"])
        ref = self.reference_stats
        return float(evaluation.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))


def classifier_hooks(config: Any, model: Any, diffusion: Any, mesh: Mesh):
    """Held-out loss / acc@1 / acc@5 (overall and per t-quartile) every `eval_every` steps."""
    training = config.training
    if not training.eval_every:
        return None
    from diffusion_jax.data import create_input_pipeline

    data = config.data.copy_and_resolve_references()
    data.update(split=data.eval_split, shuffle_buffer=0, random_flip=False, random_crop=False)
    n_dev = parallel.num_data_shards(mesh)
    batch = max(n_dev, training.batch_size - training.batch_size % n_dev)
    fsdp = parallel.FsdpGather.for_mesh(mesh, training.fsdp_min_size)

    def eval_step(params, examples, key, *, noised):
        # Whole parameters, as in the train step (FSDP keeps activations split by batch).
        params = params if fsdp is None else fsdp.gather(params)
        return steps.classifier_eval_step(
            params, examples, key, apply_fn=model.apply, diffusion=diffusion, noised=noised
        )

    # Held-out terms on noised inputs (as training sees them) and on clean ones (t = 0).
    eval_steps = {
        prefix: jax.jit(functools.partial(eval_step, noised=noised))
        for prefix, noised in (("eval", bool(training.noised)), ("eval_clean", False))
    }
    base_key = jax.random.key(config.seed)
    T = diffusion.num_timesteps

    def hook(step: int, state: TrainState) -> dict | None:
        if step % training.eval_every:
            return None
        with create_input_pipeline(
            data, global_batch_size=batch, seed=config.seed, mesh=mesh
        ) as pipeline:
            num_batches = max(1, -(-training.eval_num_samples // batch))
            num_batches = min(
                num_batches, max(1, pipeline.records_per_epoch * jax.process_count() // batch)
            )
            rows = {prefix: [] for prefix in eval_steps}
            for i in range(num_batches):
                key = jax.random.fold_in(jax.random.fold_in(base_key, _EVAL_PURPOSE), i)
                examples = next(pipeline)
                for prefix, eval_step in eval_steps.items():
                    rows[prefix].append(
                        resumable.fetch_global(eval_step(state.params, examples, key))
                    )
        metrics = {}
        for prefix, parts in rows.items():
            terms = {k: np.concatenate([r[k] for r in parts]) for k in parts[0]}
            t = terms.pop("t")
            q = np.clip(t * 4 // T, 0, 3)
            for name, values in terms.items():
                metrics[f"{prefix}_{name}"] = float(np.mean(values))
                if prefix == "eval_clean":
                    continue  # all at t = 0
                for i in range(4):
                    sel = values[q == i]
                    metrics[f"{prefix}_{name}_q{i}"] = float(np.mean(sel)) if sel.size else 0.0
        return metrics

    return hook
