"""Writes a reference batch in the paper's format for your own images.

  python -m launch.make_reference --images=DIR_OR_TFDS --output=REF.npz --image_size=256

The output holds `arr_0` (the images, center-cropped as the paper's preprocessing) and the
FID statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial), so
`launch.evaluate REF.npz SAMPLES.npz` works with it exactly as with the paper's batches.
An existing output is kept unless `--overwrite`, which replaces it atomically (a run killed
while writing keeps the old file); two runs writing one output are refused (a lock file
beside it). Unreadable images are skipped and counted.
"""

import itertools

from absl import flags
from etils import epath

from diffusion_jax import data, evaluation, locks
from launch import common

_IMAGES = flags.DEFINE_string(
    "images", None, "An image directory, a tfds name (e.g. 'lsun/bedroom') or 'mnist_5k'."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the reference .npz.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output file.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Side of the center-cropped images.", lower_bound=1)
_NUM = flags.DEFINE_integer(
    "num_images", None, "Use at most this many images (default all).", lower_bound=2
)
_SPLIT = flags.DEFINE_string("split", "train", "Dataset split (tfds sources).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory.")
_WEIGHTS = flags.DEFINE_string(
    "inception_weights",
    None,
    "pt_inception-2015-12-05-6726825d.pth or a converted .npz; default: cached/downloaded.",
)
_PREPROCESSING = flags.DEFINE_enum(
    "preprocessing",
    "auto",
    ["auto", "standard", "lsun"],
    "Crop route: 'auto' (LSUN's for lsun/* tfds names, else the ImageNet loader's); 'lsun' "
    "for a folder of raw LSUN images.",
)
_BATCH = flags.DEFINE_integer(
    "batch_size", 256, "Global batch size of the Inception pass.", lower_bound=1
)
flags.mark_flags_as_required(["images", "output"])


def main(argv: list[str]) -> None:
    output = epath.Path(_OUTPUT.value)
    if output.exists() and not _OVERWRITE.value:
        raise FileExistsError(f"{_OUTPUT.value} exists; pass --overwrite to replace it.")
    lock = locks.workdir_lock(output.parent, job="make_reference", name=f".{output.name}.lock")
    with lock:
        write(output)


def write(output: epath.Path) -> None:
    batches = data.iterate_uint8_images(
        _IMAGES.value,
        _SIZE.value,
        data_dir=_DATA_DIR.value,
        split=_SPLIT.value,
        batch_size=_BATCH.value,
        limit=_NUM.value,
        preprocessing=_PREPROCESSING.value,
    )
    # The first batch opens the source, so a bad --images fails before the weights load.
    first = list(itertools.islice(batches, 1))
    count = len(first[0]) if first else 0
    if count < 2 and count < _BATCH.value:  # the source ended: refused before the weights
        raise ValueError(
            f"--images={_IMAGES.value} holds {count} readable image(s); a reference batch "
            "needs at least 2 (FID needs a covariance)."
        )
    inception_model = evaluation.load_inception(_WEIGHTS.value)
    n = evaluation.write_reference_batch(
        itertools.chain(first, batches),
        output,
        inception_model,
        batch_size=_BATCH.value,
        num_images=_NUM.value,
    )
    s = "" if batches.skipped == 1 else "s"
    skipped = f" ({batches.skipped} unreadable image{s} skipped)" if batches.skipped else ""
    print(f"Wrote a reference batch of {n} images to {_OUTPUT.value}{skipped}")


if __name__ == "__main__":
    common.run_main(main)
