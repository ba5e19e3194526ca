"""The optimiser: AdamW with warmup, the paper code's linear annealing, optional clipping."""

from __future__ import annotations

from typing import Any

import optax


def learning_rate_schedule(optim_config: Any, num_steps: int) -> optax.Schedule:
    """The learning rate at each step.

    Linear warmup from 0 over `optim.warmup_steps`, then constant `optim.lr`, or with
    `optim.anneal_lr` the paper code's annealing: lr * (1 - step / num_steps), reaching 0
    at the last step (the paper code's `--anneal_lr`, as its classifier training uses).

    Args:
      optim_config: `config.optim`.
      num_steps: `config.training.num_steps`.

    Returns:
      An optax schedule (step -> lr).
    """
    lr = float(optim_config.lr)
    warmup = int(optim_config.get("warmup_steps", 0) or 0)

    def schedule(step):
        value = lr
        if optim_config.get("anneal_lr", False):
            value = lr * (1.0 - step / num_steps)
        if warmup > 0:
            value = value * optax.linear_schedule(0.0, 1.0, warmup)(step)
        return value

    return schedule


def create_optimizer(optim_config: Any, num_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with the config's schedule.

    Args:
      optim_config: `config.optim` (lr, weight_decay, b1, b2, eps, warmup_steps,
        anneal_lr, grad_clip_norm: None or a maximum global gradient norm).
      num_steps: `config.training.num_steps` (the annealing horizon).

    Returns:
      An optax transformation; `optax.inject_hyperparams` is not used, the schedule is
      a pure function of the optimiser's step count (checkpointed with its state).
    """
    parts = []
    clip = optim_config.get("grad_clip_norm", None)
    if clip is not None and clip > 0:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(
        optax.adamw(
            learning_rate_schedule(optim_config, num_steps),
            b1=float(optim_config.b1),
            b2=float(optim_config.b2),
            eps=float(optim_config.eps),
            weight_decay=float(optim_config.weight_decay),
        )
    )
    return optax.chain(*parts)
