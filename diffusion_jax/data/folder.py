"""Image-folder dataset with the paper code's conventions.

Any directory tree of .jpg/.jpeg/.png/.gif files is a dataset. With class
conditioning, an image's class is its file name up to the first underscore
(`n01440764_10026.JPEG` -> `n01440764`), classes numbered in sorted order: the layout
the paper's `image_datasets.py` reads, so folders prepared for it work unchanged.
"""

from __future__ import annotations

from etils import epath
from PIL import Image

from diffusion_jax.data.preprocessing import decode_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def list_image_files(root: epath.PathLike) -> list[epath.Path]:
    """The files under directory `root` (any `etils.epath` filesystem) with one of the
    `IMAGE_EXTENSIONS` (any case), recursively, in sorted (deterministic) order."""
    root = epath.Path(root)
    files = []
    # Sorted per directory, depth first: the order the paper code lists files in, so
    # shards and the deterministic order match it.
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if "." in entry.name and entry.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            files.append(entry)
        elif entry.is_dir():
            files.extend(list_image_files(entry))
    return files


class ImageFolderSource:
    """Random-access image folder: `source[i]` -> (RGB PIL image, label or -1).

    Attributes:
      files: the image paths, in dataset order.
      labels: int class per file (-1 when not class-conditional).
      class_names: sorted class names (file-name prefixes); empty when unconditional.
    """

    def __init__(self, root: epath.PathLike, *, class_cond: bool = False):
        """Lists the folder; `class_cond` derives labels from file-name prefixes.

        Raises:
          FileNotFoundError: if `root` is not a directory or holds no images.
        """
        root = epath.Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"data_dir={str(root)!r} is not a directory. Point config.data.data_dir at a "
                "folder of .jpg/.jpeg/.png/.gif images (searched recursively)."
            )
        self.root = root
        self.files = list_image_files(root)
        if not self.files:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under data_dir={str(root)!r}."
            )
        if class_cond:
            prefixes = [f.name.split("_")[0] for f in self.files]
            self.class_names = sorted(set(prefixes))
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [index[p] for p in prefixes]
        else:
            self.class_names = []
            self.labels = [-1] * len(self.files)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unconditional)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """Reads and decodes one image.

        Raises:
          UnreadableImageError: if the file is corrupt or truncated.
        """
        path = self.files[index]
        return decode_image(path.read_bytes(), str(path)), self.labels[index]
