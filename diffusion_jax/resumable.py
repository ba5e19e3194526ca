"""The resumable-job layer: what a job's results depend on, and agreeing about it.

Ground floor (no other library import), shared by everything that writes results over
time: training resume, the sampling job, the sweep, the FID table and the quickstart.
Each mechanism has this one home:

- `differences(saved, current)`: the dotted fields in which two fingerprints (nested
  dicts of every input that changes a result) differ, each with both values;
  `check_fingerprint(path, fingerprint)` compares with the one saved in `path` (read
  naming the file) and refuses a change by name; `record_fingerprint` writes it
  (atomically, process 0) once the inputs have passed their checks.
- `path_identity(path)`: a cheap content identity of a file or directory (names, sizes,
  modification times; no data read), so a checkpoint that training advanced, a reference
  batch that was replaced or other feature weights are told from the ones a result was
  made from.
- `mark_complete` / `is_complete`: completion markers; `write_text`: a result file
  written atomically by process 0; `read_record(path, expected)`: a saved record and
  the fields in which it departs from `expected` (is this row / point finished?).
- `agree`, `min_over_processes`, `any_process`, `gather_rows`: the cross-process
  agreement every multi-process job needs (process 0's answer, the smallest count, a
  refusal anywhere, every process's rows), one small collective each; no-ops in a
  single process.

Atomic writes and JSON reads that name the file live in `files`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from diffusion_jax import files

COMPLETE = "COMPLETE"
_ABSENT = "<absent>"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def normalise(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(value, default=str))


def differences(
    saved: dict,
    current: dict,
    *,
    ignore: Sequence[str] = (),
    implicit: Callable[[str, Any], bool] | None = None,
    saved_name: str = "was",
) -> list[str]:
    """The fields (dotted) in which `current` departs from `saved`, with both values.

    `saved` is the fingerprint a result was made from (as read back from JSON);
    `ignore` names fields (and whole sections) that may change without changing a
    result; `implicit(field, value)` -> True when `value` of a field that `saved` lacks
    is what the saved run used implicitly (a field added later, off by default).

    Returns sorted entries 'field (was: A, now: B)'; empty when they agree.
    """
    a, b = flatten(normalise(saved)), flatten(normalise(current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in ignore):
            continue
        if key not in a and implicit is not None and implicit(key, b[key]):
            continue
        was, now = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if was != now:
            diffs.append(f"{key} ({saved_name}: {was!r}, now: {now!r})")
    return diffs


def summarise(diffs: Sequence[str], limit: int = 3) -> str:
    """The first `limit` differences, and how many more."""
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def check_fingerprint(
    path: str | epath.PathLike, fingerprint: dict, *, what: str, remedy: str
) -> bool:
    """Compares `fingerprint` with the one saved in `path`.

    Returns:
      True when `path` holds the same fingerprint, False when there is none yet.

    Raises:
      ValueError: `path` holds another one (names the file and the changed fields), or
        is not valid JSON (names the file).
    """
    path = epath.Path(path)
    if not path.exists():
        return False
    diffs = differences(files.read_json(path, hint=remedy), fingerprint)
    if diffs:
        raise ValueError(f"{path} records {what} of other inputs: {summarise(diffs)}. {remedy}")
    return True


def record_fingerprint(path: str | epath.PathLike, fingerprint: dict) -> None:
    """Writes `fingerprint` to `path` atomically (process 0 only)."""
    write_text(path, json.dumps(normalise(fingerprint), indent=2, sort_keys=True))


def write_text(path: str | epath.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically, making its directory (process 0 only)."""
    import jax  # lazy: the fingerprints need no JAX

    if jax.process_index() == 0:
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(path, text)


def read_record(
    path: str | epath.PathLike, expected: dict, *, hint: str = ""
) -> tuple[dict | None, list[str]]:
    """The JSON record in `path` (None: none) and the `differences` of its values of
    `expected`'s fields from `expected` (empty: a record of these inputs); a damaged file
    is a ValueError naming it, then `hint`."""
    if not epath.Path(path).exists():
        return None, []
    record = files.read_json(path, hint=hint)
    return record, differences({k: record.get(k) for k in expected}, expected)


def path_identity(path: str | epath.PathLike | None) -> str | None:
    """A digest of the names, sizes and modification times under `path` (None: None).

    Cheap (no file is read), and it changes whenever a file is replaced, rewritten,
    added or removed: training that advanced a workdir, a re-converted checkpoint, a
    replaced reference batch. A copy that keeps modification times (`cp -p`, rsync -t)
    keeps the identity.

    Raises:
      FileNotFoundError: `path` does not exist (names it).
    """
    if path is None:
        return None
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found.")
    digest = hashlib.sha256()
    entries = sorted(files.files_under(path)) if path.is_dir() else [path]
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".lock"):
            continue  # a job's lock file is no content
        stat = os.stat(os.fspath(entry)) if "://" not in str(entry) else entry.stat()
        mtime = getattr(stat, "st_mtime_ns", None) or getattr(stat, "mtime", 0)
        size = getattr(stat, "st_size", None) or getattr(stat, "length", 0)
        name = entry.name if entry == path else str(entry.relative_to(path))
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:32]


def mark_complete(directory: str | epath.PathLike, name: str = COMPLETE) -> None:
    """Writes the completion marker `directory/name` (process 0 only)."""
    write_text(epath.Path(directory) / name, "")


def is_complete(directory: str | epath.PathLike, name: str = COMPLETE) -> bool:
    """Whether `directory/name` exists, as process 0 sees it (on every process)."""
    return agree((epath.Path(directory) / name).exists())


def _multihost():
    import jax

    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    return multihost_utils


def agree(value: bool | int) -> Any:
    """Process 0's `value` on every process (so that all take the same branch)."""
    mh = _multihost()
    if mh is None:
        return value
    out = int(mh.broadcast_one_to_all(np.int64(value)))
    return bool(out) if isinstance(value, bool) else out


def min_over_processes(value: int) -> int:
    """The smallest `value` of any process (e.g. the batches every process finished)."""
    mh = _multihost()
    return value if mh is None else int(np.min(mh.process_allgather(np.int64(value))))


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a refusal one process met stops all)."""
    mh = _multihost()
    if mh is None:
        return bool(flag)
    return bool(np.any(mh.process_allgather(np.asarray([flag], np.int32))))


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of `x`, stacked in process order; a collective."""
    mh = _multihost()
    if mh is None:
        return x
    return np.asarray(mh.process_allgather(x)).reshape(-1, *x.shape[1:])


def fetch_global(tree: Any) -> Any:
    """Host numpy copies of (possibly multi-process) global arrays, on every process."""
    mh = _multihost()
    if mh is None:
        import jax

        return jax.device_get(tree)
    return mh.process_allgather(tree, tiled=True)


__all__ = [
    "COMPLETE",
    "agree",
    "any_process",
    "check_fingerprint",
    "differences",
    "fetch_global",
    "gather_rows",
    "is_complete",
    "mark_complete",
    "min_over_processes",
    "normalise",
    "path_identity",
    "read_record",
    "record_fingerprint",
    "summarise",
    "write_text",
]
