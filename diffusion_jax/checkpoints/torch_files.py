"""Reads PyTorch `.pt` / `.pth` tensor files without torch, as numpy arrays.

`torch.save` writes one of two containers around a pickle:

- the zip format (torch >= 1.6; the paper's released checkpoints): a zip archive with
  `<name>/data.pkl` (the pickled object), `<name>/byteorder` and one uncompressed
  record `<name>/data/<key>` of raw bytes per storage;
- the legacy format (before torch 1.6, or `_use_new_zipfile_serialization=False`;
  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`): concatenated pickles of the
  magic number, protocol version, system info, the object and its storage keys, then
  per storage (in key order) an int64 element count and the raw bytes.

The pickle runs in `torch_pickle.Unpickler`, which refuses everything a plain tensor
state dict does not need (as `torch.load(weights_only=True)` does). Tensors come back
as numpy arrays (bfloat16/float8 as `ml_dtypes` types) sharing memory as torch's do:
contiguous tensors are views of their storage's buffer, non-contiguous ones contiguous
copies. Every failure is a `TorchFileError`, a `ValueError` whose one-line message names
the file and what it is not. Sizes read from the file are checked against the file's
length before anything is allocated.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Any, BinaryIO

import numpy as np
from etils import epath

from diffusion_jax.checkpoints.torch_pickle import (
    Corrupt,
    PendingTensor,
    Refused,
    Storage,
    Unpickler,
    storage_from_pid,
)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class TorchFileError(ValueError):
    """A file that is not a readable, safe PyTorch tensor file (one-line message)."""


class _BigEndian(Exception):
    """The file stores its tensors big-endian."""


def _line(error: BaseException) -> str:
    """An error's message with any line breaks from the file's own strings escaped."""
    return str(error).replace("\n", "\\n").replace("\r", "\\r")


def _materialize(tensor: PendingTensor) -> np.ndarray:
    storage = tensor.storage
    root = storage if storage.base is None else storage.base
    if root.buffer is None:
        raise Corrupt(f"storage {root.key} has no data in the file")
    itemsize = tensor.dtype.itemsize
    count = storage.nbytes // itemsize
    flat = np.frombuffer(root.buffer, tensor.dtype, count, storage.byte_offset)
    size, stride = tensor.size, tensor.stride
    if 0 in size:
        if max(size) > 1 << 48:
            raise Corrupt(f"tensor size {list(size)} is not a real tensor's")
        return np.zeros(size, tensor.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= count:
        raise Corrupt(
            f"a tensor of size {list(size)} reads past the end of its storage ({count} elements)"
        )
    contiguous, expected = True, 1
    for n, s in reversed(list(zip(size, stride))):
        contiguous &= n == 1 or s == expected
        expected *= n
    if contiguous:  # a view, sharing memory as torch tensors share their storage
        return flat[tensor.offset : tensor.offset + expected].reshape(size)
    strided = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :], size, [s * itemsize for s in stride], writeable=False
    )
    return np.array(strided)  # [*size], C-contiguous


def _materialize_all(obj: Any, seen: dict[int, Any] | None = None) -> Any:
    """Replaces every `PendingTensor` in nested dicts/lists/tuples by its array."""
    seen = {} if seen is None else seen
    if isinstance(obj, PendingTensor):
        return _materialize(obj)
    if id(obj) in seen:  # shared or self-referencing containers
        return seen[id(obj)]
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for key, value in obj.items():
            obj[key] = _materialize_all(value, seen)
    elif isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_materialize_all(value, seen) for value in obj]
    elif isinstance(obj, tuple):
        seen[id(obj)] = obj = tuple(_materialize_all(value, seen) for value in obj)
    return obj


def _read_into(file: BinaryIO, nbytes: int, end: int) -> bytearray:
    """Reads exactly `nbytes` from `file` (which ends at byte `end`) into a new buffer."""
    if nbytes > end - file.tell():  # checked before allocating what the file claims
        raise Corrupt("the file ends in the middle of a storage")
    buffer = bytearray(nbytes)
    view, done = memoryview(buffer), 0
    while done < nbytes:
        if hasattr(file, "readinto"):
            n = file.readinto(view[done:])
        else:  # e.g. some remote-file objects
            chunk = file.read(min(nbytes - done, 64 << 20))
            view[done : done + len(chunk)] = chunk
            n = len(chunk)
        if not n:
            raise Corrupt("the file ends in the middle of a storage")
        done += n
    return buffer


def _read_stored_record(file: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> bytearray:
    """An uncompressed zip record's bytes, read straight into one buffer, CRC-checked."""
    file.seek(info.header_offset)
    local_header = file.read(30)  # signature, ..., name length, extra length
    if len(local_header) != 30 or local_header[:4] != b"PK\x03\x04":
        raise Corrupt(f"zip record {info.filename} has no local header")
    name_length, extra_length = struct.unpack("<HH", local_header[26:30])
    file.seek(info.header_offset + 30 + name_length + extra_length)
    buffer = _read_into(file, info.file_size, file_size)
    if zlib.crc32(buffer) != info.CRC:
        raise Corrupt(f"zip record {info.filename} fails its CRC check")
    return buffer


def _load_zip(file: BinaryIO, file_size: int) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise Corrupt(f"a truncated or corrupt zip archive ({e})") from e
    try:
        return _read_archive(archive, file, file_size)
    except (OSError, NotImplementedError) as e:  # e.g. a seek to a damaged record offset
        raise Corrupt(f"a corrupt zip archive ({type(e).__name__}: {e})") from e
    finally:
        archive.close()


def _read_archive(archive: zipfile.ZipFile, file: BinaryIO, file_size: int) -> Any:
    """The object pickled in a torch zip archive, its storages read and attached."""
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchFileError("a zip archive, but not a PyTorch file (no <name>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())

    def read_small(name: str) -> bytes:
        # torch stores records uncompressed: none can unpack to more than the file holds.
        if archive.getinfo(name).file_size > file_size:
            raise Corrupt(f"zip record {name!r} claims more bytes than the file has")
        return archive.read(name)

    if prefix + "byteorder" in names and read_small(prefix + "byteorder") != b"little":
        raise _BigEndian
    storages: dict[str, Storage] = {}

    def persistent_load(pid):
        return storage_from_pid(pid, storages, legacy=False)

    data = read_small(pickles[0])
    obj = Unpickler(io.BytesIO(data), len(data), persistent_load).load()
    for storage in storages.values():
        name = f"{prefix}data/{storage.key}"
        if name not in names:
            raise Corrupt(f"storage record {name!r} is missing")
        info = archive.getinfo(name)
        # torch writes storages uncompressed; a stored record cannot claim more bytes
        # than the file has, so nothing is allocated on a forged size.
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > file_size:
            raise Corrupt(f"storage record {name!r} is compressed or larger than the file")
        if info.file_size != storage.nbytes:
            raise Corrupt(f"storage record {name!r} does not hold {storage.nbytes} bytes")
        storage.buffer = _read_stored_record(file, info, file_size)
    return _materialize_all(obj)


def _load_legacy(file: BinaryIO, file_size: int) -> Any:
    def no_storages(pid):
        raise Corrupt("a storage in the file header")

    def header() -> Any:
        return Unpickler(file, file_size, no_storages).load()

    if header() != _LEGACY_MAGIC:
        raise TorchFileError("a pickle, but not one written by torch.save (no torch magic number)")
    if header() != _LEGACY_PROTOCOL:
        raise Corrupt("unknown legacy protocol version")
    sys_info = header()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise _BigEndian
    storages: dict[str, Storage] = {}

    def persistent_load(pid):
        return storage_from_pid(pid, storages, legacy=True)

    obj = Unpickler(file, file_size, persistent_load).load()
    keys = header()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise Corrupt("the storage key list is not a list of strings")
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise Corrupt(f"the file holds data of storage {key!r}, which no tensor uses")
        count = struct.unpack("<q", _read_into(file, 8, file_size))[0]
        if count != storage.numel:
            raise Corrupt(f"storage {key!r} holds {count} elements, its tensors {storage.numel}")
        storage.buffer = _read_into(file, storage.nbytes, file_size)
    return _materialize_all(obj)


def load(path: str | epath.PathLike) -> Any:
    """Reads a `torch.save` file (zip or legacy format) without torch, refusing code.

    Returns the saved object with every tensor as a numpy array (dicts, lists, tuples,
    numbers and strings as saved; an OrderedDict stays one). `path` may be remote.

    Raises:
      FileNotFoundError: if `path` does not exist.
      TorchFileError: (a ValueError) if the file is not a torch file, is truncated or
        corrupt, or pickles anything beyond tensors in plain containers (refused
        without running it). The message is one line and names the file.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        raise TorchFileError(f"{path} is a directory, not a PyTorch file.")
    try:
        with path.open("rb") as f:
            file_size = f.seek(0, io.SEEK_END)
            f.seek(0)
            head = f.read(4)
            f.seek(0)
            if head.startswith(b"PK"):
                return _load_zip(f, file_size)
            if not head.startswith(b"\x80"):  # torch.save pickles with protocol >= 2
                raise TorchFileError(
                    "neither a zip archive (torch.save since torch 1.6) nor torch's legacy "
                    f"format; it starts with {head!r}"
                )
            return _load_legacy(f, file_size)
    except TorchFileError as e:
        raise TorchFileError(f"{path} is not a PyTorch file: {_line(e)}.") from None
    except Refused as e:
        raise TorchFileError(
            f"{path} is not a plain state dict of tensors: {_line(e)}, which such a file never "
            "needs (a whole model saved with torch.save(model), or code to run); refused "
            "without running it. Save model.state_dict() instead."
        ) from None
    except (Corrupt, zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as e:
        raise TorchFileError(
            f"{path} is a truncated or corrupt PyTorch file ({_line(e)}); download or save it "
            "again."
        ) from None
    except _BigEndian:
        raise TorchFileError(
            f"{path} was saved on a big-endian machine, which this reader does not read; "
            "load it with torch there and save it again on a little-endian one."
        ) from None
    except (
        TypeError,
        ValueError,
        LookupError,
        AttributeError,
        ArithmeticError,
        RecursionError,
        MemoryError,
    ) as e:
        # Malformed data reaching a check this reader lacks: still one line, naming the file.
        raise TorchFileError(
            f"{path} is a corrupt PyTorch file ({type(e).__name__}: {_line(e)})."
        ) from None


def load_state_dict(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat state dict (`torch.save(model.state_dict(), path)`) without torch.

    Returns `{key: numpy array}` in the file's order, dtypes as saved (bfloat16 and
    float8 as `ml_dtypes` types), torch's layout and storage sharing.

    Raises:
      FileNotFoundError: if `path` does not exist.
      TorchFileError: as `load`, and if the file holds anything but a flat mapping of
        string keys to tensors (e.g. a training checkpoint wrapping the state dict).
    """
    obj = load(path)
    if isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    ):
        return dict(obj)
    if isinstance(obj, dict):
        kinds = sorted({type(v).__name__ for v in obj.values() if not isinstance(v, np.ndarray)})
        what = f"a dict with {', '.join(kinds) or 'non-string keys'} values"
    else:
        what = f"a {type(obj).__name__}"
    raise TorchFileError(
        f"{epath.Path(path)} holds {what}, not a flat state dict of tensors (guided-diffusion's "
        "and pytorch-fid's format): save it with torch.save(model.state_dict(), path)."
    )
