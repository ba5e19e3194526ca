"""Prepares a tfds dataset as ArrayRecord files, the format the training pipeline reads.

  # Download and prepare (ImageNet: the two ILSVRC2012 tars in MANUAL_DIR first):
  python -m launch.prepare_data --dataset=imagenet2012 --manual_dir=MANUAL_DIR \
      --data_dir=DATA_DIR
  python -m launch.prepare_data --dataset=lsun/bedroom --data_dir=DATA_DIR
  # Convert data already prepared as TFRecord in OLD_DIR (no download; OLD_DIR unchanged):
  python -m launch.prepare_data --dataset=imagenet2012 --convert_existing=OLD_DIR \
      --data_dir=DATA_DIR

Then train with `--config.data.data_dir=DATA_DIR`. Uses the tfds Python API, so it
works where `tfds build` fails (tfds 4.9.10's command line needs apache_beam). An unknown
name, missing manual downloads or no network is one line saying what to put where.
"""

from absl import app, flags, logging

from diffusion_jax import data
from launch import common

_DATASET = flags.DEFINE_string(
    "dataset", None, "tfds name, e.g. 'imagenet2012', 'lsun/bedroom', 'lsun/cat'."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Where the ArrayRecord data goes (use it as config.data.data_dir); default: tfds' "
    "default ($TFDS_DATA_DIR or ~/tensorflow_datasets). Required with --convert_existing.",
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder of manually downloaded archives (ImageNet's ILSVRC2012 tars)."
)
_CONVERT_EXISTING = flags.DEFINE_string(
    "convert_existing",
    None,
    "A data_dir holding the dataset prepared as TFRecord: copy it into ArrayRecord files "
    "under --data_dir instead of downloading. The source is only read.",
)
flags.mark_flag_as_required("dataset")


def main(argv: list[str]) -> None:
    if _CONVERT_EXISTING.value is not None:
        if _DATA_DIR.value is None:
            raise app.UsageError("--convert_existing needs --data_dir, the new data_dir.")
        if _MANUAL_DIR.value is not None:
            raise app.UsageError("--manual_dir is only for downloads; drop it to convert.")
        path = data.convert_to_array_record(
            _DATASET.value, _CONVERT_EXISTING.value, _DATA_DIR.value
        )
    else:
        path = data.prepare_tfds_dataset(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)
    logging.info("%s is ready in %s", _DATASET.value, path)
    print(f"{_DATASET.value} is ready as ArrayRecord in {path}.")
    if _DATA_DIR.value is not None:
        print(f"Train with --config.data.data_dir={_DATA_DIR.value}")


if __name__ == "__main__":
    common.run_main(main)
