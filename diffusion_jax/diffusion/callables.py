"""User callables as compiled-program inputs: static structure, traced array leaves.

Loops take user callables (model_fn, cond_fn, denoised_fn). Plain functions become
static parts of the compiled program. Callables that are pytrees, such as
`jax.tree_util.Partial(model.apply, variables)` or the guidance function from
`classifier_cond_fn`, are split: their array leaves (parameters) are passed to the
program as arguments, so new weights or a new guidance scale do not recompile and
large parameters are never baked into the program as constants. The static part is a
hashable value: `jax.jit` (static argument) does the caching, so equal callables and
an equal `Diffusion` share one compiled program.
"""

from typing import Any

import jax
import numpy as np


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def split_callables(fns) -> tuple[Any, list]:
    """Splits a pytree (e.g. a tuple) of callables and None into (static_key, arrays).

    static_key identifies the compiled program (a jit static argument); arrays are the
    traced inputs. `merge_callables(static_key, arrays)` rebuilds `fns`.

    Raises:
      ValueError: if a callable (or a non-array argument bound in it) is unhashable.
    """
    leaves, treedef = jax.tree.flatten(fns)
    arrays = [leaf for leaf in leaves if _is_array(leaf)]
    statics = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
    mask = tuple(_is_array(leaf) for leaf in leaves)
    key = (treedef, mask, statics)
    try:
        hash(key)
    except TypeError as err:
        raise ValueError(
            "model_fn, cond_fn and denoised_fn must be hashable (module-level "
            "functions, jax.tree_util.Partial, or objects with __hash__) so the "
            f"compiled loop can be reused: {err}"
        ) from None
    return key, arrays


def merge_callables(static_key, arrays):
    """Inverse of `split_callables` (inside the traced program)."""
    treedef, mask, statics = static_key
    it = iter(arrays)
    leaves = [next(it) if is_array else static for is_array, static in zip(mask, statics)]
    return jax.tree.unflatten(treedef, leaves)


__all__ = ["merge_callables", "split_callables"]
