"""Config checks before any device work: one-line errors naming the fields to fix."""

from __future__ import annotations

from typing import Any

from etils import epath

from diffusion_jax import resumable

# Fields that may change between a run and its resumption: how long, how often to log
# / save / sample / evaluate, where the data lives, sampling settings, the mesh. Everything else
# must equal the checkpointed run's config.
RESUMABLE_FIELDS = (
    "training.num_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.sample_every",
    "training.sample_grid_size",
    "training.sample_steps",
    "training.eval_every",
    "training.eval_num_samples",
    "training.eval_reference",
    "training.inception_weights",
    "training.profile_steps",
    "training.max_nonfinite_steps",
    "data.data_dir",
    "data.prefetch",
    "sampling",
    # The device layout: a run continues on another mesh (or device count), and the
    # runs saved with the deprecated training.fsdp and no mesh section resume too.
    "mesh",
    "training.fsdp",
    "training.fsdp_min_size",
)

_LAUNCHERS = {"diffusion": "launch.train", "classifier": "launch.train_classifier"}


def check_training_config(config: Any, trainer: str, num_devices: int) -> None:
    """Validates a config for `trainer` ('diffusion' | 'classifier') on `num_devices`.

    Raises:
      ValueError: naming the field(s) and how to fix them.
    """
    from diffusion_jax.diffusion import create_diffusion
    from diffusion_jax.diffusion.resample import sampler_from_config
    from diffusion_jax.models import model_spec, validate_model_config

    spec = model_spec(config.model.kind)
    if spec.trainer != trainer:
        raise ValueError(
            f"model.kind={spec.kind!r} is trained by python -m {_LAUNCHERS[spec.trainer]}, not "
            f"{_LAUNCHERS[trainer]}."
        )
    model, data, training = config.model, config.data, config.training
    _check_label_dropout(config, trainer)
    check_optim_config(config.optim)
    if "sampling" in config:  # in-training samples use it
        check_guidance_config(config.sampling)

    validate_model_config(model)  # architecture fields, before anything is written
    diffusion = create_diffusion(config.diffusion)
    sampler_from_config(training, diffusion.num_timesteps)
    if trainer == "diffusion" and bool(data.class_cond) != (model.num_classes is not None):
        raise ValueError(
            f"data.class_cond={data.class_cond} disagrees with model.num_classes="
            f"{model.num_classes}: a class-conditional model needs labelled data "
            "(set both, or neither: model.num_classes=None with data.class_cond=False)."
        )
    if trainer == "classifier" and not data.class_cond:
        raise ValueError("a classifier trains on labels: set data.class_cond=True.")
    if trainer == "classifier" and not model.num_classes:
        raise ValueError("a classifier needs model.num_classes (its number of logits).")
    if model.image_size != data.image_size:
        raise ValueError(
            f"model.image_size={model.image_size} != data.image_size={data.image_size}; "
            "set one value for both."
        )
    if trainer == "diffusion" and model.learn_sigma != config.diffusion.learn_sigma:
        raise ValueError(
            f"model.learn_sigma={model.learn_sigma} != diffusion.learn_sigma="
            f"{config.diffusion.learn_sigma}; set one value for both."
        )
    if spec.takes_low_res and not data.low_res_size:
        raise ValueError("an upsampler needs data.low_res_size (the side of its low_res input).")
    for name in ("num_steps", "log_every", "checkpoint_every"):
        if training[name] <= 0:
            raise ValueError(f"training.{name} must be positive, got {training[name]}.")
    batch = training.batch_size
    if batch <= 0 or batch % num_devices:
        raise ValueError(
            f"training.batch_size={batch} must be a positive multiple of the device count "
            f"({num_devices})."
        )
    micro = training.microbatch
    if micro not in (-1, 0) and (micro <= 0 or batch % micro or micro % num_devices):
        raise ValueError(
            f"training.microbatch={micro} must divide training.batch_size={batch} and be a "
            f"multiple of the device count ({num_devices}); -1 = no gradient accumulation."
        )
    for rate in training.ema_rates:
        if not 0.0 < float(rate) < 1.0:
            raise ValueError(f"training.ema_rates must lie in (0, 1), got {rate}.")
    if trainer == "diffusion" and training.sample_every:
        grid = training.sample_grid_size
        if grid <= 0 or grid % num_devices:
            raise ValueError(
                f"training.sample_grid_size={grid} must be a positive multiple of the device "
                f"count ({num_devices}) (or training.sample_every=0 for no grids)."
            )
    if training.eval_every and trainer == "diffusion" and training.eval_reference:
        n = training.eval_num_samples
        if n < 2 or n % num_devices:
            raise ValueError(
                f"training.eval_num_samples={n} must be >= 2 and a multiple of the device "
                f"count ({num_devices})."
            )
        for field in ("eval_reference", "inception_weights"):
            path = training[field]
            if not path or not epath.Path(path).exists():
                raise ValueError(
                    f"training.{field}={path!r} does not exist; in-training FID needs a "
                    "reference batch and the Inception weights (or training.eval_every=0)."
                )
    if training.init_from and not epath.Path(training.init_from).exists():
        raise ValueError(
            f"training.init_from={training.init_from!r} does not exist: give a "
            "convert_checkpoint output directory or a training workdir."
        )


def _number(section: str, name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{section}.{name} must be a number, got {value!r}.") from None


def check_optim_config(optim: Any) -> None:
    """Validates `config.optim`: one-line ValueError naming the field and its range."""
    ranges = {  # name: (test, allowed range as said in the message)
        "lr": (lambda v: v >= 0, ">= 0"),
        "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "eps": (lambda v: v > 0, "> 0"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "warmup_steps": (lambda v: v >= 0 and v == int(v), "an integer >= 0"),
        "grad_clip_norm": (lambda v: v > 0, "> 0 (or None for no clipping)"),
    }
    for name, (ok, allowed) in ranges.items():
        value = optim.get(name, None)
        if value is None:
            continue
        number = _number("optim", name, value)
        if not (number == number and ok(number)):  # NaN fails every range
            raise ValueError(f"optim.{name} must be {allowed}, got {value}.")


def check_guidance_config(sampling: Any) -> None:
    """Validates the guidance scales of `config.sampling` (one-line ValueError).

    `classifier_scale` >= 0 (0 = no classifier guidance) and `cfg_scale` >= 0 (1 = plain
    conditional sampling, 0 = unconditional); a negative scale pushes samples away from
    their class.
    """
    for name, meaning in (
        ("classifier_scale", "0 = no classifier guidance"),
        ("cfg_scale", "1.0 = plain conditional sampling"),
    ):
        value = sampling.get(name, None)
        if value is None:
            continue
        number = _number("sampling", name, value)
        if not (number == number and number >= 0 and number != float("inf")):
            raise ValueError(
                f"sampling.{name} must be a finite number >= 0 ({meaning}), got {value}."
            )


def _check_label_dropout(config: Any, trainer: str) -> None:
    rate = float(config.training.get("label_dropout", 0.0))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"training.label_dropout must be in [0, 1), got {rate}.")
    if rate > 0 and trainer == "classifier":
        raise ValueError(
            f"training.label_dropout={rate} is for diffusion models (classifier-free "
            "guidance); a classifier trains on every label: set training.label_dropout=0.0."
        )
    if rate > 0 and config.model.num_classes is None:
        raise ValueError(
            f"training.label_dropout={rate} needs a class-conditional model: set "
            "model.num_classes (and data.class_cond=True), or training.label_dropout=0.0."
        )
    if float(config.model.get("label_dropout", 0.0)) != rate:
        raise ValueError(
            f"model.label_dropout={config.model.get('label_dropout', 0.0)} != "
            f"training.label_dropout={rate}; set one value for both."
        )


# A field a newer version added is off in runs saved before it existed.
_OFF = (None, False, 0, 0.0, "", [])
# Fields added later whose default is not off: the value every earlier run had.
_ADDED_WITH_VALUE = {"model.norm_groups": 32}


def _was_implicit(key: str, value: Any) -> bool:
    """True when `value` of a field the saved run lacks is what that run implicitly used."""
    if any(value == off and type(value) is type(off) for off in _OFF):
        return True
    return any(
        (key == f or key.endswith("." + f)) and value == v for f, v in _ADDED_WITH_VALUE.items()
    )


def config_differences(saved: dict, current: dict) -> list[str]:
    """Fields (dotted) whose values differ, ignoring RESUMABLE_FIELDS.

    A field the saved run does not have (written before the field existed) counts as
    equal when its current value is off (None, False, 0, '', ()): new features default
    to off, so such a run resumes under a newer version.
    """
    return resumable.differences(
        saved, current, ignore=RESUMABLE_FIELDS, implicit=_was_implicit, saved_name="run"
    )


def check_resume_config(saved: dict, current: dict, where: str) -> None:
    """Raises ValueError naming the fields in which `current` departs from a saved run."""
    diffs = config_differences(saved, current)
    if diffs:
        raise ValueError(
            f"{where} holds a run of another config: {resumable.summarise(diffs)}. Use a new "
            "--workdir, or the same config to resume."
        )
