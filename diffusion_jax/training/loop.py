"""The training loops: `train(config, workdir)` and `train_classifier(config, workdir)`.

One jitted step over the mesh of every device of every process, the state donated and
laid out by `parallel.state_shardings` (sharded over the mesh's `fsdp` axis, `config.mesh`).
The loop feeds global batches, logs through clu writers, reports progress, saves Orbax
checkpoints (every `training.checkpoint_every` steps, at the end and when `stop` is set) and
resumes from the latest complete one when started again with the same workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as logging_std
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import locks, parallel, resumable
from diffusion_jax.checkpoints.workdir import complete_steps, create_manager
from diffusion_jax.data import create_input_pipeline
from diffusion_jax.diffusion import create_diffusion
from diffusion_jax.diffusion.resample import sampler_from_config
from diffusion_jax.files import read_json
from diffusion_jax.models import (
    create_classifier,
    create_model,
    model_spec,
    null_label,
    validate_model_config,
)
from diffusion_jax.progress import absl_records_dropped
from diffusion_jax.training import aot, checkpointing, checks, steps
from diffusion_jax.training.optimizer import create_optimizer, learning_rate_schedule
from diffusion_jax.training.state import TrainState, create_train_state
from diffusion_jax.training.writers import create_writer, progress_actions

CONFIG_FILE = "config.json"


class NonFiniteError(RuntimeError):
    """A run kept producing non-finite losses or gradients."""


def config_json(config: Any) -> str:
    """The effective config as JSON (what config.json and every checkpoint hold)."""
    return config.to_json_best_effort(indent=2, sort_keys=True)


@dataclasses.dataclass
class _Task:
    """What differs between diffusion and classifier training."""

    module: Any
    init_inputs: Callable[[int], tuple[tuple, dict]]  # batch -> (args, kwargs) for init
    step_fn: Callable  # partial of a steps.*_train_step with its statics bound
    sampler_state: Any
    on_log: Callable[[int, TrainState], dict] | None = None  # extra eval metrics


def _init_inputs(config: Any):
    """batch -> (args, kwargs) of the model's init: zeros shaped as its spec says."""
    settings = validate_model_config(config.model)
    spec = model_spec(settings["kind"])
    low_res_size = config.data.get("low_res_size")
    return lambda b: spec.example_inputs(settings, b, low_res_size, abstract=False)


def _init_params(module, init_inputs, seed: int):
    args, kwargs = init_inputs(1)
    rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
    return module.init(rngs, *args, **kwargs)["params"]


@dataclasses.dataclass
class Setup:
    """A run's compiled pieces, shared by the loop and the tests.

    Attributes:
      task: model, step function and hooks of the trainer.
      abstract_params: `jax.ShapeDtypeStruct` tree of the parameters.
      abstract_state: the TrainState's abstract leaves, with their shardings.
      shardings: the TrainState's shardings (`parallel.state_shardings`).
      init: `init(params=None) -> TrainState` at step 0, laid out on the mesh (random
        parameters when None).
      train_step: the jitted `(state, global batch) -> (state, metrics)`, state donated.
    """

    task: _Task
    abstract_params: Any
    abstract_state: Any
    shardings: Any
    init: Callable
    train_step: Callable


def create_setup(config: Any, mesh, trainer: str, workdir: epath.Path | None = None) -> Setup:
    """Builds model, optimiser, shardings and the jitted step of a run (no device work).

    Args:
      config: the run's config (checked already).
      mesh: the training mesh.
      trainer: 'diffusion' or 'classifier'.
      workdir: where hooks write sample grids (None: hooks off).
    """
    training = config.training
    num_micro = 1 if training.microbatch in (-1, 0) else training.batch_size // training.microbatch
    optimizer = create_optimizer(config.optim, training.num_steps)
    settings_kwargs = {
        "optimizer": optimizer,
        "lr_schedule": learning_rate_schedule(config.optim, training.num_steps),
        "ema_rates": tuple(float(r) for r in training.ema_rates),
        "num_microbatches": num_micro,
        "ema_warmup": bool(training.get("ema_warmup", False)),
        "fsdp": parallel.FsdpGather.for_mesh(mesh, training.fsdp_min_size),
    }
    task = _TASKS[trainer](config, settings_kwargs, mesh, workdir)

    def init_state(params):
        return create_train_state(
            params, optimizer, training.ema_rates, task.sampler_state, config.seed
        )

    abstract_params = jax.eval_shape(
        functools.partial(_init_params, task.module, task.init_inputs, config.seed)
    )
    abstract_state = jax.eval_shape(init_state, abstract_params)
    shardings = parallel.state_shardings(abstract_state, mesh, min_size=training.fsdp_min_size)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )

    make_random = jax.jit(
        lambda: init_state(_init_params(task.module, task.init_inputs, config.seed)),
        out_shardings=shardings,
    )
    make_from = jax.jit(init_state, out_shardings=shardings)

    def init(params=None):
        return make_random() if params is None else make_from(params)

    train_step = jax.jit(
        task.step_fn,
        in_shardings=(shardings, parallel.data_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated_sharding(mesh)),
        donate_argnums=0,
    )
    return Setup(task, abstract_params, abstract_state, shardings, init, train_step)


def _run(config: Any, workdir: str | epath.PathLike, trainer: str, stop) -> TrainState:
    workdir = epath.Path(workdir)
    job = "training" if trainer == "diffusion" else "classifier training"
    # Orbax logs dozens of INFO lines per save; its warnings and errors still show.
    quiet_orbax = absl_records_dropped(
        lambda r: r.levelno < logging_std.WARNING and "/orbax/" in r.pathname
    )
    with locks.exclusive_workdir(workdir, job=job), quiet_orbax:
        return _train(config, workdir, trainer, stop)


def _train(config: Any, workdir: epath.Path, trainer: str, stop) -> TrainState:
    mesh = parallel.create_mesh_from_config(config)  # checks config.mesh
    checks.check_training_config(config, trainer, parallel.num_data_shards(mesh))
    logging.info("Mesh: data=%d x fsdp=%d.", mesh.shape["data"], mesh.shape["fsdp"])
    if (workdir / CONFIG_FILE).exists():  # another config's run is refused; nothing written
        saved = read_json(workdir / CONFIG_FILE, hint="Use a new --workdir.")
        checks.check_resume_config(saved, json.loads(config_json(config)), str(workdir))
    # The data source is opened (a missing or empty one is one line) before the compile;
    # no image is read until the compiled step runs.
    pipeline = _open_pipeline(config, mesh)
    setup = create_setup(config, mesh, trainer, workdir)
    # A fresh run's training.init_from is read and checked against the model now: a
    # checkpoint that does not fit is one line before the compile.
    fresh = not (workdir.exists() and complete_steps(workdir))
    init_params = _init_from_params(config, setup) if fresh else None
    # Compiled before data is read or anything written: a step that cannot fit stops here.
    compiled, _ = aot.compile_train_step(config, mesh, setup)
    setup = dataclasses.replace(setup, train_step=compiled)
    manager = create_manager(workdir, keep=config.training.keep_checkpoints)
    state, positions = _restore_or_init(config, workdir, setup, manager, init_params)
    if positions is not None:  # where this process's reading stopped
        pipeline.set_state(positions[jax.process_index()])
    resumable.write_text(workdir / CONFIG_FILE, config_json(config))  # every check passed
    with pipeline:
        try:
            state = _step_loop(config, workdir, setup, state, pipeline, manager, stop)
        except BaseException:  # close the manager, so that the process exits at once
            checkpointing.abandon(manager)
            raise
    checkpointing.finish_saves(manager)
    return state


def _init_from_params(config: Any, setup: Setup):
    """`training.init_from`'s parameters (host arrays) checked against the model, or None."""
    path = config.training.init_from
    if not path:
        return None
    from diffusion_jax.checkpoints import check_param_shapes, restore_params

    params, _ = restore_params(path, ema_rate=config.training.init_from_ema_rate)
    check_param_shapes(params, setup.abstract_params, f"training.init_from={path}")
    return jax.device_get(params)  # laid out on the mesh by init


def _restore_or_init(config: Any, workdir: epath.Path, setup: Setup, manager, init_params):
    """(state, every process's data position) of the latest checkpoint, else (step 0, None)
    from `init_params` (read here if None: a workdir whose checkpoints were all damaged)."""
    current = json.loads(config_json(config))
    restored = checkpointing.restore_newest(
        manager,
        setup.abstract_state,
        check_config=lambda saved, s: checks.check_resume_config(
            saved, current, f"{workdir} (step {s})"
        ),
    )
    if restored is not None:
        (state, positions, _), latest = restored
        checkpointing.set_aside_newer(manager, latest)  # damaged steps the run will redo
        if len(positions) != jax.process_count():
            raise ValueError(
                f"{workdir} was saved by {len(positions)} processes; resume it with "
                f"{len(positions)} processes (now {jax.process_count()})."
            )
        logging.info("Resumed %s at step %d.", workdir, latest)
        return state, positions
    params = init_params if init_params is not None else _init_from_params(config, setup)
    if params is not None:  # fine-tuning: a convert_checkpoint directory's or a workdir's
        logging.info("Fine-tuning from %s.", config.training.init_from)
    return setup.init(params), None


def _open_pipeline(config: Any, mesh):
    """The run's global-batch input pipeline (it reads nothing until its first batch)."""
    pipeline = create_input_pipeline(
        config.data,
        global_batch_size=config.training.batch_size,
        seed=config.seed,
        mesh=mesh,
        num_classes=config.model.num_classes,
    )
    if len(pipeline.source) == 0:
        raise ValueError(
            f"data.dataset={config.data.dataset!r} (split {config.data.split!r}) has no "
            "images; check data.data_dir and data.split."
        )
    return pipeline


def _step_loop(config, workdir, setup, state, pipeline, manager, stop) -> TrainState:
    """Steps until training.num_steps or an agreed stop, logging and saving on the way."""
    training = config.training
    writer = create_writer(workdir)
    actions = progress_actions(config, workdir, writer)
    step = int(jax.device_get(state.step))
    if step == 0 and jax.process_index() == 0:
        flat = resumable.flatten(json.loads(config_json(config)))
        writer.write_hparams(
            {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        )
    cfg_json = config_json(config)
    pending: list[dict] = []
    last_log = (time.time(), step)
    while step < training.num_steps:
        state, metrics = setup.train_step(state, next(pipeline))
        step += 1
        pending.append(metrics)
        for action in actions:
            action(step)
        if step % training.log_every == 0 or step == training.num_steps:
            last_log = _log_summary(
                config, writer, manager, pipeline, state, step, pending, last_log
            )
            pending = []
        extra = setup.task.on_log and setup.task.on_log(step, state)
        if extra and "_images" in extra:
            writer.write_images(step, {"samples": extra.pop("_images")[None]})
        if extra:
            writer.write_scalars(step, extra)
        agree_now = jax.process_count() == 1 or step % training.log_every == 0
        stopping = agree_now and resumable.any_process(stop is not None and stop.is_set())
        if step % training.checkpoint_every == 0 or step == training.num_steps or stopping:
            positions = checkpointing.gather_data_positions(pipeline.get_state())
            checkpointing.save(manager, state, positions, cfg_json)
        if stopping:
            logging.warning("Stopped at step %d on request; rerun to resume.", step)
            break
    writer.flush()
    return state


def _log_summary(config, writer, manager, pipeline, state, step, pending, last_log):
    """Writes the mean metrics since last_log; stops a non-finite run. -> (time, step)."""
    pending = jax.device_get(pending)
    summary = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
    now = time.time()
    rate = (step - last_log[1]) / max(now - last_log[0], 1e-9)
    summary["images_per_sec"] = rate * config.training.batch_size
    summary["skipped_images"] = float(pipeline.num_skipped)
    writer.write_scalars(step, summary)
    checkpointing.check_saves(manager)  # a failed async save stops the run now
    consecutive = int(jax.device_get(state.nonfinite[1]))
    if consecutive >= config.training.max_nonfinite_steps:
        manager.wait_until_finished()
        raise NonFiniteError(
            f"step {step}: the last {consecutive} updates had a non-finite loss or "
            "gradient and were skipped (the saved checkpoints hold none of them); "
            "lower optim.lr, set optim.grad_clip_norm, or check the data."
        )
    return now, step


# ----- diffusion models ----------------------------------------------------------------


def _diffusion_task(config, settings_kwargs, mesh, workdir) -> _Task:
    from diffusion_jax.training import in_training_eval

    model = create_model(config.model)
    diffusion = create_diffusion(config.diffusion)
    sampler = sampler_from_config(config.training, diffusion.num_timesteps)
    settings = steps.StepSettings(
        apply_fn=model.apply,
        num_timesteps=diffusion.num_timesteps,
        label_dropout=float(config.training.get("label_dropout", 0.0)),
        null_label=null_label(config.model),
        **settings_kwargs,
    )
    step_fn = functools.partial(
        steps.diffusion_train_step, settings=settings, diffusion=diffusion, sampler=sampler
    )
    on_log = None if workdir is None else in_training_eval.diffusion_hooks(config, mesh, workdir)
    return _Task(model, _init_inputs(config), step_fn, sampler.init_state(), on_log)


def train(
    config: Any, workdir: str | epath.PathLike, *, stop: threading.Event | None = None
) -> TrainState:
    """Trains (or resumes) the diffusion model or upsampler `config` describes.

    Args:
      config: a paper config (`configs/imagenet128.py`, `configs/upsample64_256.py`, ...).
      workdir: where config.json, checkpoints/, TensorBoard events and sample grids go;
        running again with the same workdir resumes from its latest complete checkpoint.
      stop: when set (e.g. by the launcher's SIGTERM handler), the loop saves a
        checkpoint and returns at the next step (every process agreeing).

    Returns:
      The final train state.

    Raises:
      ValueError: for a bad config or a workdir holding another run (before any compile).
      NonFiniteError: when training keeps producing non-finite losses.
      locks.WorkdirLockedError: another job holds the workdir (names it).
      checkpointing.CheckpointSaveError: a checkpoint could not be written.
      FileNotFoundError: the workdir has checkpoints but none is readable.
    """
    return _run(config, workdir, "diffusion", stop)


# ----- noise-aware classifiers ---------------------------------------------------------


def _classifier_task(config, settings_kwargs, mesh, workdir) -> _Task:
    from diffusion_jax.training import in_training_eval

    model = create_classifier(config.model)
    diffusion = create_diffusion(config.diffusion)
    settings = steps.StepSettings(
        apply_fn=model.apply, num_timesteps=diffusion.num_timesteps, **settings_kwargs
    )
    step_fn = functools.partial(
        steps.classifier_train_step,
        settings=settings,
        diffusion=diffusion,
        noised=bool(config.training.noised),
    )
    on_log = (
        None
        if workdir is None
        else in_training_eval.classifier_hooks(config, model, diffusion, mesh)
    )
    return _Task(model, _init_inputs(config), step_fn, {}, on_log)


def train_classifier(
    config: Any, workdir: str | epath.PathLike, *, stop: threading.Event | None = None
) -> TrainState:
    """Trains (or resumes) the noise-aware classifier `config` describes.

    As the paper code's classifier_train.py: inputs noised with q_sample at uniformly
    drawn t (`training.noised`), AdamW with weight decay and linear annealing, loss and
    acc@1/acc@5 overall and per t-quartile, held-out evaluation on `data.eval_split`
    every `training.eval_every` steps.

    Args:
      config: a classifier config (`configs/classifier128.py`, ...).
      workdir: as for `train`.
      stop: as for `train`.

    Returns:
      The final train state.
    """
    return _run(config, workdir, "classifier", stop)


_TASKS = {"diffusion": _diffusion_task, "classifier": _classifier_task}
