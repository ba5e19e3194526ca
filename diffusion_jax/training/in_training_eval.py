"""What the loops run besides the step: EMA sample grids, in-training FID, held-out eval.

Each `*_hooks` returns `hook(step, state) -> dict | None`, called after every step; it
acts on its own schedule (`training.sample_every`, `training.eval_every`) and returns
scalars to log. Sampling is sharded over every device of every process: per-sample keys
are `fold_in(fold_in(base_key, purpose), global_index)`, so grids and FID samples do
not depend on the device or process count.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import parallel
from diffusion_jax.diffusion import create_diffusion
from diffusion_jax.training import grids, steps
from diffusion_jax.training.state import TrainState, ema_key

_GRID_PURPOSE, _FID_PURPOSE, _FID_LABEL_PURPOSE, _EVAL_PURPOSE = 1, 2, 3, 4
SAMPLES_DIR = "samples"


def sampling_params(state: TrainState, ema_rates) -> Any:
    """The parameters samples are drawn with: the first EMA copy, else the raw ones."""
    return state.ema[ema_key(ema_rates[0])] if ema_rates else state.params


def _draw(diffusion, apply_fn, method, eta, clip, params, keys, kwargs, image_shape):
    # Module level + functools.partial: a hashable static sample_fn for grids._sample.
    model_fn = jax.tree_util.Partial(apply_fn, {"params": params})
    shape = (keys.shape[0], *image_shape)
    if method == "ddim":
        return diffusion.ddim_sample_loop(
            model_fn, shape, keys, model_kwargs=kwargs or None, clip_denoised=clip, eta=eta
        )
    return diffusion.p_sample_loop(
        model_fn, shape, keys, model_kwargs=kwargs or None, clip_denoised=clip
    )


def _low_res_images(config: Any, n: int) -> np.ndarray:
    """low_res inputs of the first n records (dataset order): fixed upsampler grid inputs."""
    from diffusion_jax.data import create_input_pipeline

    data = config.data.copy_and_resolve_references()
    data.shuffle_buffer = 0
    data.random_flip = False
    with create_input_pipeline(
        data, global_batch_size=n, seed=config.seed, process_index=0, process_count=1
    ) as pipeline:
        return np.asarray(next(pipeline)["low_res"])


def diffusion_hooks(config: Any, model: Any, mesh: Mesh, workdir: epath.Path):
    """Sample grids every `training.sample_every` steps and FID every `eval_every`."""
    training = config.training
    base_key = jax.random.key(config.seed)
    size, channels = config.model.image_size, config.model.in_channels
    image_shape = (size, size, channels)
    num_classes = config.model.num_classes
    ema_rates = tuple(float(r) for r in training.ema_rates)
    grid_fn = fid = None

    if training.sample_every:
        n = training.sample_grid_size
        grid_diffusion = create_diffusion(
            config.diffusion, timestep_respacing=f"ddim{training.sample_steps}"
        )
        grid_fn = functools.partial(_draw, grid_diffusion, model.apply, "ddim", 0.0, True)
        grid_keys = grids.sample_keys(base_key, _GRID_PURPOSE, np.arange(n))
        grid_kwargs = {}
        if num_classes is not None:
            grid_kwargs["y"] = (np.arange(n) % num_classes).astype(np.int32)
        if config.model.kind == "superres":
            grid_kwargs["low_res"] = _low_res_images(config, n)

    if training.eval_every and training.eval_reference:
        fid = _FidEvaluator(config, model, mesh, base_key, image_shape)

    def hook(step: int, state: TrainState) -> dict | None:
        out = {}
        if grid_fn is not None and step % training.sample_every == 0:
            params = sampling_params(state, ema_rates)
            local = grids.sample_sharded(grid_fn, params, grid_keys, grid_kwargs, image_shape, mesh)
            images = _gather_rows(grids.to_uint8(local))
            if jax.process_index() == 0:
                grid = grids.make_grid(images)
                grids.write_png(workdir / SAMPLES_DIR / f"step_{step:08d}.png", grid)
                out["_images"] = grid
        if fid is not None and step % training.eval_every == 0:
            out["fid"] = fid(step, sampling_params(state, ema_rates))
        return out or None

    return hook


def fetch_global(tree: Any) -> Any:
    """Host numpy copies of (possibly multi-process) global arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _gather_rows(local: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(local))
    return gathered.reshape(-1, *local.shape[1:])


def _random_labels(base_key, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Label of global sample i: randint(fold_in(fold_in(base_key, purpose), i))."""
    key = jax.random.fold_in(base_key, _FID_LABEL_PURPOSE)

    def one(i):
        return jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes)

    return np.asarray(jax.vmap(one)(jnp.asarray(indices, jnp.uint32)), np.int32)


class _FidEvaluator:
    """FID of `training.eval_num_samples` EMA samples against `training.eval_reference`."""

    def __init__(self, config, model, mesh, base_key, image_shape):
        s = config.sampling
        self.config, self.mesh, self.image_shape = config, mesh, image_shape
        self.diffusion = create_diffusion(config.diffusion, timestep_respacing=s.timestep_respacing)
        self.sample_fn = functools.partial(
            _draw, self.diffusion, model.apply, s.method, float(s.eta), bool(s.clip_denoised)
        )
        self.base_key = base_key
        self.reference_stats = None
        self.inception = None
        # Inception batches: no bigger than the evaluation (each batch is padded to it).
        shards = parallel.num_data_shards(mesh)
        n = config.training.eval_num_samples
        self.feature_batch = min(256, -(-n // shards) * shards)

    def _reference(self):
        from diffusion_jax.evaluation import (
            activations_and_statistics,
            load_inception,
            open_image_npz,
        )

        training = self.config.training
        self.inception = load_inception(training.inception_weights)
        _, stats = activations_and_statistics(
            open_image_npz(training.eval_reference),
            self.inception,
            mesh=self.mesh,
            batch_size=self.feature_batch,
        )
        self.reference_stats = stats

    def __call__(self, step: int, params) -> float:
        from diffusion_jax.evaluation import compute_features, compute_statistics, frechet_distance

        if self.reference_stats is None:
            self._reference()
        training, num_classes = self.config.training, self.config.model.num_classes
        n = training.eval_num_samples
        batch = min(n, max(self.config.sampling.batch_size, parallel.num_data_shards(self.mesh)))
        batch -= batch % parallel.num_data_shards(self.mesh)
        locals_ = []
        for start in range(0, n, batch):
            idx = np.arange(start, min(start + batch, n))
            idx = np.concatenate([idx, np.repeat(idx[-1:], batch - len(idx))])  # pad
            keys = grids.sample_keys(self.base_key, _FID_PURPOSE, idx)  # same x_T every eval
            kwargs = {}
            if num_classes is not None:
                kwargs["y"] = _random_labels(self.base_key, idx, num_classes)
            local = grids.sample_sharded(
                self.sample_fn, params, keys, kwargs, self.image_shape, self.mesh
            )
            locals_.append(_gather_rows(grids.to_uint8(local))[: min(batch, n - start)])
        images = np.concatenate(locals_)[:n]
        feats = compute_features(
            images, self.inception, mesh=self.mesh, batch_size=self.feature_batch
        )
        mu, sigma = compute_statistics(feats["pool"])
        ref = self.reference_stats
        value = float(frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
        logging.info("step %d: FID %.4f over %d EMA samples", step, value, n)
        return value


def classifier_hooks(config: Any, model: Any, diffusion: Any, mesh: Mesh):
    """Held-out loss / acc@1 / acc@5 (overall and per t-quartile) every `eval_every` steps."""
    training = config.training
    if not training.eval_every:
        return None
    from diffusion_jax.data import create_input_pipeline

    data = config.data.copy_and_resolve_references()
    data.split = config.data.eval_split
    data.shuffle_buffer = 0
    data.random_flip = False
    data.random_crop = False
    n_dev = parallel.num_data_shards(mesh)
    batch = max(n_dev, training.batch_size - training.batch_size % n_dev)
    # Held-out terms on noised inputs (as training sees them) and on clean ones (t = 0).
    eval_steps = {
        prefix: jax.jit(
            functools.partial(
                steps.classifier_eval_step, apply_fn=model.apply, diffusion=diffusion, noised=noised
            )
        )
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
                    rows[prefix].append(fetch_global(eval_step(state.params, examples, key)))
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
