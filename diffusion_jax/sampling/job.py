"""The resumable sampling job behind `launch.sample`.

Each process writes its rows of every finished batch to `OUTPUT.parts/`; a restarted job
continues after the last batch every process finished, and, because image i depends only
on `fold_in(job_key, i)`, the final `.npz` equals an uninterrupted run's. Process 0 then
streams the batches into OUTPUT (the paper's layout) and a PNG grid beside it.

The job's identity (`OUTPUT.parts/manifest.json`, through `diffusion_jax.resumable`) is
every input that changes its images (the config's model, diffusion and sampling sections,
the seed, the checkpoint's step and content identity, the classifier's, the base
samples' and the labels), not the device count; it is written only after every input
check passed. A part file cut short (a killed write on a filesystem without atomic
renames, a full disk) is redrawn with a warning naming it. `OUTPUT.parts/` is locked
while the job runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import zipfile
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import files, locks, models, parallel, resumable
from diffusion_jax.diffusion import SamplerOptions
from diffusion_jax.progress import Progress
from diffusion_jax.sampling import grids, inputs
from diffusion_jax.sampling.sharded import (
    ShardedSampler,
    compile_program,
    job_key,
    sampling_program,
)

MANIFEST = "manifest.json"
COMPLETE = resumable.COMPLETE  # written by process 0 once OUTPUT holds every batch
# Recorded in the manifest beside the fingerprint: how the parts are split over processes.
# No image depends on it, so a finished job is found again on any layout.
_LAYOUT_FIELDS = ("processes", "devices")
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
    checkpoint_step: int | None
    fingerprint: dict


def _plan(
    config, checkpoint, output, classifier_checkpoint, base_samples, mesh, step=None
) -> _Plan:
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
    from diffusion_jax.checkpoints import workdir as workdir_lib  # second floor

    ema_rate = None
    if workdir_lib.is_workdir(checkpoint) and sampling.get("use_ema", True):
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
    checkpoint_identity = workdir_lib.checkpoint_identity(checkpoint, step)
    fingerprint = {
        **{section: config[section].to_dict() for section in ("sampling", "model", "diffusion")},
        "seed": int(config.seed),
        "checkpoint": str(checkpoint),
        "checkpoint_identity": checkpoint_identity,
        "ema_rate": ema_rate,
        "classifier_checkpoint": classifier_dir,
        "classifier_identity": classifier_dir and workdir_lib.checkpoint_identity(classifier_dir),
        "base_samples": str(base_samples) if base_samples else None,
        "base_samples_identity": resumable.path_identity(base_samples or None),
        "labels_sha256": None if labels is None else hashlib.sha256(labels.tobytes()).hexdigest(),
    }
    return _Plan(
        config, out, n, int(sampling.batch_size), ema_rate, labels, low_res,
        classifier_dir, classifier_model, scale, cfg_scale, checkpoint_identity["step"],
        resumable.normalise(fingerprint),
    )  # fmt: skip


def _restore(
    directory: str, model_config: Any, ema_rate: float | None, step: int | None = None
) -> Any:
    from diffusion_jax import checkpoints  # second floor: Orbax I/O

    # The step the job's identity names, not whatever is newest by now.
    params, _ = checkpoints.restore_params(directory, step=step, ema_rate=ema_rate)
    checkpoints.check_param_shapes(params, checkpoints.abstract_params(model_config), directory)
    return params


def _parts_dir(plan: _Plan) -> epath.Path:
    return epath.Path(str(plan.output) + ".parts")


def _part_path(parts: epath.Path, batch: int) -> epath.Path:
    return parts / f"{batch:06d}.p{jax.process_index():04d}.npz"


def _check_manifest(plan: _Plan, saved: dict | None, redo_changed: bool) -> dict | None:
    """The saved manifest if it is this job's; refuses (or discards) another job's parts."""
    if saved is None:
        return None
    parts = _parts_dir(plan)
    diffs = resumable.differences(saved, plan.fingerprint, ignore=_LAYOUT_FIELDS)
    if not diffs:
        return saved
    if not redo_changed:
        raise ValueError(
            f"{parts} holds a sampling job of other inputs: {resumable.summarise(diffs)}. "
            "Re-run the same command to continue it, or delete it / choose another --output "
            "to draw them again."
        )
    logging.warning("%s was drawn from other inputs (%s): drawing again.", plan.output,
                    resumable.summarise(diffs))  # fmt: skip
    _discard(plan)
    return None


def _discard(plan: _Plan) -> None:
    """Removes the output and every part (process 0), keeping the parts folder's lock."""
    if jax.process_index() == 0:
        parts = _parts_dir(plan)
        for path in parts.iterdir():
            if path.name != locks.LOCK_FILE:
                path.rmtree() if path.is_dir() else path.unlink()
        plan.output.unlink(missing_ok=True)
    resumable.agree(True)  # every process waits for the removal


def _part_readable(path: epath.Path) -> bool:
    """Whether a part file holds its two arrays whole (a zip cut short fails its CRCs)."""
    try:
        with path.open("rb") as f, np.load(f) as part:
            return all(np.asarray(part[k]).size >= 0 for k in ("images", "indices"))
    except Exception:  # BadZipFile, EOFError, ValueError, OSError: any damage
        return False


def _first_unfinished(plan: _Plan, num_batches: int) -> int:
    """The first batch that not every process finished; damaged parts are redrawn."""
    parts = _parts_dir(plan)
    start = 0
    while start < num_batches and (path := _part_path(parts, start)).exists():
        if not _part_readable(path):
            logging.warning("%s is damaged (cut short?): drawing that batch again.", path)
            path.unlink(missing_ok=True)
            break
        start += 1
    return resumable.min_over_processes(start)


def _assemble(plan: _Plan, num_batches: int, image_shape: tuple) -> None:
    """Streams every process's parts into OUTPUT on process 0 (one batch in memory)."""
    parts = _parts_dir(plan)
    is_writer = jax.process_index() == 0
    n = plan.num_samples
    grid, in_grid = [], 0
    with contextlib.ExitStack() as stack:
        if is_writer:  # OUTPUT appears whole when the block ends, or not at all
            zf = stack.enter_context(
                zipfile.ZipFile(
                    stack.enter_context(files.atomic_write(plan.output, "wb")),
                    "w",
                    allowZip64=True,
                )
            )
            member = stack.enter_context(zf.open("arr_0.npy", "w", force_zip64=True))
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, *image_shape)}
            np.lib.format.write_array_header_2_0(member, header)
        for b in range(num_batches):
            with _part_path(parts, b).open("rb") as f, np.load(f) as part:
                images = resumable.gather_rows(part["images"])
                indices = resumable.gather_rows(part["indices"])
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
        png = plan.output.parent / (plan.output.name[: -len(".npz")] + ".png")
        grids.write_png(png, grids.make_grid(np.concatenate(grid), pad=0))
    resumable.mark_complete(parts)
    for b in range(num_batches):  # the output holds them now
        _part_path(parts, b).unlink(missing_ok=True)


def run_sampling_job(
    config: Any,
    checkpoint: str,
    output: str,
    *,
    classifier_checkpoint: str | None = None,
    base_samples: str | None = None,
    mesh: Mesh | None = None,
    redo_changed: bool = False,
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
      redo_changed: when OUTPUT (or its parts) was drawn from other inputs (a checkpoint
        that training advanced since, say): draw it again instead of refusing. For jobs
        that own their output (the FID table's rows, the quickstart).

    Returns:
      The output path.

    Raises:
      ValueError / FileNotFoundError / OSError: one sentence per bad input, raised
        before any device work; `locks.WorkdirLockedError` when another job is writing
        OUTPUT.
    """
    mesh = parallel.create_mesh_from_config(config) if mesh is None else mesh
    args = (config, checkpoint, output, classifier_checkpoint, base_samples, mesh)
    step = None  # the newest complete step, then an older one if that is damaged
    while True:
        done = _run_job(*args, redo_changed=redo_changed, step=step)
        if isinstance(done, epath.Path):
            return done
        step = done


def _run_job(*args, redo_changed: bool, step: int | None) -> epath.Path | int:
    """The job at `step` (None: the newest); the step to fall back to if it is damaged."""
    from diffusion_jax.checkpoints import workdir as workdir_lib  # second floor

    config, checkpoint, mesh = args[0], args[1], args[-1]
    plan = _plan(*args, step=step)
    parts = _parts_dir(plan)
    num_batches = -(-plan.num_samples // plan.batch_size)

    def sampler_or_older_step() -> ShardedSampler | int:
        """The sampler; or, when the newest step of a training workdir is damaged, the step
        before it (as training's restore)."""
        try:
            return _create_sampler(plan, checkpoint, mesh)
        except workdir_lib.DamagedCheckpointError as error:
            newest = plan.checkpoint_step
            damaged = epath.Path(checkpoint) / workdir_lib.CHECKPOINTS_DIR / str(newest)
            if newest is None or f"{damaged} is damaged" not in str(error):
                raise  # a converted directory's, or the classifier's
            older = [s for s in workdir_lib.complete_steps(checkpoint) if s < newest]
            if not older:
                raise
            logging.warning("%s; sampling from step %d, instead.", error, older[-1])
            return older[-1]

    with locks.exclusive_workdir(parts, job=f"the sampling job of {plan.output.name}"):
        hint = f"Delete {parts} to start the job again."
        saved, _ = resumable.read_record(parts / MANIFEST, {}, hint=hint)
        # Process 0's view (a slow process must not read the manifest a fast one just wrote).
        saved = saved if resumable.agree(saved is not None) else None
        try:
            saved = _check_manifest(plan, saved, redo_changed)
        except ValueError as changed:  # the newest step: advanced, or damaged since?
            if step is not None or saved.get("checkpoint_identity", {}).get("step") is None:
                raise
            if isinstance(fallback := sampler_or_older_step(), int):
                return fallback
            raise changed
        complete = saved is not None and resumable.is_complete(parts)
        if complete and resumable.agree(plan.output.exists()):
            logging.info("%s is complete (%s)", plan.output, parts / COMPLETE)
            return plan.output
        if saved is not None and saved.get("processes", jax.process_count()) != (
            jax.process_count()
        ):  # the parts hold each process's rows: another split cannot continue them
            logging.warning("%s was split over other processes: drawing again.", parts)
            _discard(plan)
            saved = None
        sampler = sampler_or_older_step()  # the last checks: parameters
        if isinstance(sampler, int):
            return sampler
        if saved is None:  # bookkeeping, once every input passed its checks
            layout = {"processes": jax.process_count(), "devices": int(mesh.devices.size)}
            resumable.record_fingerprint(parts / MANIFEST, {**plan.fingerprint, **layout})
        start = _first_unfinished(plan, num_batches)
        size = int(config.model.image_size)
        image_shape = (size, size, int(config.model.get("in_channels", 3)))
        if start < num_batches:
            _sample_batches(plan, sampler, start, num_batches)
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


def _create_sampler(plan: _Plan, checkpoint: str, mesh: Mesh) -> ShardedSampler:
    config = plan.config
    classifier = classifier_params = None
    if plan.classifier_dir:
        classifier = models.create_classifier(plan.classifier_model)
        step = plan.fingerprint["classifier_identity"]["step"]
        classifier_params = _restore(plan.classifier_dir, plan.classifier_model, None, step)
    program = sampling_program(config, mesh, classifier=classifier)
    low = None if plan.low_res is None else (plan.low_res.shape[1:], plan.low_res.dtype)
    compiled, _ = compile_program(  # before the checkpoint is read: refuses a misfit
        program,
        config.model,
        plan.batch_size,
        classifier_config=plan.classifier_model if plan.classifier_dir else None,
        labels=plan.labels is not None,
        low_res=low,
        device_memory_gb=float(config.get("mesh", {}).get("device_memory_gb", 0.0) or 0.0),
    )
    params = _restore(checkpoint, config.model, plan.ema_rate, plan.checkpoint_step)
    return ShardedSampler(
        program,
        params,
        job_key(config.seed),
        classifier_params=classifier_params,
        classifier_scale=plan.classifier_scale,
        cfg_scale=plan.cfg_scale,
        compiled=compiled,
    )


def _sample_batches(plan: _Plan, sampler: ShardedSampler, start: int, num_batches: int) -> None:
    parts = _parts_dir(plan)
    done, quiet = min(start * plan.batch_size, plan.num_samples), jax.process_index() > 0
    progress = Progress("sampling", plan.num_samples, done=done, quiet=quiet)
    for b in range(start, num_batches):
        # The last batch runs past num_samples: those rows are drawn and dropped.
        indices = np.arange(b * plan.batch_size, (b + 1) * plan.batch_size)
        safe = np.minimum(indices, plan.num_samples - 1)  # padded rows reuse inputs
        labels = None if plan.labels is None else plan.labels[safe]
        low_res = None if plan.low_res is None else plan.low_res[safe]
        images, rows = sampler.sample(indices, labels, low_res)
        with files.atomic_write(_part_path(parts, b), "wb") as f:
            np.savez(f, images=images, indices=rows)
        progress.update(int(min(indices[-1] + 1, plan.num_samples) - indices[0]))


__all__ = ["check_sampling_job", "run_sampling_job"]
