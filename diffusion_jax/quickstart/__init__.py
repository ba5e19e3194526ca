"""The embedded default job: the paper in miniature, end to end, in minutes on a CPU.

`run_quickstart(config, workdir)` (behind `python -m launch.quickstart`) trains a small
class-conditional diffusion model and a noise-aware classifier on `mnist_5k` through
the training library, samples with and without classifier guidance through the
sampling library, and reports bits/dim, classifier accuracy per t-quartile and how
often a separate clean classifier recognises the requested digit. It sits above
`training/`, `sampling/` and `evaluation/`.
"""

from diffusion_jax.quickstart.baseline import categorical_bpd, fit_categorical
from diffusion_jax.quickstart.job import PHASES, phase_config, run_quickstart

__all__ = ["PHASES", "categorical_bpd", "fit_categorical", "phase_config", "run_quickstart"]
