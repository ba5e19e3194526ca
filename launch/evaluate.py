"""Evaluates a sample batch against a reference batch, printing what the paper's evaluator prints.

  python -m launch.evaluate REF.npz SAMPLE.npz [--inception_weights=PATH | --features=DIR]

REF.npz is a reference batch (e.g. the paper's VIRTUAL_imagenet256_labeled.npz, or one from
`launch.make_reference`); SAMPLE.npz holds `arr_0` uint8 NHWC samples. Like the paper's
evaluator it prints its progress ("computing reference batch activations...", ...,
"Computing evaluations...") and then the lines Inception Score, FID, sFID, Precision,
Recall. (There is no "warming up TensorFlow..." line: nothing is warmed up separately.)
Activations are cached beside both files. Numeric flags are checked before any work.
--features=DIR uses a classifier this project trained (a launch.train_classifier workdir or
converted directory) instead of Inception: its penultimate features for FID and
precision/recall, its softmax for the Inception Score; sFID is "not applicable".
"""

import functools

from absl import app, flags
from etils import epath

from diffusion_jax import evaluation
from launch import common

_WEIGHTS = flags.DEFINE_string(
    "inception_weights",
    None,
    "pt_inception-2015-12-05-6726825d.pth or a converted .npz; default: cached/downloaded.",
)
_FEATURES = flags.DEFINE_string(
    "features", None, "Classifier checkpoint directory as the feature network (not Inception)."
)
_BATCH = flags.DEFINE_integer(
    "batch_size", 256, "Global batch size of the Inception pass.", lower_bound=1
)
_SPLIT = flags.DEFINE_integer(
    "is_split_size", 5000, "Inception Score split size (5000 as in the paper).", lower_bound=1
)
_MISMATCH = flags.DEFINE_bool(
    "allow_resolution_mismatch", False, "Evaluate files with different image sizes anyway."
)
_DISTANCE = flags.DEFINE_enum(
    "pr_distance_dtype",
    "float16",
    ["float16", "float32"],
    "Precision/recall distance precision (float16 as the paper's evaluator).",
)
_CACHE = flags.DEFINE_bool("cache", True, "Cache activations beside the npz files.")


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise app.UsageError("usage: python -m launch.evaluate REF.npz SAMPLE.npz [flags]")
    for path in argv[1:]:  # before the Inception weights load (or download)
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist.")
    if _FEATURES.value and _WEIGHTS.value:
        raise ValueError("Pass --features or --inception_weights, not both.")
    if _FEATURES.value:
        inception_model = evaluation.load_classifier_features(_FEATURES.value)
    else:
        inception_model = evaluation.load_inception(_WEIGHTS.value)
    result = evaluation.evaluate_npz(
        argv[1],
        argv[2],
        inception_model,
        batch_size=_BATCH.value,
        split_size=_SPLIT.value,
        allow_resolution_mismatch=_MISMATCH.value,
        distance_dtype=_DISTANCE.value,
        cache=_CACHE.value,
        progress=functools.partial(print, flush=True),
    )
    for line in result.lines():
        print(line)


if __name__ == "__main__":
    common.run_main(main, positional=True)
