"""Pure, jittable train and eval steps for diffusion models and noise-aware classifiers.

`train_step(state, batch) -> (state, metrics)`: global-view code (means over the
global batch; XLA inserts the collectives when it runs sharded over the mesh). Static
settings are bound with `functools.partial` before `jax.jit`. Keys come from
`fold_in(base_key, step)`, split by purpose, so a step does not depend on the device or
process count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.training.state import TrainState, ema_key

_QUARTILES = 4
# fold_in purposes beside the step's split (t, noise, dropout), which stays as it was.
# Not 0..2: with partitionable threefry (JAX's default) split(key, n)[i] IS
# fold_in(key, i), so purpose 1 drew the label-dropout mask from the noise key (the mask
# was a threshold of the noise); a purpose far above any split count cannot collide.
_LABEL_DROPOUT_PURPOSE = 1_000


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of a train step (hashable: bound before jit).

    Attributes:
      apply_fn: the Flax module's `apply`.
      optimizer: the optax transformation.
      lr_schedule: step -> learning rate (for the logged `lr`).
      ema_rates: EMA rates, updated inside the step.
      num_microbatches: gradient accumulation: the global batch is split into this many
        microbatches whose mean gradient equals the whole batch's.
      num_timesteps: T of the training diffusion (per-quartile metrics).
      label_dropout: classifier-free guidance: the probability of replacing each label
        by `null_label` (0 = off).
      null_label: the null class (`models.null_label`), or None without one.
      ema_warmup: use rate min(r, (1 + step) / (10 + step)) at each step instead of r,
        so early EMA copies do not keep the random initialisation (short runs; the
        paper's code has no warm-up: off by default).
      fsdp: with sharded parameters, `parallel.FsdpGather`: the forward and backward
        compute with whole parameters and the gradients go back to the state's layout
        (None: parameters replicated, nothing to gather).
    """

    apply_fn: Callable
    optimizer: Any
    lr_schedule: Callable
    ema_rates: tuple[float, ...]
    num_microbatches: int
    num_timesteps: int
    label_dropout: float = 0.0
    null_label: int | None = None
    ema_warmup: bool = False
    fsdp: Any = None

    def __post_init__(self):
        if self.label_dropout > 0 and self.null_label is None:
            raise ValueError(
                f"training.label_dropout={self.label_dropout} needs a model with a null "
                "class (a class-conditional model built with the same label_dropout)."
            )


def _split_micro(tree: Any, k: int) -> Any:
    # [B, ...] -> [k, B/k, ...] with microbatch j = rows j, j+k, ...: each device's
    # contiguous block of the sharded batch then holds B/(D k) rows of every
    # microbatch, so the split needs no data movement.
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def _merge_micro(tree: Any) -> Any:
    # Inverse of _split_micro: [k, B/k, ...] -> [B, ...] in the original order.
    def merge(x):
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    return jax.tree.map(merge, tree)


def quartile_means(values: jax.Array, t: jax.Array, num_timesteps: int, name: str) -> dict:
    """Means of per-example `values` per quarter of the timestep range ({name}_q0..q3).

    A quarter with no example in the batch reports 0 (its count is 0).
    """
    q = jnp.clip(t * _QUARTILES // num_timesteps, 0, _QUARTILES - 1)
    out = {}
    for i in range(_QUARTILES):
        mask = (q == i).astype(jnp.float32)
        out[f"{name}_q{i}"] = jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return out


def _accumulate_grads(loss_fn, params, micro_inputs, k: int, fsdp=None):
    """Mean loss and gradient over k microbatches (lax.scan), plus per-example aux.

    loss_fn(params, inputs, j) -> (scalar mean loss over the microbatch, aux of [b] arrays).
    With `fsdp` (a `parallel.FsdpGather`) the microbatches see whole parameters and each
    microbatch's gradient goes back to the state's sharded layout before it is summed
    (a reduce-scatter a microbatch; the running sum stays sharded).
    """
    scatter = (lambda tree: tree) if fsdp is None else fsdp.scatter
    whole = params if fsdp is None else fsdp.gather(params)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        inputs = jax.tree.map(lambda x: x[0], micro_inputs)
        (loss, aux), grads = grad_fn(whole, inputs, 0)
        return loss, scatter(grads), jax.tree.map(lambda x: x[None], aux)

    def body(carry, xs):
        loss_sum, grad_sum = carry
        j, inputs = xs
        (loss, aux), grads = grad_fn(whole, inputs, j)
        grad_sum = jax.tree.map(jnp.add, grad_sum, scatter(grads))
        return (loss_sum + loss, grad_sum), aux

    zeros = scatter(jax.tree.map(jnp.zeros_like, params))
    (loss_sum, grad_sum), aux = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(k), micro_inputs)
    )
    return loss_sum / k, jax.tree.map(lambda g: g / k, grad_sum), aux


def ema_rate_at(rate: float, step, warmup: bool):
    """The EMA rate of the update at `step` (0-based): `rate`, or with warm-up
    min(rate, (1 + step) / (10 + step))."""
    if not warmup:
        return rate
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(rate, (1.0 + step) / (10.0 + step))


def _apply_update(state: TrainState, grads, loss, settings: StepSettings, sampler_state):
    """The optimiser + EMA update, skipped (state kept) when loss or gradient is not finite."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = settings.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = {}
    for r in settings.ema_rates:
        decay = ema_rate_at(r, state.step, settings.ema_warmup)
        ema[ema_key(r)] = jax.tree.map(
            lambda e, p, d=decay: e * d + p * (1.0 - d), state.ema[ema_key(r)], params
        )

    def keep_if_finite(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        ema=keep_if_finite(ema, state.ema),
        sampler=keep_if_finite(sampler_state, state.sampler),
        nonfinite=jnp.stack(
            [state.nonfinite[0] + skipped, (state.nonfinite[1] + skipped) * skipped]
        ),
    )
    metrics = {
        "grad_norm": grad_norm,
        "lr": jnp.asarray(settings.lr_schedule(state.step), jnp.float32),
        "nonfinite_steps": new_state.nonfinite[0].astype(jnp.float32),
    }
    return new_state, metrics


def drop_labels(labels: jax.Array, rng: jax.Array, rate: float, null_label: int) -> jax.Array:
    """Replaces each label by `null_label` with probability `rate` (independently).

    The draw is over the global batch from one key, so it does not depend on how the
    batch is sharded (partitionable threefry) or split into microbatches.

    Args:
      labels: int [B] class labels.
      rng: a typed key.
      rate: the probability in [0, 1).
      null_label: the null class index.

    Returns:
      int [B] labels.
    """
    drop = jax.random.bernoulli(rng, rate, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def diffusion_train_step(
    state: TrainState, batch: dict, *, settings: StepSettings, diffusion, sampler
) -> tuple[TrainState, dict]:
    """One update of a diffusion model (or upsampler) on a global batch.

    t is drawn for the whole batch by the timestep sampler, which also gives the
    importance weights the per-example losses are multiplied by (ones for 'uniform');
    the sampler's loss history is updated with the unweighted per-example losses, as
    the paper code does. With `settings.label_dropout` each label is replaced by the
    null class with that probability (classifier-free guidance), keyed from the step.

    Args:
      state: the train state.
      batch: {'image' [B, H, W, C] in [-1, 1], optional 'label' [B], 'low_res'}.
      settings: static step settings.
      diffusion: the training `Diffusion` (hashable, static).
      sampler: the timestep sampler spec (static).

    Returns:
      (new state, metrics: loss, mse[, vb], their per-quartile means, grad_norm, lr,
      nonfinite_steps[, null_labels: the share of labels dropped to the null class]).
    """
    step_rng = jax.random.fold_in(state.base_key, state.step)
    t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
    x = batch["image"]
    t, weights = sampler.sample(state.sampler, t_rng, x.shape[0])
    noise = jax.random.normal(noise_rng, x.shape, x.dtype)
    k = settings.num_microbatches
    kwargs = {arg: batch[k] for k, arg in (("label", "y"), ("low_res", "low_res")) if k in batch}
    if settings.label_dropout > 0:
        label_rng = jax.random.fold_in(step_rng, _LABEL_DROPOUT_PURPOSE)
        kwargs["y"] = drop_labels(
            kwargs["y"], label_rng, settings.label_dropout, settings.null_label
        )
    inputs = {"x": x, "t": t, "w": weights, "noise": noise, "kwargs": kwargs}

    def loss_fn(params, mb, j):
        drng = jax.random.fold_in(dropout_rng, j)

        def model_fn(x_t, t_model, **kw):
            return settings.apply_fn(
                {"params": params}, x_t, t_model, train=True, rngs={"dropout": drng}, **kw
            )

        terms = diffusion.training_losses(
            model_fn, mb["x"], mb["t"], noise=mb["noise"], model_kwargs=mb["kwargs"]
        )
        return jnp.mean(terms["loss"] * mb["w"]), terms

    loss, grads, terms = _accumulate_grads(
        loss_fn, state.params, _split_micro(inputs, k), k, settings.fsdp
    )
    terms = _merge_micro(terms)
    sampler_state = sampler.update(state.sampler, t, terms["loss"])
    new_state, metrics = _apply_update(state, grads, loss, settings, sampler_state)
    metrics["loss"] = loss
    if settings.label_dropout > 0:  # the share of the batch trained as unconditional
        metrics["null_labels"] = jnp.mean((kwargs["y"] == settings.null_label).astype(jnp.float32))
    for name, values in terms.items():
        weighted = values * weights
        if name != "loss":
            metrics[name] = jnp.mean(weighted)
        metrics.update(quartile_means(weighted, t, settings.num_timesteps, name))
    return new_state, metrics


def classifier_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example cross-entropy, top-1 and top-5 accuracy ([B] each)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]  # [B, 5]
    hits = top == labels[:, None]
    return {
        "loss": loss,
        "acc@1": hits[:, 0].astype(jnp.float32),
        "acc@5": jnp.any(hits, axis=-1).astype(jnp.float32),
    }


def _noised_inputs(diffusion, x, rng, noised: bool):
    """The paper's classifier inputs: q_sample(x, t) at uniformly drawn t (or t = 0, clean)."""
    t_rng, noise_rng = jax.random.split(rng)
    if not noised:
        return x, jnp.zeros((x.shape[0],), jnp.int32)
    t = jax.random.randint(t_rng, (x.shape[0],), 0, diffusion.num_timesteps, jnp.int32)
    return diffusion.q_sample(x, t, jax.random.normal(noise_rng, x.shape, x.dtype)), t


def classifier_train_step(
    state: TrainState, batch: dict, *, settings: StepSettings, diffusion, noised: bool
) -> tuple[TrainState, dict]:
    """One update of the noise-aware classifier (the paper code's classifier_train.py).

    Inputs are noised with q_sample at uniformly drawn t (the model sees the original
    timestep index); the loss is the mean cross-entropy over the global batch.

    Returns:
      (new state, metrics: loss, acc@1, acc@5 and their per-quartile means, grad_norm,
      lr, nonfinite_steps).
    """
    step_rng = jax.random.fold_in(state.base_key, state.step)
    input_rng, dropout_rng = jax.random.split(step_rng)
    x, t = _noised_inputs(diffusion, batch["image"], input_rng, noised)
    t_model = diffusion.model_timesteps(t)
    k = settings.num_microbatches
    inputs = {"x": x, "t": t_model, "y": batch["label"]}

    def loss_fn(params, mb, j):
        logits = settings.apply_fn(
            {"params": params},
            mb["x"],
            mb["t"],
            train=True,
            rngs={"dropout": jax.random.fold_in(dropout_rng, j)},
        )
        terms = classifier_terms(logits, mb["y"])
        return jnp.mean(terms["loss"]), terms

    loss, grads, terms = _accumulate_grads(
        loss_fn, state.params, _split_micro(inputs, k), k, settings.fsdp
    )
    terms = _merge_micro(terms)
    new_state, metrics = _apply_update(state, grads, loss, settings, state.sampler)
    for name, values in terms.items():
        metrics[name] = jnp.mean(values)
        metrics.update(quartile_means(values, t, settings.num_timesteps, name))
    return new_state, metrics


def classifier_eval_step(
    params: Any, batch: dict, rng: jax.Array, *, apply_fn: Callable, diffusion, noised: bool
) -> dict[str, jax.Array]:
    """Per-example held-out terms (loss, acc@1, acc@5) and t, with the model in eval mode."""
    x, t = _noised_inputs(diffusion, batch["image"], rng, noised)
    logits = apply_fn({"params": params}, x, diffusion.model_timesteps(t), train=False)
    return {**classifier_terms(logits, batch["label"]), "t": t}
