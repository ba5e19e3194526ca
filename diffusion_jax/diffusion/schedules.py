"""Beta schedules of the forward process, computed in float64 numpy.

The two named schedules are the paper code's: Ho et al.'s linear schedule stretched to
any number of steps, and Nichol & Dhariwal's cosine schedule discretised from its
alpha_bar(t) curve.
"""

import math
from collections.abc import Callable

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine")

# Betas at or above 1 make alpha_bar reach 0 and the posterior blow up; the paper code
# caps the cosine schedule's last betas here.
_MAX_BETA = 0.999


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"steps must be a positive int, got {num_steps!r}")
    if num_steps < 2:
        raise ValueError(
            f"steps must be at least 2 (the posterior at t=0 needs a step after it), "
            f"got {num_steps}"
        )
    return int(num_steps)


def betas_for_alpha_bar(
    num_steps: int, alpha_bar: Callable[[np.ndarray], np.ndarray], max_beta: float = _MAX_BETA
) -> np.ndarray:
    """Discretises a vectorised alpha_bar(t), t in [0, 1], into float64 [T] betas,
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)."""
    num_steps = _check_steps(num_steps)
    i = np.arange(num_steps, dtype=np.float64)
    ratio = alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps)
    return np.minimum(1.0 - ratio, max_beta)


def _cosine_alpha_bar(t: np.ndarray) -> np.ndarray:
    # The 0.008 offset keeps beta_0 from being vanishingly small (Nichol & Dhariwal).
    return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """float64 [T] betas in (0, 1) of the schedule 'linear' or 'cosine', T = num_steps >= 2.

    Raises:
      ValueError: if the name is unknown or num_steps is not an int >= 2.
    """
    num_steps = _check_steps(num_steps)
    if name == "linear":
        # Ho et al.'s 1000-step endpoints, rescaled so that any T gives a similar
        # alpha_bar curve.
        scale = 1000.0 / num_steps
        if scale * 0.02 >= 1.0:
            # beta = 1 makes alpha_bar 0 and every later coefficient infinite.
            raise ValueError(
                f"noise_schedule='linear' with steps={num_steps} reaches beta >= 1 (its "
                "last beta is 20/steps); use steps > 20 or noise_schedule='cosine'"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, _cosine_alpha_bar)
    raise ValueError(
        f"noise_schedule: unknown beta schedule {name!r}; expected one of {NOISE_SCHEDULES}"
    )
