"""Opens a dataset by name: the built-in `mnist_5k`, an image folder, or a tfds name."""

from __future__ import annotations

from typing import Protocol

from etils import epath
from PIL import Image

from diffusion_jax.data.builtin import MNIST_5K, Mnist5kSource
from diffusion_jax.data.folder import ImageFolderSource

FOLDER = "folder"


class ImageSource(Protocol):
    """Random-access dataset: `len(source)`, `source[i]` -> (RGB PIL image, label).

    The label is -1 when the source is not class-conditional. `source[i]` raises
    `UnreadableImageError` for a corrupt record; callers skip and count it.
    """

    num_classes: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


def open_source(
    dataset: str, *, data_dir: str | None = None, split: str = "train", class_cond: bool = False
) -> ImageSource:
    """Opens a random-access image source.

    Args:
      dataset: 'mnist_5k' (built in), 'folder' (images under `data_dir`) or a tfds
        name ('imagenet2012', 'lsun/bedroom', ...).
      data_dir: the folder for 'folder'; for tfds, where the prepared data lives
        (None = tfds' default). Ignored by 'mnist_5k'.
      split: dataset split ('train', 'test', tfds slices); ignored by folders.

    Raises:
      ValueError: for a bad combination (e.g. 'folder' without data_dir).
      FileNotFoundError: if the data is missing; the message says how to prepare it.
    """
    if not dataset:
        raise ValueError("config.data.dataset is empty; use 'mnist_5k', 'folder' or a tfds name.")
    if dataset == MNIST_5K:
        return Mnist5kSource(split)
    if dataset == FOLDER:
        if not data_dir:
            raise ValueError(
                "config.data.dataset='folder' needs config.data.data_dir, the image directory."
            )
        return ImageFolderSource(data_dir, class_cond=class_cond)
    from diffusion_jax.data.tfds_source import TfdsSource

    return TfdsSource(dataset, split=split, data_dir=data_dir, class_cond=class_cond)


def resolve_source(source: str, data_dir: str | None = None) -> tuple[str, str | None]:
    """Maps a free-form source (an existing image directory, a tfds name, 'mnist_5k') to
    `open_source`'s (dataset, data_dir); data_dir is kept for tfds names only.

    Raises:
      FileNotFoundError: if `source` is written as a path but is not a directory.
    """
    if source == MNIST_5K:
        return MNIST_5K, None
    path = epath.Path(source)
    if path.is_dir():
        return FOLDER, source
    # tfds names ('lsun/bedroom') contain slashes too; only explicit paths are paths.
    if source.startswith(("/", ".", "~")) or "://" in source:
        raise FileNotFoundError(
            f"source={source!r} looks like a path but is not a directory of images."
        )
    return source, data_dir
