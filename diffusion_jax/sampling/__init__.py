"""Sampling jobs over every device of every process: sharded, resumable, reproducible.

`ShardedSampler` draws global batches named by sample indices (sample i from
`fold_in(job_key, i)` alone); `run_sampling_job(config, ...)` is the resumable job
behind `launch.sample`. The jobs that drive many sampling jobs (the sweep, the FID
tables) are in `diffusion_jax.jobs`.
"""

from diffusion_jax.sampling.job import run_sampling_job
from diffusion_jax.sampling.sharded import SamplingProgram, ShardedSampler, to_uint8

__all__ = ["SamplingProgram", "ShardedSampler", "run_sampling_job", "to_uint8"]
