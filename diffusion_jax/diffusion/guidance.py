"""Guidance: classifier guidance (the paper) and classifier-free guidance (Ho & Salimans).

`classifier_cond_fn` gives the samplers' cond_fn, s * grad_x log p(y | x_t) from a
noise-aware classifier; `classifier_free_model_fn` wraps a model_fn trained with label
dropout into eps_u + s * (eps_c - eps_u). The two combine.
"""

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _classifier_gradient(classifier_apply, classifier_params, scale, x, t, y=None, **unused):
    del unused  # model_kwargs meant for the diffusion model (e.g. low_res)
    if y is None:
        raise ValueError(
            "the classifier guidance cond_fn needs the labels y to guide towards: pass "
            "cond_kwargs={'y': labels} to the sampling loop (or model_kwargs={'y': labels} "
            "for a class-conditional model)"
        )
    if jnp.shape(y) != (x.shape[0],):
        raise ValueError(
            f"y (the guidance labels) must have shape ({x.shape[0]},) to match x of shape "
            f"{x.shape}, got {jnp.shape(y)}"
        )

    def selected_log_prob(x_in):
        logits = classifier_apply(classifier_params, x_in, t)  # [B, num_classes]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(x_in.dtype, jnp.float32)))
        # Summing over the batch gives each example its own gradient, since example i's
        # log-probability depends only on x[i].
        return jnp.sum(jnp.take_along_axis(log_probs, y.reshape(-1, 1), axis=-1))

    gradient = jax.grad(selected_log_prob)(x)
    return gradient * jnp.asarray(scale).astype(gradient.dtype)


def classifier_cond_fn(classifier_apply: Callable, classifier_params, scale: float) -> Callable:
    """Builds the paper's guidance function from a noise-aware classifier.

    The result is a `jax.tree_util.Partial`: the samplers pass its parameters and scale
    to the compiled loop as arguments, so they are not baked in as constants and a new
    scale or new weights do not recompile. Build it once and reuse it.

    Args:
      classifier_apply: `classifier_apply(params, x, t)` -> logits [B, num_classes].
      classifier_params: the classifier's variables (a pytree of arrays).
      scale: the guidance scale s.

    Returns:
      `cond_fn(x, t, y, **unused)` -> s * grad_x log softmax(classifier(x, t))[y],
      shaped like x. The loops call it with their `cond_kwargs` (default:
      `model_kwargs`), which must hold the labels `y` [B]; other entries are
      ignored. Without `y` it raises a ValueError naming y.
    """
    if not callable(classifier_apply):
        raise ValueError(f"classifier_apply must be callable, got {type(classifier_apply)}")
    return jax.tree_util.Partial(
        _classifier_gradient, classifier_apply, classifier_params, jnp.asarray(scale, jnp.float32)
    )


def _classifier_free(model_fn, scale, null_label, x, t, y=None, **model_kwargs):
    if y is None:
        raise ValueError(
            "classifier-free guidance needs the labels y: pass model_kwargs={'y': labels}"
        )
    batch, channels = x.shape[0], x.shape[-1]
    if jnp.shape(y) != (batch,):
        raise ValueError(f"y must have shape ({batch},) to match x of shape {x.shape}")

    def twice(v):
        return jnp.concatenate([v, v], axis=0)

    t = jnp.broadcast_to(t, (batch,))
    null = jnp.full_like(y, null_label)
    # One call on the doubled batch [conditional | unconditional]: one program, the
    # model's batch dimension shared (sharded over the same devices).
    doubled = {k: twice(v) for k, v in model_kwargs.items()}
    out = model_fn(twice(x), twice(t), y=jnp.concatenate([y, null], axis=0), **doubled)
    out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
    cond, uncond = out[:batch], out[batch:]
    scale = jnp.asarray(scale).astype(out.dtype)
    # The mean channels only: the affine combination (weights 1 - s and s) is the same
    # whether they hold eps or x_0. Learned variances come from the conditional pass.
    eps = uncond[..., :channels] + scale * (cond[..., :channels] - uncond[..., :channels])
    return jnp.concatenate([eps, cond[..., channels:]], axis=-1)


def classifier_free_model_fn(model_fn: Callable, scale, null_label: int) -> Callable:
    """Classifier-free guidance: a model_fn every sampler takes (Ho & Salimans 2022).

    The result evaluates the conditional and the unconditional halves in ONE call of
    `model_fn` on a doubled batch: x and t concatenated twice, labels [y, null_label],
    and every other model input (e.g. low_res) duplicated along the batch. It returns
    eps_u + scale * (eps_c - eps_u) in the mean (eps) channels and, for learned-sigma
    models, the conditional pass's variance channels. scale = 1 is the plain
    conditional model, 0 the unconditional (null-label) one.

    A `jax.tree_util.Partial`: model_fn's parameters and the scale are traced inputs of
    the compiled loops, so a new scale does not recompile.

    `model_fn(x, t, y=labels, **model_kwargs)` must be a class-conditional model trained
    with label dropout (`training.label_dropout > 0`), so it knows the null class
    `null_label` (the model's num_classes; see `diffusion_jax.models.null_label`).
    """
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable, got {type(model_fn)}")
    if isinstance(null_label, bool) or not isinstance(null_label, numbers.Integral):
        raise ValueError(
            f"null_label must be the null class index (an int: the model's num_classes), "
            f"got {null_label!r}"
        )
    return jax.tree_util.Partial(
        _classifier_free, model_fn, jnp.asarray(scale, jnp.float32), int(null_label)
    )
