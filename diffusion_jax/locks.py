"""One job per workdir: an exclusive lock file naming its holder.

Ground floor (no other library import), so training, classifier training, sampling jobs,
sweeps, the FID table, the quickstart and `launch.make_reference` share it:

    with locks.workdir_lock(workdir, job="training", primary=jax.process_index() == 0):
        ...  # the only job writing `workdir`

or, in a multi-process program where every process must learn of a refusal,
`with locks.exclusive_workdir(workdir, job="sampling"):` (all processes call it).

A second job on the same workdir is refused at once with a `WorkdirLockedError` (an
`OSError`, so launchers print it as one line) naming the holder: host, pid, job and start
time. The lock file `DIR/.lock` is removed on every exit of the block, exceptions
included; a workdir the block created and left empty (or holding only empty folders)
is removed too, so a refused command leaves nothing behind. A process killed with
SIGKILL cannot remove it: a lock whose pid is no longer alive on this host is taken over
with a warning. In multi-process runs only process 0 takes the lock (`primary`); the
others share its ownership. Taking the lock again inside the holding process (a job that
calls another job on the same directory) is allowed and leaves the release to the outer
block.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator

from absl import logging
from etils import epath

LOCK_FILE = ".lock"


class WorkdirLockedError(OSError):
    """Another job holds the workdir's lock; the message names it."""


def _holder_record(job: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _read_holder(path: epath.Path) -> dict | None:
    """The lock file's holder record; None when it is gone or unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another job (its lock file is unreadable)"
    return (
        f"{holder.get('job', 'a job')} (host {holder.get('host', '?')}, pid "
        f"{holder.get('pid', '?')}, started {holder.get('started', '?')})"
    )


def _create(path: epath.Path, record: dict) -> bool:
    """Creates the lock file holding `record`; False when it exists already."""
    text = json.dumps(record)
    if "://" in str(path):  # cloud storage has no exclusive create: best effort
        if path.exists():
            return False
        path.write_text(text)
        return True
    try:
        fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def acquire(workdir: str | epath.PathLike, *, job: str, name: str = LOCK_FILE) -> bool:
    """Takes the lock of `workdir` (created if needed) for this process.

    Returns:
      True when this call took it; False when this process holds it already (an outer
      `workdir_lock` block releases it).

    Raises:
      WorkdirLockedError: another live process holds it.
    """
    workdir = epath.Path(workdir)
    path = workdir / name
    record = _holder_record(job)
    for _ in range(3):  # a stale lock taken over, or a holder that just left: try again
        if _create(path, record):
            return True
        holder = _read_holder(path)
        if holder is None and not path.exists():
            continue  # released between our two looks
        same_host = holder is not None and holder.get("host") == record["host"]
        if same_host and holder.get("pid") == record["pid"]:
            return False
        if same_host and not _pid_alive(int(holder.get("pid", -1))):
            message = "Taking over the lock of %s: its holder %s is no longer running."
            logging.warning(message, workdir, _describe(holder))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        raise WorkdirLockedError(
            f"{workdir} is in use by {_describe(holder)}; wait for it to end or use another "
            f"directory (if that process is gone, delete {path})."
        )
    raise WorkdirLockedError(f"could not take the lock {path}: it keeps changing hands.")


def release(workdir: str | epath.PathLike, *, name: str = LOCK_FILE) -> None:
    """Removes the lock of `workdir` if this process holds it."""
    path = epath.Path(workdir) / name
    holder, me = _read_holder(path), (socket.gethostname(), os.getpid())
    if holder is not None and (holder.get("host"), holder.get("pid")) == me:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def workdir_lock(
    workdir: str | epath.PathLike, *, job: str, primary: bool = True, name: str = LOCK_FILE
) -> Iterator[epath.Path]:
    """Holds the exclusive lock of `workdir` for the block (see the module docstring).

    Yields `workdir` as an `epath.Path`, created if missing (and removed again on exit
    if the block leaves it empty). `job` names the holder for the message a second job
    gets ('training'); only a `primary` process (process 0) takes the lock; another lock
    file `name` locks one output file of a shared directory (`launch.make_reference`:
    `.REF.npz.lock`).
    """
    workdir = epath.Path(workdir)
    if not primary:
        yield workdir
        return
    existed = workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    taken = acquire(workdir, job=job, name=name)
    try:
        yield workdir
    finally:
        if taken:
            release(workdir, name=name)
            if not existed:  # a refused first run leaves no empty workdir behind
                with contextlib.suppress(OSError):
                    _remove_empty_dirs(workdir)


def _remove_empty_dirs(directory: epath.Path) -> None:
    """Removes `directory` if it holds nothing but empty directories (links kept)."""
    for child in directory.iterdir():
        if child.is_dir() and not os.path.islink(os.fspath(child)):
            _remove_empty_dirs(child)
    if not any(directory.iterdir()):
        directory.rmdir()


@contextlib.contextmanager
def exclusive_workdir(workdir: str | epath.PathLike, *, job: str) -> Iterator[epath.Path]:
    """`workdir_lock` for a job run by every process of a (multi-process) JAX program.

    Process 0 takes the lock; a refusal is shared (one small all-gather) so every process
    raises `WorkdirLockedError` and none is left waiting in a collective. Every process
    must call it. Training uses it; sampling jobs, sweeps, the FID table and the
    quickstart can too.
    """
    import jax  # lazy: the lock itself needs no JAX

    from diffusion_jax import resumable

    error, stack = None, contextlib.ExitStack()
    if jax.process_index() == 0:
        try:
            stack.enter_context(workdir_lock(workdir, job=job))
        except WorkdirLockedError as e:
            error = e
    if resumable.any_process(error is not None) and error is None:
        error = WorkdirLockedError(f"{workdir} is in use by another job (see process 0).")
    if error is not None:
        raise error
    with stack:
        yield epath.Path(workdir)
