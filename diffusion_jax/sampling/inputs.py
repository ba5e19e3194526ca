"""A sampling job's inputs, checked before any device work: one sentence per problem.

The checkpoint's saved config must describe the network `config.model` describes (and
the diffusion `config.diffusion` describes); a guidance classifier must see the
model's resolution and classes; base samples must be the upsampler's low-resolution
input (with labels when it is class-conditional); labels must name existing classes;
the output directory must be writable.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import files, models

CONFIG_FILE = "config.json"  # beside every converted checkpoint and training workdir
# `config.diffusion` fields the model was trained for (respacing is the sampler's choice).
DIFFUSION_FIELDS = (
    "steps",
    "learn_sigma",
    "sigma_small",
    "noise_schedule",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
)
_FIELD_NAMES = {
    "model_channels": "num_channels",
    "out_channels": "learn_sigma",
    "null_class": "label_dropout",
}
_LABEL_PURPOSE = 1  # labels 'random': label i from fold_in(fold_in(seed key, 1), i)


def read_saved_config(directory: str, flag: str) -> ml_collections.ConfigDict:
    """The config saved beside a checkpoint (converted directory or training workdir)."""
    path = epath.Path(directory) / CONFIG_FILE
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"{flag}={directory}: no such directory.")
    if not path.exists():
        raise FileNotFoundError(
            f"{flag}={directory} has no {CONFIG_FILE}: it is neither a convert_checkpoint "
            "directory nor a training workdir."
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_model_matches(saved: Any, model_config: Any, flag: str, section: str = "model") -> None:
    """Raises ValueError naming the first architecture field the two configs disagree on."""
    try:
        theirs = models.validate_model_config(saved)
    except ValueError as e:
        raise ValueError(f"{flag}: its saved config.model is not valid: {e}") from None
    ours = models.validate_model_config(model_config)
    for field in models.model_spec(ours["kind"]).architecture:
        a, b = _normalise(theirs.get(field)), _normalise(ours.get(field))
        if a != b:
            name = _FIELD_NAMES.get(field, field)
            if field in ("out_channels", "null_class"):
                default = 0.0 if field == "null_class" else None
                a, b = saved.get(name, default), model_config.get(name, default)
            raise ValueError(
                f"{flag} does not match the config: the checkpoint has {section}.{name}={a!r}, "
                f"the config {section}.{name}={b!r}; set --config.{section}.{name}={a!r} (or "
                "use the config the checkpoint was made with)."
            )


def check_diffusion_matches(saved: Any, diffusion_config: Any, flag: str) -> None:
    """Raises ValueError naming the first diffusion field the model was trained without."""
    if saved is None:
        return
    for field in DIFFUSION_FIELDS:
        if field not in saved or field not in diffusion_config:
            continue
        a, b = _normalise(saved[field]), _normalise(diffusion_config[field])
        if a != b:
            raise ValueError(
                f"{flag} does not match the config: the model was trained with "
                f"diffusion.{field}={a!r}, the config has diffusion.{field}={b!r}; set "
                f"--config.diffusion.{field}={a!r}."
            )


def load_config_spec(spec: str, field: str) -> ml_collections.ConfigDict:
    """Loads `path[:argument]` (e.g. sampling.classifier_config) as `--config` does."""
    config, problem = files.load_config_file(spec)
    if problem:
        raise ValueError(f"{field}={spec!r}: {problem}")
    return config


def check_classifier(classifier_model: Any, model_config: Any, flag: str) -> int:
    """Checks a guidance classifier against the diffusion model; returns its class count."""
    settings = models.validate_model_config(classifier_model)
    if models.model_spec(settings["kind"]).trainer != "classifier":
        raise ValueError(f"{flag} holds a {settings['kind']!r} network, not a classifier.")
    size = int(model_config.image_size)
    if settings["image_size"] != size:
        raise ValueError(
            f"{flag} is a classifier of {settings['image_size']}x{settings['image_size']} "
            f"images; the model samples {size}x{size} ("
            + (
                f"use configs/classifier{size}.py's"
                if size in (64, 128, 256, 512)  # the paper's classifier configs
                else f"train one with model.image_size={size}"
            )
            + ")."
        )
    num_classes = settings["num_classes"]
    model_classes = model_config.get("num_classes")
    if model_classes is not None and num_classes != model_classes:
        raise ValueError(
            f"{flag} is a classifier over {num_classes} classes; the model has "
            f"model.num_classes={model_classes}."
        )
    return int(num_classes)


def check_num_samples(num_samples: Any, batch_size: Any, num_devices: int) -> None:
    """num_samples positive; batch_size a positive multiple of the device count."""
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"sampling.num_samples must be a positive integer, got {num_samples!r}.")
    if not isinstance(batch_size, int) or batch_size <= 0 or batch_size % num_devices:
        raise ValueError(
            f"sampling.batch_size={batch_size!r} must be a positive multiple of the "
            f"{num_devices} devices (it is the global batch)."
        )


def job_labels(labels: Any, num_classes: int | None, num_samples: int, seed: int) -> np.ndarray:
    """The label of every sample, int32 [num_samples], from `sampling.labels`.

    Args:
      labels: 'random' (uniform, label i drawn from fold_in(key(seed), ...) with i, so
        a sample's label does not depend on the job's size), one class, or a tuple of
        classes used in turn.
      num_classes: the classes that exist.
      num_samples: N.
      seed: config.seed.

    Raises:
      ValueError: naming sampling.labels for a malformed or out-of-range value.
    """
    if num_classes is None:
        raise ValueError("sampling.labels need a class-conditional model or a classifier.")
    if isinstance(labels, str) and labels != "random":
        try:
            labels = tuple(int(v) for v in labels.replace(",", " ").split())
        except ValueError:
            raise ValueError(
                f"sampling.labels must be 'random', one class or a tuple of classes, got "
                f"{labels!r}."
            ) from None
        if len(labels) == 1:
            labels = labels[0]
    if isinstance(labels, str):  # 'random'
        key = jax.random.fold_in(jax.random.key(seed), _LABEL_PURPOSE)
        draw = jax.vmap(
            lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes)
        )
        return np.asarray(draw(jnp.arange(num_samples, dtype=jnp.uint32)), np.int32)
    values = np.atleast_1d(np.asarray(labels))
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"sampling.labels must be integers in [0, {num_classes}), got {labels!r}.")
    if values.min() < 0 or values.max() >= num_classes:
        raise ValueError(
            f"sampling.labels={labels!r} is out of range: the classes are 0..{num_classes - 1}."
        )
    return np.resize(values.astype(np.int32), num_samples)


def read_base_samples(
    path: str, model_config: Any, low_res_size: int, need_labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """An upsampler's inputs from a base job's .npz: (uint8 [N, h, w, C], labels or None)."""
    path_ = epath.Path(path)
    if not path_.exists():
        raise FileNotFoundError(f"--base_samples={path}: no such file.")
    with path_.open("rb") as f, np.load(f) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(f"--base_samples={path} has no arr_0 (images).")
        images = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz.files else None
    channels = int(model_config.get("in_channels", 3))
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"--base_samples={path}: arr_0 must be uint8 [N, H, W, C], got {images.dtype} "
            f"{images.shape}."
        )
    if images.shape[1:] != (low_res_size, low_res_size, channels):
        raise ValueError(
            f"--base_samples={path} holds {images.shape[1]}x{images.shape[2]} images; the "
            f"upsampler needs {low_res_size}x{low_res_size}x{channels} (data.low_res_size)."
        )
    if need_labels and labels is None:
        raise ValueError(
            f"--base_samples={path} has no labels (arr_1), which the class-conditional "
            "upsampler needs: sample the base with a class-conditional model."
        )
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"--base_samples={path}: arr_1 must hold one label per image.")
    return images, labels


def check_output(path: str) -> epath.Path:
    """Checks that the output's directory exists or can be made, and can be written."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"--output={path} must name a .npz file.")
    out = epath.Path(path)
    probe = f".{out.name}.write_test.{jax.process_index()}"
    files.check_writable(out.parent, f"--output={path}", probe)
    return out


__all__ = [
    "check_classifier",
    "check_diffusion_matches",
    "check_model_matches",
    "check_num_samples",
    "check_output",
    "job_labels",
    "load_config_spec",
    "read_base_samples",
    "read_saved_config",
]
