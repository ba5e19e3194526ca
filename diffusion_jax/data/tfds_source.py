"""Prepared TensorFlow Datasets read by random access (`tfds.data_source`).

Random access (ArrayRecord files) gives a seeded full shuffle per epoch, exact resume
from an integer position and per-host sharding by index, with no TF graph. Images are
read as their stored encoded bytes and decoded with PIL, so preprocessing follows the
paper code's PIL path exactly. tensorflow_datasets is imported only here, lazily.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffusion_jax.data.preprocessing import decode_image

# How to prepare each dataset the paper uses (all as ArrayRecord, for random access).
PREPARE_HINTS = {
    "imagenet2012": (
        "ImageNet is a manual download: get ILSVRC2012_img_train.tar and "
        "ILSVRC2012_img_val.tar from image-net.org into MANUAL_DIR, then run "
        "`tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR "
        "--file_format=array_record`."
    ),
    "lsun": (
        "run `tfds build {name} --data_dir=DATA_DIR --file_format=array_record` (downloads "
        "the LSUN archive)."
    ),
    "downsampled_imagenet": (
        "run `tfds build {name} --data_dir=DATA_DIR --file_format=array_record`."
    ),
}


def prepare_hint(name: str) -> str:
    """Returns the command line that prepares tfds dataset `name` for this pipeline."""
    family = name.split("/")[0]
    default = "run `tfds build {name} --data_dir=DATA_DIR --file_format=array_record`."
    return PREPARE_HINTS.get(family, default).format(name=name)


def _open_data_source(name: str, split: str, data_dir: str | None) -> tuple[Any, Any]:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"config.data.dataset={name!r} is neither 'mnist_5k', 'folder' nor a tfds dataset "
            "name (e.g. 'imagenet2012', 'lsun/bedroom', 'downsampled_imagenet/64x64')."
        ) from e
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    except Exception as e:
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared: tfds looked in {builder.data_dir} "
                f"(config.data.data_dir={data_dir!r}; None means tfds' default, "
                f"$TFDS_DATA_DIR or ~/tensorflow_datasets). To prepare it, {prepare_hint(name)}"
            ) from e
        if isinstance(e, NotImplementedError):
            raise ValueError(
                f"tfds dataset {name!r} at {builder.data_dir} was prepared as "
                f"{builder.info.file_format}, which has no random access; this pipeline "
                f"needs ArrayRecord files. Re-prepare it: {prepare_hint(name)}"
            ) from e
        raise
    return builder, source


class TfdsSource:
    """Random-access tfds split: `source[i]` -> (RGB PIL image, label or -1)."""

    def __init__(
        self, name: str, *, split: str = "train", data_dir: str | None = None, class_cond=False
    ):
        """Opens a prepared tfds split.

        Args:
          name: tfds name, e.g. 'imagenet2012', 'lsun/bedroom',
            'downsampled_imagenet/64x64'.
          split: tfds split (slicing syntax such as 'train[:10%]' works).
          data_dir: where the prepared data lives; None = tfds' default.
          class_cond: read the 'label' feature.

        Raises:
          FileNotFoundError: if the dataset is not prepared (names where tfds looked).
          ValueError: if the data lacks random access or a needed feature.
        """
        builder, self._source = _open_data_source(name, split, data_dir)
        features = builder.info.features
        self.name = name
        if "image" not in features:
            raise ValueError(f"tfds dataset {name!r} has no 'image' feature: {features}.")
        self.num_classes = 0
        if class_cond:
            if "label" not in features:
                raise ValueError(
                    f"config.data.class_cond=True but tfds dataset {name!r} has no 'label' "
                    "feature; set class_cond=False (LSUN categories are unconditional)."
                )
            self.num_classes = int(features["label"].num_classes)
        self._class_cond = class_cond

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """Reads and decodes one record.

        Raises:
          UnreadableImageError: if the stored image bytes are corrupt.
        """
        record = self._source[index]
        label = int(record["label"]) if self._class_cond else -1
        return decode_image(bytes(record["image"]), f"{self.name}[{index}]"), label
