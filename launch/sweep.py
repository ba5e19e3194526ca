"""A guidance-scale x sampling-steps grid for one model: samples, evaluates, tabulates, plots.

  python -m launch.sweep --config=configs/imagenet128.py --checkpoint=ckpt/imagenet128 \
    --classifier_checkpoint=ckpt/classifier128 --reference=VIRTUAL_imagenet128_labeled.npz \
    --workdir=sweep128 --scales=0,0.5,1,2,4 --steps=25,250 --methods=ddim,ancestral

Each point (method, steps, scale) is a sampling job (launch.sample's, with
sampling.method, sampling.timestep_respacing and --scale_field set) evaluated against
--reference, whose Inception statistics are computed once and cached in WORKDIR. Writes
WORKDIR/sweep.md and .csv (FID, sFID, IS, precision, recall, samples file and seconds per
point) and the plots fid_vs_is.png, precision_recall.png, fid_vs_steps.png. Other sampling
settings come from the config (--config.sampling.num_samples=1000, ...). Re-running the
same command continues: finished points are kept, an unfinished one continues its job; a
changed grid extends the workdir, a changed config or checkpoint is refused.
"""

from absl import flags

from launch import common, distributed

_CONFIG = common.define_config_flag("Config of the model to sweep.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "convert_checkpoint directory or training workdir."
)
_REFERENCE = flags.DEFINE_string("reference", None, "The reference batch (.npz).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Samples, results, reference cache, table.")
_SCALES = common.define_list("scales", "Guidance scales, e.g. 0,1,4.", float)
_STEPS = common.define_list("steps", "Sampling steps, e.g. 25,50 (default: the config's).", int)
_METHODS = common.define_list(
    "methods", "Sampling methods, e.g. ddim,ancestral (default: the config's)."
)
_SCALE_FIELD = flags.DEFINE_enum(
    "scale_field",
    "classifier_scale",
    ["classifier_scale", "cfg_scale"],
    "The config.sampling field --scales sets.",
)
_CLASSIFIER = flags.DEFINE_string(
    "classifier_checkpoint", None, "Guidance classifier (default: sampling.classifier_checkpoint)."
)
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "pt_inception .pth or converted .npz.")
_FEATURES = flags.DEFINE_string(
    "features", None, "Classifier checkpoint directory as the feature network (not Inception)."
)
flags.mark_flags_as_required(["checkpoint", "reference", "workdir", "scales"])


def main(argv: list[str]) -> None:
    distributed.initialize()  # before any jax computation
    import jax

    jax.devices()  # start the backends quietly: a bad input's error stays the only line
    from diffusion_jax.jobs import sweep

    settings = sweep.SweepSettings(
        checkpoint=_CHECKPOINT.value,
        reference=_REFERENCE.value,
        workdir=_WORKDIR.value,
        scales=tuple(_SCALES.value),
        steps=tuple(_STEPS.value or ()),
        methods=tuple(_METHODS.value or ()),
        scale_field=_SCALE_FIELD.value,
        classifier_checkpoint=_CLASSIFIER.value,
        inception_weights=_WEIGHTS.value,
        features=_FEATURES.value,
    )
    result = sweep.run_sweep(_CONFIG.value, settings, progress=lambda s: print(s, flush=True))
    if jax.process_index() == 0:
        print(result.markdown, flush=True)


if __name__ == "__main__":
    common.run_main(main)
