"""Training: train state, pure steps, and the loops that log, checkpoint and resume.

`train(config, workdir)` trains a diffusion model or upsampler, `train_classifier(config,
workdir)` a noise-aware classifier; both resume from the workdir's latest checkpoint.
"""

from diffusion_jax.training.loop import NonFiniteError, train, train_classifier
from diffusion_jax.training.optimizer import create_optimizer, learning_rate_schedule
from diffusion_jax.training.state import TrainState, create_train_state, ema_key
from diffusion_jax.training.steps import (
    StepSettings,
    classifier_eval_step,
    classifier_train_step,
    diffusion_train_step,
)

__all__ = [
    "NonFiniteError",
    "StepSettings",
    "TrainState",
    "classifier_eval_step",
    "classifier_train_step",
    "create_optimizer",
    "create_train_state",
    "diffusion_train_step",
    "ema_key",
    "learning_rate_schedule",
    "train",
    "train_classifier",
]
