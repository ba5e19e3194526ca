"""The quickstart job's phases: train, train the classifiers, sample, measure, report.

Every phase goes through the library users run: `training.train` /
`training.train_classifier` (each in its own sub-workdir, so each resumes on its own),
`sampling.run_sampling_job` (resumable), the diffusion's `calc_bpd_loop`. A re-run
with the same workdir reuses what is finished (a training phase whose last checkpoint
is at its `num_steps`, a sample file drawn from the same checkpoints and settings)
and resumes what is not; a changed setting redoes only what depends on it.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import files, locks, models, parallel, resumable
from diffusion_jax.checkpoints import restore_params
from diffusion_jax.checkpoints import workdir as workdir_lib
from diffusion_jax.diffusion import create_diffusion
from diffusion_jax.evaluation import multihost
from diffusion_jax.progress import Progress
from diffusion_jax.quickstart import baseline, report
from diffusion_jax.training import checks
from diffusion_jax.training.loop import config_json
from diffusion_jax.training.writers import read_metrics

PHASES = ("diffusion", "classifier", "clean_classifier")
_EXTRA_SECTIONS = ("classifier", "clean_classifier", "quickstart")
JOB_FILE = "quickstart.json"  # the job's effective config, checked on every re-run
STATE_FILE = "quickstart_state.json"  # the bits/dim and what it was made from; phase times
_BPD_PURPOSE = 7


def effective_config(config: Any, backend: str | None = None) -> ml_collections.ConfigDict:
    """The job's config on this machine: `quickstart.accelerator` applied on a GPU/TPU."""
    config = config.copy_and_resolve_references()
    backend = backend or jax.default_backend()
    job = config.quickstart
    if backend != "cpu" and job.scale_on_accelerator:
        accel = job.accelerator
        config.training.update(
            num_steps=accel.num_steps, batch_size=accel.batch_size, ema_rates=(0.999,)
        )
        config.model.dtype = "auto"
        for name in ("classifier", "clean_classifier"):
            steps = accel.classifier_num_steps
            config[name].training.update(
                num_steps=steps, eval_every=steps, batch_size=accel.batch_size
            )
        job.update(samples_per_class=accel.samples_per_class, bpd_num_images=accel.bpd_num_images)
    return config


def phase_config(config: Any, phase: str) -> ml_collections.ConfigDict:
    """The standalone config of one training phase ('diffusion', 'classifier', ...).

    The classifiers take their `model`, `optim` and `training` sections from
    `config.<phase>` and everything else (diffusion, data, seed) from the top level.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
    config = config.copy_and_resolve_references()
    out = ml_collections.ConfigDict({k: v for k, v in config.items() if k not in _EXTRA_SECTIONS})
    if phase != "diffusion":
        for key in ("model", "optim", "training"):
            out[key] = config[phase][key]
    return out


def _latest_step(directory: epath.Path) -> int | None:
    if not workdir_lib.is_workdir(directory):
        return None
    return max(workdir_lib.complete_steps(directory), default=None)


def _check_workdir(config: Any, workdir: epath.Path) -> None:
    """Writable, and holding nothing but an earlier run of this job's config."""
    files.check_writable(workdir, f"--workdir={workdir}")
    record = workdir / JOB_FILE
    if not record.exists():
        if any(p.name != locks.LOCK_FILE for p in workdir.iterdir()):
            raise ValueError(
                f"--workdir={workdir} is not empty and holds no quickstart run ({JOB_FILE} "
                "is missing); choose a new or empty --workdir."
            )
        return
    saved = files.read_json(record)
    for phase in PHASES:
        here = json.loads(config_json(phase_config(config, phase)))
        there = phase_config(ml_collections.ConfigDict(saved), phase)
        checks.check_resume_config(
            json.loads(config_json(there)), here, f"--workdir={workdir} ({phase} model)"
        )


def _train_phase(config: Any, workdir: epath.Path, phase: str, index: int) -> int:
    """Trains (or resumes, or reuses) one model; returns its final step."""
    from diffusion_jax import training

    cfg = phase_config(config, phase)
    directory = workdir / phase
    total = int(cfg.training.num_steps)
    done = _latest_step(directory)
    if done is not None and done >= total:
        logging.info("[%d/6] %s: reusing %s (step %d)", index, phase, directory, done)
        return done
    what = {
        "diffusion": "class-conditional diffusion model",
        "classifier": "noise-aware classifier (guidance)",
        "clean_classifier": "clean classifier (judges the samples)",
    }[phase]
    start = "from scratch" if done is None else f"resuming at step {done}"
    logging.info("[%d/6] training the %s: %d steps, %s", index, what, total, start)
    trainer = training.train if phase == "diffusion" else training.train_classifier
    state = trainer(cfg, directory)
    return int(jax.device_get(state.step))


def _write_state(workdir: epath.Path, state: dict) -> None:
    files.write_json_atomic(workdir / STATE_FILE, state, indent=2, sort_keys=True)


def image_statistics(images: np.ndarray) -> dict[str, float]:
    """Colour statistics of uint8 `[N, H, W, 3]` images, in 0-255 units.

    `median_background`: the median over every pixel of the grey level (channel mean):
    the background, since most of a digit image is background (0 for mnist).
    `channel_difference`: the mean over pixels and channel pairs of |c_i - c_j| (0 for
    grey images).
    """
    x = np.asarray(images, np.float32)
    diffs = [np.abs(x[..., i] - x[..., j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    return {
        "median_background": float(np.median(x.mean(axis=-1))),
        "channel_difference": float(np.mean(diffs)),
    }


def _write_npz(path: epath.Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes (atomically) unless the file already holds these arrays: a re-run keeps it,
    and with it the evaluator's activation cache beside it."""
    if path.exists() and all(map(np.array_equal, _read_npz(path), (images, labels))):
        return
    with files.atomic_write(path, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels)


def _paper_metrics(net, workdir: epath.Path, outputs: dict, test: tuple, train: tuple) -> dict:
    """FD / precision / recall / IS of each sample set on the clean classifier's features.

    Against the held-out test digits; the floor is the test digits themselves scored
    against the training digits (what a perfect model's samples of this size would get,
    up to the sample count).
    """
    from diffusion_jax import evaluation

    refs = {"test": workdir / "reference_test.npz", "train": workdir / "reference_train.npz"}
    _write_npz(refs["test"], *test)
    _write_npz(refs["train"], *train)

    def score(ref, sample) -> dict:
        # One IS split over the whole set (the paper's 5000-image splits need 5000).
        n = evaluation.open_image_npz(sample).num_images
        r = evaluation.evaluate_npz(ref, sample, net, split_size=n)
        return {"fd": float(r.fid), **{k: float(getattr(r, k)) for k in _STUDY_KEYS[1:]}}

    out = {name: score(refs["test"], path) for name, path in outputs.items()}
    out["floor"] = score(refs["train"], refs["test"])
    return out


def _guidance_study(config, workdir: epath.Path, steps: dict) -> dict:
    """The paper's guidance study through `launch.sweep`'s library: the classifier scale
    and the classifier-free scale, each scored on the clean classifier's features against
    the test digits. Each grid is a resumable sweep in `study/` (one per diffusion and
    classifier checkpoint, so retraining starts new ones)."""
    from diffusion_jax.jobs import sweep

    job = config.quickstart
    cfg = _sampling_config(config, 0.0, 1.0, len(jax.devices()))
    study = {}
    grids = [
        ("classifier_scale", tuple(job.study_classifier_scales), str(workdir / "classifier")),
        ("cfg_scale", tuple(job.study_cfg_scales), None),
    ]
    for field, scales, classifier in grids:
        if not scales or (field == "cfg_scale" and not float(config.training.label_dropout)):
            continue
        tag = f"d{steps['diffusion']}_c{steps['classifier']}_f{steps['clean_classifier']}"
        settings = sweep.SweepSettings(
            checkpoint=str(workdir / "diffusion"),
            reference=str(workdir / "reference_test.npz"),
            workdir=str(workdir / "study" / f"{field}_{tag}"),
            scales=scales,
            steps=(int(job.study_steps),) if int(job.study_steps) else (),
            scale_field=field,
            classifier_checkpoint=classifier,
            features=str(workdir / "clean_classifier"),
        )
        logging.info("[6/6] guidance study: %s over %s", field, scales)
        result = sweep.run_sweep(cfg, settings, progress=lambda line: logging.info("%s", line))
        study[field] = {
            "workdir": settings.workdir,
            "rows": [
                {"scale": r["point"]["scale"], **{k: r["metrics"][k] for k in _STUDY_KEYS}}
                for r in result.rows
            ],
        }
    return study


_STUDY_KEYS = ("fid", "precision", "recall", "inception_score")


def sample_runs(config: Any) -> list[tuple[str, float, float]]:
    """(name, classifier_scale, cfg_scale) of each sample set the job draws."""
    job = config.quickstart
    runs = [("unguided", 0.0, 1.0), ("guided", float(job.classifier_scale), 1.0)]
    if float(config.training.get("label_dropout", 0.0) or 0.0) > 0 and job.get("cfg_scale"):
        runs.append(("cfg", 0.0, float(job.cfg_scale)))
    return runs


def _sampling_config(config, classifier_scale, cfg_scale, num_devices) -> Any:
    cfg = phase_config(config, "diffusion")
    k = int(cfg.model.num_classes)
    per_class = int(config.quickstart.samples_per_class)
    n = per_class * k
    batch = min(n, int(cfg.sampling.batch_size))
    sampling = cfg.sampling.to_dict()
    sampling.update(
        num_samples=n,
        batch_size=-(-batch // num_devices) * num_devices,
        labels=tuple(int(c) for c in np.repeat(np.arange(k), per_class)),  # one row per class
        classifier_scale=float(classifier_scale),
        cfg_scale=float(cfg_scale),
        use_ema=True,
    )
    cfg.sampling = ml_collections.ConfigDict(sampling)  # labels: a tuple, not the str default
    return cfg


def _sample_phase(config, workdir, state: dict) -> dict[str, epath.Path]:
    """Draws each sample set through the resumable sampling job, whose identity (the
    checkpoints' steps and contents, the settings, the seed) decides what is reused,
    continued or drawn again."""
    from diffusion_jax.sampling import run_sampling_job

    mesh = parallel.create_mesh_from_config(config)
    outputs = {}
    runs = sample_runs(config)
    for i, (name, scale, cfg_scale) in enumerate(runs):
        t0 = time.time()
        cfg = _sampling_config(config, scale, cfg_scale, mesh.devices.size)
        output = outputs[name] = workdir / f"samples_{name}.npz"
        before = output.exists() and resumable.path_identity(output)
        logging.info(
            "[4/6] sampling %s (%d/%d): %d images, %s %s steps, classifier scale %g, "
            "cfg scale %g",
            name, i + 1, len(runs), cfg.sampling.num_samples, cfg.sampling.method,
            cfg.sampling.timestep_respacing, scale, cfg_scale,
        )  # fmt: skip
        run_sampling_job(
            cfg,
            str(workdir / "diffusion"),
            str(output),
            classifier_checkpoint=str(workdir / "classifier") if scale else None,
            mesh=mesh,
            redo_changed=True,
        )
        if resumable.path_identity(output) != before:  # drawn now (else: reused as it was)
            state.setdefault("sample_seconds", {})[name] = time.time() - t0
            _write_state(workdir, state)
    return outputs


def _read_npz(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        return np.asarray(data["arr_0"]), np.asarray(data["arr_1"])


def _classify(net: Any, images: np.ndarray, batch: int = 250) -> np.ndarray:
    """The classes the clean classifier's feature network (at t = 0) predicts."""
    logits = [net(images[s : s + batch])["logits"] for s in range(0, len(images), batch)]
    return np.concatenate([np.asarray(jnp.argmax(x, axis=-1)) for x in logits])


def _split_images(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split at the model's resolution, uint8, as the training pipeline makes it."""
    from diffusion_jax.data import create_input_pipeline

    data = phase_config(config, "diffusion").data
    data.update(split=split, shuffle_buffer=0, random_flip=False, random_crop=False, prefetch=1)
    with create_input_pipeline(
        data, global_batch_size=1, seed=0, process_index=0, process_count=1
    ) as pipeline:
        n = len(pipeline.source)
    batch = max(d for d in range(1, 501) if n % d == 0)
    images, labels = [], []
    with create_input_pipeline(
        data, global_batch_size=batch, seed=0, process_index=0, process_count=1
    ) as pipeline:
        for _ in range(n // batch):
            b = next(pipeline)
            images.append(np.asarray(b["image"]))
            labels.append(np.asarray(b["label"]))
    x = np.concatenate(images)
    # Data, not samples: rounding inverts the pipeline's x / 127.5 - 1 exactly (the samples'
    # truncation, sampling.to_uint8, would lower 63 of the 256 values by one).
    return np.round((x + 1.0) * 127.5).clip(0, 255).astype(np.uint8), np.concatenate(labels)


@functools.partial(jax.jit, static_argnums=0)
def _bpd_of_rows(diffusion, model_fn, images, seed, rows):
    base_key = jax.random.fold_in(jax.random.key(seed), _BPD_PURPOSE)
    out = diffusion.calc_bpd_loop(
        model_fn,
        images["x"][rows].astype(jnp.float32) / 127.5 - 1.0,
        jax.vmap(lambda i: jax.random.fold_in(base_key, i))(rows),
        model_kwargs={"y": images["y"][rows]},
    )
    return out["total_bpd"]


def bits_per_dim(
    diffusion, model_fn, images, labels, rows, *, seed: int, batch_size: int, mesh=None
) -> np.ndarray:
    """Total bits/dim (the full variational bound) of `images[rows]`, over every device.

    Each batch of rows is padded, split over the devices of `mesh` (default: all) and
    unpadded; image i's q_sample noise is keyed by `fold_in(fold_in(key(seed), purpose),
    i)` (its index in `images`), so the figures depend on neither the device count nor
    the batch.

    Args:
      diffusion: the model's diffusion (T steps each).
      model_fn: a `jax.tree_util.Partial` model function (its arrays are replicated).
      images: uint8 `[N, H, W, C]`; labels: int `[N]` (the model's `y`).
      rows: which images, int `[n]`.
      batch_size: images per batch (rounded up to a multiple of the device count).

    Returns:
      float `[n]`, in the order of `rows`.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    shards = parallel.num_data_shards(mesh)
    batch = -(-int(batch_size) // shards) * shards
    arrays = {"x": np.asarray(images), "y": np.asarray(labels, np.int32)}
    run = multihost.PadShardUnpad(
        functools.partial(
            _bpd_of_rows, diffusion, *parallel.global_replicated((model_fn, arrays), mesh), seed
        ),
        mesh,
        batch,
    )
    rows = np.asarray(rows, np.int32)
    totals, progress = [], Progress("bits/dim", len(rows))
    for s in range(0, len(rows), batch):
        totals.append(run(rows[s : s + batch])[0])
        progress.update(len(totals[-1]))
    return np.concatenate(totals)


def _bpd_phase(config, workdir, steps: dict, state: dict, test: tuple) -> dict:
    cfg = phase_config(config, "diffusion")
    job = config.quickstart
    test_x, test_y = test
    # The first bpd_num_images // num_classes test images of each class (split order).
    k = int(cfg.model.num_classes)
    per = max(1, int(job.bpd_num_images) // k)
    pick = np.concatenate([np.flatnonzero(test_y == c)[:per] for c in range(k)])
    made_from = {
        "diffusion_step": steps["diffusion"],
        "images": [int(i) for i in pick],
        "seed": int(cfg.seed),
    }
    cached = state.get("bpd")
    if cached and cached.get("made_from") == made_from:
        logging.info("[5/6] bits/dim: reusing the result for step %d", steps["diffusion"])
        return cached["result"]
    log2p = baseline.fit_categorical(_split_images(config, cfg.data.split)[0])
    rate = tuple(cfg.training.ema_rates)
    params, _ = restore_params(workdir / "diffusion", ema_rate=rate[0] if rate else None)
    model = models.create_model(cfg.model)
    diffusion = create_diffusion(cfg.diffusion)
    batch = int(job.bpd_batch_size)
    logging.info(
        "[5/6] bits/dim of %d test images (%d steps each, %d per batch over %d devices)",
        len(pick), diffusion.num_timesteps, batch, jax.device_count(),
    )  # fmt: skip
    start = time.time()
    model_fn = jax.tree_util.Partial(model.apply, {"params": params})
    total = bits_per_dim(
        diffusion, model_fn, test_x, test_y, pick, seed=int(cfg.seed), batch_size=batch
    )
    result = {
        "bpd": float(total.mean()),
        "bpd_stderr": float(total.std(ddof=1) / np.sqrt(len(total))) if len(total) > 1 else 0.0,
        "num_images": len(total),
        "baseline_bpd": float(baseline.categorical_bpd(log2p, test_x[pick]).mean()),
        "baseline_bpd_all_test": float(baseline.categorical_bpd(log2p, test_x).mean()),
        "num_test_images": len(test_x),
    }
    result["seconds"] = time.time() - start
    state["bpd"] = {"made_from": made_from, "result": result}
    _write_state(workdir, state)
    return result


def run_quickstart(config: Any, workdir: str | epath.PathLike) -> dict:
    """Runs (or continues) the quickstart job; returns its figures.

    Args:
      config: `configs/quickstart.py`'s config (overrides applied).
      workdir: where everything goes (see `summary.md` there); re-running with the same
        workdir reuses finished phases and resumes unfinished ones.

    Returns:
      The figures summary.md states (bits/dim, baseline, accuracies, times).

    Raises:
      OSError: the workdir is not writable.
      ValueError: the workdir holds another config's run, or a bad config (before any
        training).
    """
    if jax.process_count() > 1:
        raise ValueError("the quickstart is a one-host job; run it in a single process.")
    workdir = epath.Path(workdir)
    config = effective_config(config)
    num_devices = len(jax.devices())
    for phase in PHASES:
        trainer = "diffusion" if phase == "diffusion" else "classifier"
        checks.check_training_config(phase_config(config, phase), trainer, num_devices)
    _check_workdir(config, workdir)
    with locks.workdir_lock(workdir, job="quickstart"):
        _check_workdir(config, workdir)  # again, now that no other job can change it
        files.write_text_atomic(workdir / JOB_FILE, config_json(config))
        return _run_phases(config, workdir, num_devices)


def _run_phases(config: Any, workdir: epath.Path, num_devices: int) -> dict:
    began = time.time()
    state = files.read_json(workdir / STATE_FILE) if (workdir / STATE_FILE).exists() else {}
    times, steps = {}, {}
    for index, phase in enumerate(PHASES, start=1):
        t0 = time.time()
        before = _latest_step(workdir / phase)
        steps[phase] = _train_phase(config, workdir, phase, index)
        seconds = state.setdefault("train_seconds", {})
        if before != steps[phase]:  # trained now (else: the time of the run that did)
            seconds[phase] = seconds.get(phase, 0.0) * (before is not None) + time.time() - t0
            _write_state(workdir, state)
        times[phase] = seconds.get(phase, time.time() - t0)
    outputs = _sample_phase(config, workdir, state)
    times["sampling"] = sum(state.get("sample_seconds", {}).get(n, 0.0) for n in outputs)
    test = _split_images(config, config.data.eval_split)
    bpd = _bpd_phase(config, workdir, steps, state, test)
    times["bpd"] = bpd["seconds"]
    logging.info("[6/6] judging the samples with the clean classifier; writing the report")
    from diffusion_jax import evaluation

    net = evaluation.load_classifier_features(workdir / "clean_classifier")
    samples = {name: _read_npz(path) for name, path in outputs.items()}
    recognised = {
        name: {
            "accuracy": float(np.mean(_classify(net, images) == labels)),
            "num_samples": len(labels),
        }
        for name, (images, labels) in samples.items()
    }
    clean_test_acc = float(np.mean(_classify(net, test[0]) == test[1]))
    colour = {name: image_statistics(images) for name, (images, _) in samples.items()}
    colour["data (test)"] = image_statistics(test[0])
    metrics = _paper_metrics(net, workdir, outputs, test, _split_images(config, config.data.split))
    study = _guidance_study(config, workdir, steps) if config.quickstart.guidance_study else {}
    evals = read_metrics(workdir / "classifier")
    figures = {
        "steps": steps,
        "bpd": bpd,
        "recognised": recognised,
        "clean_classifier_test_accuracy": clean_test_acc,
        "colour": colour,
        "metrics": metrics,
        "study": study,
        # The last held-out evaluation the classifier run logged (metrics.jsonl).
        "classifier_eval": ([{}] + [r for r in evals if "eval_acc@1" in r])[-1],
        "runs": [list(r) for r in sample_runs(config)],
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "backend": jax.default_backend(),
        "num_devices": num_devices,
    }
    report.write_report(config, workdir, figures, outputs, samples)
    figures["seconds"]["total"] = round(time.time() - began, 1)
    files.write_json_atomic(workdir / "figures.json", figures, indent=2, sort_keys=True)
    logging.info("quickstart done in %.0f s: see %s", time.time() - began, workdir / "summary.md")
    return figures


__all__ = ["PHASES", "effective_config", "phase_config", "run_quickstart", "sample_runs"]
