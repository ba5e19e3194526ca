"""Reproduces one of the paper's FID tables from the configs: samples, evaluates, compares.

  python -m launch.fid_table --table=imagenet256 --checkpoint_dir=released/ \
    --reference=VIRTUAL_imagenet256_labeled.npz --workdir=fid256

--table is imagenet64, imagenet128, imagenet256, imagenet512 or lsun. --checkpoint_dir
holds the released .pt files under their released names (converted once into
WORKDIR/converted/) or converted directories named by config. Prints our figures beside
the paper's as a markdown table, also written to WORKDIR/<table>.md and .csv. Re-running
continues: finished rows are kept, a half-finished row continues its sampling job; the
reference's Inception statistics are computed once (WORKDIR/reference.inception.npz).
--num_samples (and --steps) make quick runs, marked as not comparable.
"""

import functools

from absl import flags

from launch import common, distributed

_TABLE = flags.DEFINE_string(
    "table", None, "imagenet64 | imagenet128 | imagenet256 | imagenet512 | lsun"
)
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "Released .pt files / converted dirs."
)
_REFERENCE = flags.DEFINE_string("reference", None, "The reference batch (.npz).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Conversions, samples, results, the table.")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Samples per row (default 50,000).", lower_bound=1
)
_STEPS = flags.DEFINE_integer("steps", None, "Override every row's sampling steps.", lower_bound=2)
_ROWS = flags.DEFINE_list("rows", None, "Only these rows (their labels), e.g. ADM,ADM-G.")
_VARIANT = flags.DEFINE_string(
    "variant", None, "A config variant for every row ('tiny': smoke test)."
)
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Global sampling batch size override.", lower_bound=1
)
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "pt_inception .pth or converted .npz.")
_FEATURES = flags.DEFINE_string(
    "features", None, "Classifier checkpoint directory as the feature network (not Inception)."
)
flags.mark_flags_as_required(["table", "checkpoint_dir", "reference", "workdir"])


def main(argv: list[str]) -> None:
    distributed.initialize()  # before any jax computation
    from diffusion_jax import evaluation
    from diffusion_jax.jobs import fid_table, sweep

    # A bad --features directory is one error before any work; Inception loads lazily.
    features = _FEATURES.value and evaluation.load_classifier_features(_FEATURES.value)

    @functools.cache  # the reference's activations once for every row, cached in WORKDIR
    def evaluator(reference: str) -> evaluation.ReferenceEvaluator:
        return sweep.reference_evaluator(
            reference, _WORKDIR.value, _NUM_SAMPLES.value, features or None, _WEIGHTS.value
        )

    settings = fid_table.TableSettings(
        checkpoint_dir=_CHECKPOINT_DIR.value,
        reference=_REFERENCE.value,
        workdir=_WORKDIR.value,
        evaluate=lambda reference, samples: evaluator(reference)(samples),
        num_samples=_NUM_SAMPLES.value,
        steps=_STEPS.value,
        variant=_VARIANT.value,
        rows=tuple(_ROWS.value) if _ROWS.value else None,
        batch_size=_BATCH.value,
        feature_weights=_FEATURES.value or _WEIGHTS.value,
    )
    print(fid_table.run_table(_TABLE.value, settings), flush=True)


if __name__ == "__main__":
    common.run_main(main)
