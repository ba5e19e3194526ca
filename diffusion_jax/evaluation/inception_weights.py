"""Weights of the FID Inception: pytorch-fid's `.pth`, a converted `.npz`, cache, download.

The standard FID weights are TF's inception-2015-12-05 graph converted by pytorch-fid to
`pt_inception-2015-12-05-6726825d.pth` (a plain tensor state dict in torch's legacy
format). This module reads that file without torch (`diffusion_jax.checkpoints.torch_files`, which
admits nothing but tensors, as `torch.load(weights_only=True)`) or the same state dict
saved as `.npz`, recognises a file that is not these weights by its names before
converting anything, and maps the weights onto `InceptionV3FID`'s
parameter tree: conv weights OIHW -> HWIO, batch norm's weight/bias/running stats -> the
`scale`/`bias`/`mean`/`var` of each `ConvBN`, and the classifier weight transposed. The
classifier bias is not used: the paper's evaluator computes its softmax from the
`softmax/logits/MatMul` weight alone.
"""

from __future__ import annotations

import hashlib
import urllib.request
import zipfile

import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from diffusion_jax.checkpoints import torch_files
from diffusion_jax.evaluation import inception
from diffusion_jax.files import atomic_write

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
# torch.hub convention: the file name carries the first hex digits of its sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
DEFAULT_CACHE_DIR = "~/.cache/diffusion_jax"

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


# One name of each kind of layer the FID Inception has: a file holding none of them is
# something else (an image batch, another network's weights).
_SIGNATURE_NAMES = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight")


def _check_names(names: list[str], path: epath.Path) -> None:
    if not any(name in names for name in _SIGNATURE_NAMES):
        shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(
            f"{path} is not the FID Inception weights: it holds {shown or 'nothing'} "
            f"(an image batch?), not e.g. {_SIGNATURE_NAMES[0]}. Pass pytorch-fid's "
            f"{FID_WEIGHTS_FILENAME} or an .npz written by save_inception_npz."
        )


def read_state_dict(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """`{torch parameter name: float32 array}` (torch layout) of a pytorch-fid style state
    dict in a `.npz` or, any other name, a torch file; read without torch.

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: if the file cannot be read as a state dict, or holds none of the FID
        Inception's parameter names (checked before any array is read); one line
        naming the file.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Inception weights file {path} does not exist.")
    if path.suffix == ".npz":
        with path.open("rb") as f:
            try:
                data = np.load(f, allow_pickle=False)
                names = list(data.files)
            except (ValueError, OSError, EOFError, AttributeError, zipfile.BadZipFile) as e:
                raise ValueError(f"Cannot read Inception weights {path} as an .npz: {e}") from e
            with data:
                _check_names(names, path)
                try:
                    return {k: np.asarray(data[k], np.float32) for k in names}
                except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                    raise ValueError(f"Inception weights {path} are corrupt: {e}") from e
    state = torch_files.load_state_dict(path)
    _check_names(list(state), path)
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def save_inception_npz(state_dict_path: str | epath.PathLike, npz_path: str | epath.PathLike):
    """Converts pytorch-fid's `.pth` (or another `.npz`) to an `.npz` that loads without
    torch (same parameter names, torch layout)."""
    state = read_state_dict(state_dict_path)
    with atomic_write(npz_path, "wb") as f:
        np.savez(f, **state)


def _flax_path(torch_name: str) -> tuple[str, ...] | None:
    """Maps a torch parameter name to its path in `InceptionV3FID`'s params (None: unused)."""
    parts = torch_name.split(".")
    if len(parts) < 3 and parts != ["fc", "weight"] and parts != ["fc", "bias"]:
        return ("<unknown>", torch_name)
    if parts == ["fc", "weight"]:
        return ("fc_kernel",)
    if parts == ["fc", "bias"] or parts[-1] == "num_batches_tracked":
        return None
    *modules, layer, leaf = parts
    if layer == "conv" and leaf == "weight":
        return (*modules, "kernel")
    if layer == "bn" and leaf in _BN_NAMES:
        return (*modules, _BN_NAMES[leaf])
    return ("<unknown>", torch_name)


def state_dict_to_params(state: dict[str, np.ndarray]) -> dict:
    """Converts a pytorch-fid FID-Inception state dict (`read_state_dict`'s) into the
    nested float32 parameters of `InceptionV3FID().apply({"params": ...})`.

    Raises:
      ValueError: naming missing, unexpected or wrongly shaped parameters.
    """
    expected = traverse_util.flatten_dict(inception.init_params_shapes(inception.InceptionV3FID()))
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for name, value in state.items():
        path = _flax_path(name)
        if path is None:
            continue
        if path not in expected:
            unexpected.append(name)
            continue
        if value.ndim == 4:  # conv: [O, I, kh, kw] -> [kh, kw, I, O]
            value = value.transpose(2, 3, 1, 0)
        elif path == ("fc_kernel",):  # linear: [out, in] -> [in, out]
            value = value.T
        if value.shape != tuple(expected[path].shape):
            raise ValueError(
                f"Inception weight {name!r} has shape {value.shape} after conversion, "
                f"expected {tuple(expected[path].shape)}: not the FID Inception-v3 weights."
            )
        flat[path] = np.ascontiguousarray(value, np.float32)
    missing = sorted(".".join(p) for p in expected if p not in flat)
    if missing or unexpected:
        raise ValueError(
            "The weights are not pytorch-fid's FID Inception state dict: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {sorted(unexpected)[:5]} ({len(unexpected)}). Use "
            f"{FID_WEIGHTS_FILENAME} ({FID_WEIGHTS_URL})."
        )
    return traverse_util.unflatten_dict(flat)


def _download(url: str, dest: epath.Path, timeout_s: float) -> None:
    """Downloads `url` to `dest` atomically (a temporary file renamed on success)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response, atomic_write(dest, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def fetch_default_weights(
    cache_dir: str | epath.PathLike = DEFAULT_CACHE_DIR, *, timeout_s: float = 30.0, download=None
) -> epath.Path:
    """Returns the cached standard FID weights, downloading them once if needed.

    `download(url, dest_path, timeout_s)` defaults to urllib (tests pass one that fails,
    to check the offline message).

    Raises:
      FileNotFoundError: if the file is not cached and cannot be downloaded (offline);
        the message names the file, its URL and where to put it.
    """
    cache = epath.Path(cache_dir).expanduser()
    dest = cache / FID_WEIGHTS_FILENAME
    if dest.exists():
        return dest
    download = download or _download
    try:
        cache.mkdir(parents=True, exist_ok=True)
        logging.info("Downloading FID Inception weights %s to %s", FID_WEIGHTS_URL, dest)
        download(FID_WEIGHTS_URL, dest, timeout_s)
    except Exception as e:  # urllib raises URLError, socket timeouts, HTTP errors...
        raise FileNotFoundError(
            f"The FID Inception weights {FID_WEIGHTS_FILENAME} are not in {cache} and could "
            f"not be downloaded ({type(e).__name__}: {e}). Download {FID_WEIGHTS_URL} on a "
            f"machine with network access and put it at {dest}, or pass its path as "
            "inception_weights (--inception_weights=PATH)."
        ) from e
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
        dest.unlink()
        raise ValueError(
            f"Downloaded {FID_WEIGHTS_FILENAME} has sha256 {digest[:8]}..., expected "
            f"{FID_WEIGHTS_SHA256_PREFIX}...; the file was removed, try again."
        )
    return dest
