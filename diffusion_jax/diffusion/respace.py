"""Timestep respacing: running a trained T-step process with fewer steps.

A respaced process keeps a subset of the original timesteps and recomputes betas so
that its alpha_bar at every kept step equals the original one. The model was trained
on the original indices, so the respaced process keeps a map from its own indices
back to them (`timestep_map`).
"""

import numpy as np


def parse_respacing(timestep_respacing, num_steps: int):
    """('ddim', N) or ('sections', counts) for an accepted respacing spelling.

    timestep_respacing: '' / None / 0 / '0' (keep all num_steps), an int or a digit
    string (one section), a comma-separated string or a tuple of ints (section counts),
    or 'ddimN' (DDIM's fixed integer stride); anything else raises ValueError.
    """
    spec = timestep_respacing
    keep_all = spec is None or (isinstance(spec, str) and spec.strip() in ("", "0"))
    if keep_all or (isinstance(spec, int | np.integer) and spec == 0):
        return "sections", (num_steps,)
    if isinstance(spec, bool):
        raise ValueError(f"timestep_respacing must not be a bool, got {spec!r}")
    if isinstance(spec, int | np.integer):
        return "sections", (int(spec),)
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if text.startswith("ddim"):
                return "ddim", int(text[len("ddim") :])
            return "sections", tuple(int(part) for part in text.split(","))
        except ValueError:
            pass
    elif isinstance(spec, tuple | list) and all(
        isinstance(c, int | np.integer) and not isinstance(c, bool) for c in spec
    ):
        return "sections", tuple(int(c) for c in spec)
    raise ValueError(
        f"timestep_respacing={spec!r} is not understood; use an int such as 250, "
        "section counts such as '10,15,20', or 'ddim25'"
    )


def space_timesteps(num_steps: int, timestep_respacing) -> list[int]:
    """Selects which original timesteps a respaced process keeps.

    With section counts, the original steps are cut into len(counts) nearly equal
    sections (the first `num_steps % len(counts)` one step longer) and section i keeps
    counts[i] steps evenly strided over it, both ends included, rounding positions to
    the nearest integer as the paper code does. With 'ddimN' the smallest integer
    stride giving exactly N steps from 0 is used.

    Returns the sorted kept original indices (timestep_respacing: see `parse_respacing`).

    Raises:
      ValueError: naming timestep_respacing when it asks for more steps than exist,
        for a section that cannot hold its count, or for a DDIM count that no integer
        stride produces.
    """
    kind, value = parse_respacing(timestep_respacing, num_steps)
    if kind == "ddim":
        count = value
        if not 1 <= count <= num_steps:
            raise ValueError(
                f"timestep_respacing='ddim{count}' asks for {count} steps but the process "
                f"has steps={num_steps}; use a count between 1 and {num_steps}"
            )
        for stride in range(1, num_steps):
            kept = range(0, num_steps, stride)
            if len(kept) == count:
                return list(kept)
        raise ValueError(
            f"timestep_respacing='ddim{count}': cannot create exactly {count} steps with "
            f"an integer stride from steps={num_steps}; pick a count of the form "
            f"ceil({num_steps}/k) or use plain section counts such as '{count}'"
        )

    counts = value
    if any(c < 1 for c in counts):
        raise ValueError(
            f"timestep_respacing={timestep_respacing!r}: every section count must be >= 1"
        )
    if sum(counts) > num_steps:
        raise ValueError(
            f"timestep_respacing={timestep_respacing!r} asks for {sum(counts)} steps but "
            f"the process has steps={num_steps}"
        )
    base, extra = divmod(num_steps, len(counts))
    start = 0
    kept = []
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"timestep_respacing={timestep_respacing!r}: section {i} spans {size} of "
                f"the {num_steps} steps and cannot hold {count} steps; lower that count "
                "or use fewer sections"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Positions accumulate in float and are rounded half-to-even, exactly as the
        # paper code, so the kept indices (and thus samples) match it bit for bit.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respace_betas(alphas_cumprod: np.ndarray, kept: list[int]) -> np.ndarray:
    """float64 betas of the process visiting only the sorted `kept` timesteps: their
    cumulative product reproduces the original process's alphas_cumprod[kept]."""
    kept_ac = alphas_cumprod[np.asarray(kept)]
    previous = np.concatenate([[1.0], kept_ac[:-1]])
    return 1.0 - kept_ac / previous
