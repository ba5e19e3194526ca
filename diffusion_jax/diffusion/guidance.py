"""Classifier guidance: the gradient s * grad_x log p(y | x_t) from a noisy classifier."""

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
