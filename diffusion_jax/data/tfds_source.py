"""Prepared TensorFlow Datasets read by random access (`tfds.data_source`).

Random access (ArrayRecord files) gives a seeded full shuffle per epoch, exact resume
from an integer position and per-host sharding by index, with no TF graph. Images are
read as their stored encoded bytes and decoded with PIL, so preprocessing follows the
paper code's PIL path exactly. tensorflow_datasets is imported only here, lazily.

Data is prepared with `python -m launch.prepare_data` (see `prepare.py`); the errors
below print that command, filled in with the data_dir tfds looked in.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from diffusion_jax.data.prepare import (
    convert_command,
    data_dir_root,
    default_converted_dir,
    is_prepared,
    open_builder,
    prepare_command,
    prepare_hint,
)
from diffusion_jax.data.preprocessing import decode_image


def _open_data_source(name: str, split: str, data_dir: str | None) -> tuple[Any, Any]:
    import tensorflow_datasets as tfds

    not_found = (
        f"config.data.dataset={name!r} is neither 'mnist_5k', 'folder' nor a tfds dataset name"
    )
    builder = open_builder(name, data_dir, not_found=not_found)
    try:
        decoders = {"image": tfds.decode.SkipDecoding()}
        source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders=decoders
        )
    except Exception as e:
        root = str(data_dir_root(builder))
        if not is_prepared(builder):
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared: tfds looked in {builder.data_dir} "
                f"(config.data.data_dir={data_dir!r}; None means tfds' default, "
                f"$TFDS_DATA_DIR or ~/tensorflow_datasets). To prepare it, "
                f"{prepare_hint(name, root)}"
            ) from e
        file_format = getattr(builder.info.file_format, "value", None)
        if file_format != "array_record":  # tfds has no random access to other formats
            target = default_converted_dir(root)
            if file_format == "tfrecord":
                how = (
                    "Convert it (reads the TFRecord files, downloads nothing, leaves them "
                    f"as they are): `{convert_command(name, root, target)}`"
                )
            else:
                how = f"Prepare it again elsewhere: `{prepare_command(name, target)}`"
            raise ValueError(
                f"tfds dataset {name!r} at {builder.data_dir} was prepared as {file_format}, "
                "which has no random access; this pipeline needs ArrayRecord files. "
                f"{how}, then set config.data.data_dir={target!r}."
            ) from e
        raise
    return builder, source


class TfdsSource:
    """Random-access tfds split: `source[i]` -> (RGB PIL image, label or -1).

    Attributes:
      name: the tfds name; `InputPipeline(preprocessing='auto')` picks the paper's LSUN
        route for 'lsun/<category>' by it.
      num_classes: label count (0 when not class-conditional).
    """

    def __init__(
        self, name: str, *, split: str = "train", data_dir: str | None = None, class_cond=False
    ):
        """Opens a prepared tfds split (slicing syntax such as 'train[:10%]' works) in
        `data_dir` (None = tfds' default); `class_cond` reads the 'label' feature.

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
