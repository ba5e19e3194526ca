"""The resumable sampling job behind `launch.sample`.

`run_sampling_job(config, checkpoint, output)` draws `sampling.num_samples` images in
global batches of `sampling.batch_size` over every device of every process. As it goes
each process writes its rows of every finished batch to `OUTPUT.parts/` (beside a
manifest of the job's settings); a job killed and restarted with the same command
continues after the last batch every process finished, and, because image i depends
only on `fold_in(job_key, i)`, the final `.npz` equals an uninterrupted run's. The last
short batch is padded with further indices and trimmed. Process 0 then streams the
batches into OUTPUT (`arr_0` uint8 NHWC, `arr_1` labels: the paper's layout) and writes
a PNG grid of the first samples beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
import zipfile
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import models, parallel
from diffusion_jax.diffusion import SamplerOptions
from diffusion_jax.sampling import inputs
from diffusion_jax.sampling.sharded import ShardedSampler, job_key, sampling_program

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"  # written by process 0 once OUTPUT holds every batch
GRID_SAMPLES = 64


@dataclasses.dataclass
class _Plan:
    """Everything checked and read before device work."""

    config: Any
    output: epath.Path
    num_samples: int
    batch_size: int
    ema_rate: float | None
    labels: np.ndarray | None
    low_res: np.ndarray | None
    classifier_dir: str | None
    classifier_model: Any
    classifier_scale: float
    cfg_scale: float
    fingerprint: dict


def _plan(config, checkpoint, output, classifier_checkpoint, base_samples, mesh) -> _Plan:
    sampling, model = config.sampling, config.model
    inputs.check_num_samples(sampling.num_samples, sampling.batch_size, mesh.devices.size)
    out = inputs.check_output(output)
    SamplerOptions.from_config(sampling)  # raises for a bad method / eta / steps
    saved = inputs.read_saved_config(checkpoint, "--checkpoint")
    inputs.check_model_matches(saved.get("model", {}), model, "--checkpoint")
    cfg_scale = float(sampling.get("cfg_scale", 1.0))
    if cfg_scale != 1.0 and models.null_label(saved.get("model", {})) is None:
        raise ValueError(
            f"sampling.cfg_scale={cfg_scale} (classifier-free guidance) needs a "
            f"class-conditional model trained with training.label_dropout > 0; "
            f"--checkpoint={checkpoint} has no null class: set sampling.cfg_scale=1.0."
        )
    inputs.check_diffusion_matches(saved.get("diffusion"), config.diffusion, "--checkpoint")
    ema_rate = None
    is_workdir = (epath.Path(checkpoint) / "checkpoints").is_dir()
    if is_workdir and sampling.get("use_ema", True):
        rates = tuple(saved.get("training", {}).get("ema_rates", ()))
        if not rates:
            raise ValueError(
                f"--checkpoint={checkpoint} keeps no EMA parameters (training.ema_rates=()): "
                "set --config.sampling.use_ema=False."
            )
        ema_rate = float(rates[0])
    settings = models.validate_model_config(model)
    spec = models.model_spec(settings["kind"])
    if spec.trainer != "diffusion":
        raise ValueError(f"--checkpoint={checkpoint} is a classifier, not a diffusion model.")

    scale = float(sampling.classifier_scale)
    classifier_dir = classifier_model = None
    num_classes = settings["num_classes"]
    if scale:
        classifier_dir = classifier_checkpoint or sampling.classifier_checkpoint or None
        if not classifier_dir:
            raise ValueError(
                f"sampling.classifier_scale={scale} needs a classifier: pass "
                "--classifier_checkpoint=DIR or set sampling.classifier_checkpoint."
            )
        flag = f"--classifier_checkpoint={classifier_dir}"
        classifier_model = inputs.read_saved_config(classifier_dir, flag).get("model", {})
        if sampling.classifier_config:
            named = inputs.load_config_spec(
                sampling.classifier_config, "sampling.classifier_config"
            )
            inputs.check_model_matches(classifier_model, named.model, flag)
        num_classes = inputs.check_classifier(classifier_model, model, flag)

    low_res = labels = None
    n = int(sampling.num_samples)
    if spec.takes_low_res:
        if not base_samples:
            raise ValueError(
                "an upsampler config needs --base_samples=FILE.npz (a base job's output)."
            )
        need = settings["num_classes"] is not None
        low_res, labels = inputs.read_base_samples(
            base_samples, model, int(config.data.low_res_size), need
        )
        if n > low_res.shape[0]:
            raise ValueError(
                f"--base_samples={base_samples} holds {low_res.shape[0]} images but "
                f"sampling.num_samples={n}: set --config.sampling.num_samples={low_res.shape[0]}."
            )
        low_res, labels = low_res[:n], None if labels is None else labels[:n].astype(np.int32)
        if labels is not None and num_classes is not None and labels.max() >= num_classes:
            raise ValueError(
                f"--base_samples={base_samples}: labels out of range [0, {num_classes})."
            )
    elif base_samples:
        raise ValueError("--base_samples is for upsampler configs (model.kind='superres') only.")
    labels_spec = sampling.get("labels", "random")
    if labels is None and num_classes is not None:
        labels = inputs.job_labels(labels_spec, num_classes, n, int(config.seed))
    elif labels is None and labels_spec != "random":
        inputs.job_labels(labels_spec, None, n, 0)  # raises: nothing to condition on
    fingerprint = {
        "sampling": config.sampling.to_dict(),
        "seed": int(config.seed),
        "model": config.model.to_dict(),
        "diffusion": config.diffusion.to_dict(),
        "checkpoint": str(checkpoint),
        "ema_rate": ema_rate,
        "classifier_checkpoint": classifier_dir,
        "base_samples": str(base_samples) if base_samples else None,
        "labels_sha256": None if labels is None else hashlib.sha256(labels.tobytes()).hexdigest(),
        "processes": jax.process_count(),
        "devices": int(mesh.devices.size),
    }
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    return _Plan(
        config, out, n, int(sampling.batch_size), ema_rate, labels, low_res,
        classifier_dir, classifier_model, scale, cfg_scale, fingerprint,
    )  # fmt: skip


def _restore(directory: str, model_config: Any, ema_rate: float | None) -> Any:
    from diffusion_jax import checkpoints  # second floor: Orbax I/O

    params, _ = checkpoints.restore_params(directory, ema_rate=ema_rate)
    want = checkpoints.abstract_params(model_config)
    got_shapes = jax.tree.map(np.shape, params)
    want_shapes = jax.tree.map(lambda s: tuple(s.shape), want)
    if (
        jax.tree.structure(got_shapes) != jax.tree.structure(want_shapes)
        or got_shapes != want_shapes
    ):
        raise ValueError(
            f"{directory}: its parameters do not have the shapes config.model describes; "
            "check the config the checkpoint was made with."
        )
    return params


def _parts_dir(plan: _Plan) -> epath.Path:
    return epath.Path(str(plan.output) + ".parts")


def _part_path(parts: epath.Path, batch: int) -> epath.Path:
    return parts / f"{batch:06d}.p{jax.process_index():04d}.npz"


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f"{path.name}.tmp{jax.process_index()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _prepare_parts(plan: _Plan, num_batches: int) -> int:
    """Checks/writes the manifest; returns the first batch not every process finished."""
    parts = _parts_dir(plan)
    parts.mkdir(parents=True, exist_ok=True)
    manifest = parts / MANIFEST
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved != plan.fingerprint:
            changed = sorted(k for k in plan.fingerprint if saved.get(k) != plan.fingerprint[k])
            raise ValueError(
                f"{parts} holds a sampling job with other settings ({', '.join(changed)}); "
                "re-run the same command to continue it, or delete it / choose another --output."
            )
    else:
        _write_atomic(manifest, json.dumps(plan.fingerprint, indent=2, sort_keys=True).encode())
    start = 0
    while start < num_batches and _part_path(parts, start).exists():
        start += 1
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        start = int(np.min(multihost_utils.process_allgather(np.int32(start))))
    return start


def _complete(plan: _Plan) -> bool:
    """Whether a previous run finished this job (process 0 decides for everyone)."""
    done = (_parts_dir(plan) / COMPLETE).exists() and plan.output.exists()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    return done


class _Progress:
    """Process 0's bar: images done, images/s and ETA."""

    def __init__(self, total: int, done: int):
        self._bar = None
        if jax.process_index() == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=done, unit="img", desc="sampling")
        self._start, self._done, self._total = time.time(), done, total
        self._first = done

    def update(self, n: int) -> None:
        self._done += n
        if self._bar is None:
            return
        self._bar.update(n)
        rate = (self._done - self._first) / max(time.time() - self._start, 1e-9)
        eta = (self._total - self._done) / rate if rate else float("inf")
        logging.info(
            "sampled %d/%d images, %.2f images/s, ETA %.0f s", self._done, self._total, rate, eta
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _gather(x: np.ndarray) -> np.ndarray:
    """Every process's rows of a batch, stacked (process order); a collective."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).reshape(-1, *x.shape[1:])


def _assemble(plan: _Plan, num_batches: int, image_shape: tuple) -> None:
    """Streams every process's parts into OUTPUT on process 0 (one batch in memory)."""
    parts = _parts_dir(plan)
    is_writer = jax.process_index() == 0
    n = plan.num_samples
    grid, in_grid = [], 0
    tmp = plan.output.parent / f"{plan.output.name}.tmp"
    with contextlib.ExitStack() as stack:
        if is_writer:
            zf = stack.enter_context(
                zipfile.ZipFile(stack.enter_context(tmp.open("wb")), "w", allowZip64=True)
            )
            member = stack.enter_context(zf.open("arr_0.npy", "w", force_zip64=True))
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, *image_shape)}
            np.lib.format.write_array_header_2_0(member, header)
        for b in range(num_batches):
            with _part_path(parts, b).open("rb") as f, np.load(f) as part:
                images, indices = _gather(part["images"]), _gather(part["indices"])
            if not is_writer:
                continue
            order = np.argsort(indices, kind="stable")
            images = images[order][indices[order] < n]  # global order, padding dropped
            member.write(np.ascontiguousarray(images).tobytes())
            if in_grid < GRID_SAMPLES:
                grid.append(images[: GRID_SAMPLES - in_grid])
                in_grid += len(grid[-1])
        if is_writer:
            member.close()
            if plan.labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as labels:
                    np.lib.format.write_array(labels, plan.labels[:n])
    if is_writer:
        tmp.replace(plan.output)
        _write_grid(plan.output, np.concatenate(grid))
        (parts / COMPLETE).write_text("")
    for b in range(num_batches):  # the output holds them now
        _part_path(parts, b).unlink(missing_ok=True)


def _write_grid(output: epath.Path, images: np.ndarray) -> None:
    from PIL import Image

    count, h, w, c = images.shape
    columns = int(np.ceil(np.sqrt(count)))
    rows = -(-count // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    png = output.parent / (output.name[: -len(".npz")] + ".png")
    with png.open("wb") as f:
        Image.fromarray(grid if c == 3 else grid[..., 0]).save(f, format="PNG")


def run_sampling_job(
    config: Any,
    checkpoint: str,
    output: str,
    *,
    classifier_checkpoint: str | None = None,
    base_samples: str | None = None,
    mesh: Mesh | None = None,
) -> epath.Path:
    """Runs (or continues) a sampling job; returns the path of the finished `.npz`.

    Args:
      config: the model's config; `config.sampling` says what to draw (num_samples,
        batch_size (global), method, timestep_respacing, eta, clip_denoised,
        classifier_scale / classifier_config / classifier_checkpoint, cfg_scale,
        use_ema, labels),
        `config.seed` the job key.
      checkpoint: a convert_checkpoint directory or a training workdir (its first EMA
        copy when sampling.use_ema).
      output: the `.npz` to write (paper layout); `OUTPUT.parts/` holds the finished
        batches until then, and a PNG grid of the first samples goes beside it.
      classifier_checkpoint: the guidance classifier (default sampling.classifier_checkpoint).
      base_samples: an upsampler's low-resolution inputs (a base job's `.npz`), whose
        labels are carried over.
      mesh: default: every device of every process.

    Returns:
      The output path.

    Raises:
      ValueError / FileNotFoundError / OSError: one sentence per bad input, raised
        before any device work.
    """
    mesh = parallel.create_mesh_from_config(config) if mesh is None else mesh
    plan = _plan(config, checkpoint, output, classifier_checkpoint, base_samples, mesh)
    num_batches = -(-plan.num_samples // plan.batch_size)
    start = _prepare_parts(plan, num_batches)
    if _complete(plan):
        logging.info("%s is complete (%s)", plan.output, _parts_dir(plan) / COMPLETE)
        return plan.output
    size = int(config.model.image_size)
    image_shape = (size, size, int(config.model.get("in_channels", 3)))
    if start < num_batches:
        _sample_batches(plan, checkpoint, mesh, start, num_batches)
    _assemble(plan, num_batches, image_shape)
    return plan.output


def check_sampling_job(
    config: Any,
    checkpoint: str,
    output: str,
    *,
    classifier_checkpoint: str | None = None,
    base_samples: str | None = None,
    mesh: Mesh | None = None,
) -> None:
    """Runs every check `run_sampling_job` makes before device work, and nothing else.

    For drivers of many jobs (`jobs.sweep`), so that a bad setting of the last job is
    reported before the first one samples. Arguments as `run_sampling_job`'s.

    Raises:
      ValueError / FileNotFoundError / OSError: as `run_sampling_job` would.
    """
    mesh = parallel.create_mesh_from_config(config) if mesh is None else mesh
    _plan(config, checkpoint, output, classifier_checkpoint, base_samples, mesh)
    sampling_program(config, mesh)  # raises for a respacing that cannot be built


def _sample_batches(plan, checkpoint, mesh, start, num_batches) -> None:
    config = plan.config
    classifier = classifier_params = None
    if plan.classifier_dir:
        classifier = models.create_classifier(plan.classifier_model)
        classifier_params = _restore(plan.classifier_dir, plan.classifier_model, None)
    program = sampling_program(config, mesh, classifier=classifier)
    params = _restore(checkpoint, config.model, plan.ema_rate)
    sampler = ShardedSampler(
        program,
        params,
        job_key(config.seed),
        classifier_params=classifier_params,
        classifier_scale=plan.classifier_scale,
        cfg_scale=plan.cfg_scale,
    )
    parts = _parts_dir(plan)
    progress = _Progress(plan.num_samples, min(start * plan.batch_size, plan.num_samples))
    try:
        for b in range(start, num_batches):
            # The last batch runs past num_samples: those rows are drawn and dropped.
            indices = np.arange(b * plan.batch_size, (b + 1) * plan.batch_size)
            safe = np.minimum(indices, plan.num_samples - 1)  # padded rows reuse inputs
            labels = None if plan.labels is None else plan.labels[safe]
            low_res = None if plan.low_res is None else plan.low_res[safe]
            images, rows = sampler.sample(indices, labels, low_res)
            buf = io.BytesIO()
            np.savez(buf, images=images, indices=rows)
            _write_atomic(_part_path(parts, b), buf.getvalue())
            progress.update(int(min(indices[-1] + 1, plan.num_samples) - indices[0]))
    finally:
        progress.close()


__all__ = ["check_sampling_job", "run_sampling_job"]
