"""Writing files that replace others, and reading JSON state and config files, so that
none of them loses data or fails without a sentence.

Ground floor: knows nothing of the rest of the library, so every layer can use it.

- `atomic_write(path, mode)`: a context manager yielding a file object; the data goes to
  a temporary file beside `path` and is renamed over `path` only when the block ends
  without an exception. A process killed during the write leaves the old file (or none)
  in place, never a half-written one. The single home of this pattern.
- `write_text_atomic(path, text)` / `write_json_atomic(path, value)`: the same, in one call.
- `read_json(path)`: the parsed file, or a `ValueError` naming the file (and what is wrong)
  instead of a bare `JSONDecodeError` that names nothing.
- `absolute(path)`, `check_writable(directory, what)`: a local path made absolute (Orbax
  needs one); a directory made and probed, or one `OSError` naming the flag.
- `load_config_file(spec)`: a `path[:argument]` config file loaded as `--config` does,
  with one sentence for whatever is wrong (launchers and config fields such as
  `sampling.classifier_config` share it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from etils import epath


def absolute(path: str | epath.PathLike) -> epath.Path:
    """`path` made absolute against the working directory (a `gs://` path already is;
    `epath.Path.resolve` would mangle it)."""
    path = epath.Path(path)
    return path if path.is_absolute() else epath.Path(os.path.abspath(path))


def check_writable(directory: str | epath.PathLike, what: str, probe: str = ".write_test") -> None:
    """Makes `directory` if needed and writes and removes the file `probe` in it; an
    OSError naming `what` (the flag that gave it) when either fails."""
    directory = epath.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / probe).write_text("")
        (directory / probe).unlink()
    except OSError as e:
        raise OSError(
            f"{what}: {directory} is not writable ({type(e).__name__}: {e.strerror or e}); "
            "choose a directory you can write to."
        ) from None


def files_under(directory: str | epath.PathLike) -> list[epath.Path]:
    """Every file below `directory`, recursively (no rglob: cloud paths refuse `**`)."""
    out = []
    for child in epath.Path(directory).iterdir():
        out.extend(files_under(child) if child.is_dir() else [child])
    return out


@contextlib.contextmanager
def atomic_write(path: str | epath.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yields a temporary file (mode 'w' or 'wb') that replaces `path` (local or `gs://`,
    its directory existing) when the block completes; on an exception inside the block
    it is deleted and `path` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', got {mode!r}.")
    path = epath.Path(path)
    # Same directory (a rename within one filesystem is atomic); the pid keeps two
    # writers of one file from sharing a temporary.
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with tmp.open(mode) as f:
            yield f
            with contextlib.suppress(AttributeError, OSError):  # cloud files: no fsync
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename publishes it
        # replace(): rename() refuses an existing target on some filesystems.
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | epath.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | epath.PathLike, value: Any, **dumps_kwargs: Any) -> None:
    """Writes `value` as JSON to `path` atomically (see `atomic_write`)."""
    write_text_atomic(path, json.dumps(value, **dumps_kwargs))


def read_json(path: str | epath.PathLike, *, hint: str = "") -> Any:
    """The JSON value in `path`; `hint` (what to do about a damaged file) ends errors.

    Raises:
      FileNotFoundError: `path` does not exist (names it).
      ValueError: `path` is not valid JSON (names it, with the position of the fault).
    """
    path = epath.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found.") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a JSON text file ({e}).{_hint(hint)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is corrupt or truncated: not valid JSON ({e.msg} at line {e.lineno} "
            f"column {e.colno}).{_hint(hint)}"
        ) from None


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (KeyError's quotes and line breaks removed)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    while isinstance(message, BaseException):  # AttributeError(KeyError(...))
        message = message.args[0] if message.args else ""
    return " ".join(str(message).split()) or type(error).__name__


def load_config_file(spec: str) -> tuple[Any, str | None]:
    """Loads `path[:argument]` as ml_collections does; returns `(config, problem)`.

    Args:
      spec: a `--config` value or a config field naming one, e.g. 'configs/imagenet64.py:tiny'.

    Returns:
      `(ConfigDict, None)`, or `(None, what is wrong)` as one sentence.
    """
    import ml_collections  # lazily: the GPU image lacks it, and this floor is imported everywhere

    path, colon, argument = spec.partition(":")
    if not path:
        return None, "the config path is empty"
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" in {os.getcwd()}"
        return None, (
            f"no config file {path}{where} (config paths are relative to the current "
            "directory: run from the repository root, e.g. --config=configs/imagenet64.py)"
        )
    if not path.endswith(".py"):
        return None, f"{path} is not a config file (a Python file defining get_config())"
    try:
        module_spec = importlib.util.spec_from_file_location("_config_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # whatever executing the file raises: report it, do not crash
        return None, f"cannot load {path}: {type(e).__name__}: {one_line(e)}"
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        return None, f"{path} is not a config file: it defines no get_config()"
    try:
        config = get_config(argument) if colon else get_config()
    except Exception as e:  # e.g. an unknown variant: the config's own message
        return None, one_line(e)
    if not isinstance(config, ml_collections.ConfigDict):
        return None, f"get_config() of {path} returned a {type(config).__name__}, not a ConfigDict"
    return config, None
