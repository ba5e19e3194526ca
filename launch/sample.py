"""Draws samples from a diffusion model (or upsampler) into a `.npz` in the paper's layout.

  python -m launch.sample --config=configs/imagenet128.py --checkpoint=ckpt/imagenet128 \
    --classifier_checkpoint=ckpt/classifier128 --output=samples/imagenet128.npz
  python -m launch.sample --config=configs/upsample64_256.py --checkpoint=ckpt/up64_256 \
    --base_samples=samples/imagenet64.npz --output=samples/imagenet256_stack.npz

Settings come from `config.sampling` (num_samples, global batch_size, method ('ancestral',
'ddim', 'dpm_solver++'), timestep respacing (= the steps), eta, classifier_scale,
cfg_scale, use_ema, labels) and `config.seed`, e.g.
`--config=configs/imagenet128.py:ddim25` or `--config.sampling.num_samples=1000`.
`--checkpoint` is a convert_checkpoint directory or a training workdir. The job runs
over every device of every process (several processes: add --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on each); re-running a killed job with the same command
continues it. Writes OUTPUT (arr_0 uint8 images, arr_1 labels) and a PNG grid beside it.
"""

from absl import flags, logging

from launch import common, distributed

_CONFIG = common.define_config_flag("Config of the model to sample from.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "convert_checkpoint directory or training workdir."
)
_CLASSIFIER = flags.DEFINE_string(
    "classifier_checkpoint", None, "Guidance classifier (default: sampling.classifier_checkpoint)."
)
_BASE_SAMPLES = flags.DEFINE_string(
    "base_samples", None, "Upsamplers: a base job's .npz (low-resolution inputs and labels)."
)
_OUTPUT = flags.DEFINE_string("output", None, "The .npz to write.")
flags.mark_flags_as_required(["checkpoint", "output"])


def main(argv: list[str]) -> None:
    distributed.initialize()  # before any jax computation
    import jax

    jax.devices()  # start the backends quietly: a bad input's error stays the only line
    logging.set_verbosity(logging.INFO)  # progress: images/s and ETA
    from diffusion_jax import sampling

    out = sampling.run_sampling_job(
        _CONFIG.value,
        _CHECKPOINT.value,
        _OUTPUT.value,
        classifier_checkpoint=_CLASSIFIER.value,
        base_samples=_BASE_SAMPLES.value,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run_main(main)
