"""Run a script as N cooperating JAX processes on localhost: the multi-process test harness.

A test that needs a real multi-process run (`jax.distributed` over gloo CPU collectives,
every process with its own fake CPU devices) starts its child script with
`run_processes`; the child calls `init_child` first thing. Example (2 processes x 4
devices == the 8 devices of the in-process suite)::

    # in the test (parent)
    from multiprocess import run_processes
    results = run_processes(CHILD, lambda i: [f"--out={tmp_path}/out{i}.npz"], timeout=120)
    # or: run_processes("-m launch.train", ["--config=...", f"--workdir={tmp_path}"])

    # in the child script
    from multiprocess import init_child
    flags, argv = init_child()          # before any jax computation
    ...  # jax.process_index() == flags.process_id, jax.device_count() == 8

Each child gets the CONTRACT's multi-process flags `--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` (before the caller's arguments), and in its
environment `XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>`
(replacing any device count the parent's XLA_FLAGS had, e.g. conftest's 8),
`JAX_PLATFORMS=cpu`, `CUDA_VISIBLE_DEVICES=`, `PYTHONUNBUFFERED=1` and `PYTHONPATH`
starting with `tests/` and the repository root (so `import multiprocess` and
`import diffusion_jax` work from any script).

A program that parses the flags itself (the launchers) must, before any jax computation::

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # jax 0.10's default;
    # explicit, so CPU collectives do not hang on the default changing
    jax.distributed.initialize(coordinator_address, num_processes, process_id)

(`diffusion_jax.parallel.initialize_distributed` does both.)

Robustness: the coordinator port is reserved by the harness (a bound SO_REUSEPORT socket,
which gRPC's own SO_REUSEPORT listener can share, so no other picker is handed it while
the run lasts) and, should the coordinator still fail to bind, the run is retried on a new
port. When any process exits non-zero, or the timeout passes, every process (and its
children: each runs in its own session) is killed and reaped, and `MultiProcessError`
reports each process's exit status with the tail of its stderr, the first failure first.
Children started by `init_child` exit when the harness process dies, so a killed pytest
leaves no stragglers waiting on a collective.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# What process 0 prints when the coordinator's gRPC server cannot bind its port.
_PORT_IN_USE_MARKERS = (
    "Failed to start RPC server",
    "Failed to add port",
    "Address already in use",
)
_PORT_ATTEMPTS = 3
_KILL_GRACE_S = 5.0
_POLL_S = 0.05


class MultiProcessError(RuntimeError):
    """A multi-process run failed or timed out.

    Attributes:
      results: one `subprocess.CompletedProcess` per process, in process order (a process
        the harness killed has a negative return code, -signal).
      timed_out: True when the run passed its timeout.
    """

    def __init__(self, message: str, results: list[subprocess.CompletedProcess], timed_out: bool):
        super().__init__(message)
        self.results = results
        self.timed_out = timed_out


@contextlib.contextmanager
def reserve_port():
    """Yields a free TCP port that stays reserved (bound, not listening) until exit.

    The socket has SO_REUSEPORT, so the coordinator's gRPC server (which sets it too)
    binds the same port while no other `bind(0)` is handed it.
    """
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, 0))
        except OSError:
            sock.close()
            continue
        try:
            yield sock.getsockname()[1]
        finally:
            sock.close()
        return
    raise OSError("could not reserve a free localhost port")


def child_env(devices_per_process: int, env: Mapping[str, str | None] | None = None) -> dict:
    """The environment of a child: the parent's, with the device count, CPU platform, path.

    Args:
      devices_per_process: fake CPU devices of each process.
      env: extra variables, applied last; a None value removes the variable.
    """
    out = dict(os.environ)
    flags = [
        f
        for f in out.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    out["XLA_FLAGS"] = " ".join(flags)
    out["JAX_PLATFORMS"] = "cpu"
    out["CUDA_VISIBLE_DEVICES"] = ""
    out["PYTHONUNBUFFERED"] = "1"
    paths = [str(TESTS_DIR), str(REPO_ROOT), *filter(None, [out.get("PYTHONPATH")])]
    out["PYTHONPATH"] = os.pathsep.join(paths)
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _command(script: str | os.PathLike) -> list[str]:
    if isinstance(script, str) and script.startswith("-m"):
        module = script[2:].strip()
        if not module:
            raise ValueError(f"script={script!r}: expected '-m package.module'")
        return [sys.executable, "-m", module]
    return [sys.executable, os.path.abspath(script)]  # relative to the caller, not `cwd`


def _tail(text: str, max_lines: int, max_chars: int) -> str:
    lines = text.rstrip().splitlines()[-max_lines:]
    return "\n".join(lines)[-max_chars:]


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclasses.dataclass
class _Run:
    procs: list[subprocess.Popen]
    logs: list[tuple]  # (stdout file, stderr file) per process
    first_failure: int | None = None
    timed_out: bool = False

    def kill_all(self) -> None:
        # SIGTERM first (lets Python flush and jax shut down), then SIGKILL the group.
        alive = [p for p in self.procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + _KILL_GRACE_S
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            _kill_group(p)  # also grandchildren left in the session
            p.wait()

    def results(self, cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
        out = []
        for cmd, p, (fo, fe) in zip(cmds, self.procs, self.logs):
            fo.seek(0)
            fe.seek(0)
            stdout = fo.read().decode(errors="replace")
            stderr = fe.read().decode(errors="replace")
            out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
        return out


def _launch(cmds, env, cwd, timeout) -> tuple[_Run, list[subprocess.CompletedProcess]]:
    with contextlib.ExitStack() as stack:
        logs = [
            (
                stack.enter_context(tempfile.TemporaryFile()),
                stack.enter_context(tempfile.TemporaryFile()),
            )
            for _ in cmds
        ]
        run = _Run(procs=[], logs=logs)
        try:
            for cmd, (fo, fe) in zip(cmds, logs):
                run.procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=cwd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=fo,
                        stderr=fe,
                        start_new_session=True,  # its own process group, killed as one
                    )
                )
            deadline = time.monotonic() + timeout
            while True:
                codes = [p.poll() for p in run.procs]
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    run.first_failure = failed[0]
                    break
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    run.timed_out = True
                    break
                time.sleep(_POLL_S)
        finally:
            run.kill_all()  # no-op for processes that exited; reaps every one
        return run, run.results(cmds)


def _report(run: _Run, results, timeout: float, stderr_lines: int) -> str:
    if run.timed_out:
        head = f"multi-process run timed out after {timeout:.0f}s; all processes killed"
    else:
        head = f"process {run.first_failure} of {len(results)} failed; the others were killed"
    order = list(range(len(results)))
    if run.first_failure is not None:
        order.remove(run.first_failure)
        order.insert(0, run.first_failure)
    parts = [head, "process 0 command: " + shlex.join(results[0].args)]
    for i in order:
        r = results[i]
        code = r.returncode
        status = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        parts.append(f"----- process {i}: {status}; stderr tail -----")
        parts.append(_tail(r.stderr, stderr_lines, 6000) or "(empty)")
        if r.stdout.strip():
            parts.append(f"----- process {i}: stdout tail -----")
            parts.append(_tail(r.stdout, 10, 2000))
    return "\n".join(parts)


def run_processes(
    script: str | os.PathLike,
    args: Sequence[str] | Callable[[int], Sequence[str]] = (),
    *,
    num_processes: int = 2,
    devices_per_process: int = 4,
    timeout: float = 300,
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike = REPO_ROOT,
    stderr_lines: int = 40,
) -> list[subprocess.CompletedProcess]:
    """Runs `script` as `num_processes` JAX processes on localhost and waits for all.

    Args:
      script: a Python file, or `"-m package.module"`.
      args: arguments after the multi-process flags, the same for every process, or a
        function `process_id -> arguments`.
      num_processes: how many processes.
      devices_per_process: fake CPU devices of each (global devices = the product).
      timeout: seconds for the whole run (every process) before all are killed.
      env: extra environment variables (None removes one); see `child_env`.
      cwd: working directory of the children (default the repository root).
      stderr_lines: how many stderr lines per process the failure message shows.

    Returns:
      One `subprocess.CompletedProcess` per process in process order, with text
      `stdout` and `stderr`; every return code is 0.

    Raises:
      MultiProcessError: a process exited non-zero or the run timed out (all processes
        are killed, never left running); its message holds every process's stderr tail,
        the first failure first, and `.results` the processes' outputs.
    """
    base = _command(script)
    full_env = child_env(devices_per_process, env)
    for attempt in range(_PORT_ATTEMPTS):
        with reserve_port() as port:
            cmds = []
            for i in range(num_processes):
                extra = args(i) if callable(args) else args
                flags = [
                    f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={num_processes}",
                    f"--process_id={i}",
                ]
                cmds.append([*base, *flags, *map(str, extra)])
            run, results = _launch(cmds, full_env, cwd, timeout)
        if run.first_failure is None and not run.timed_out:
            return results
        port_lost = any(m in results[0].stderr for m in _PORT_IN_USE_MARKERS)
        if not (port_lost and attempt + 1 < _PORT_ATTEMPTS):
            raise MultiProcessError(
                _report(run, results, timeout, stderr_lines), results, run.timed_out
            )
    raise AssertionError("unreachable")


def _exit_with_parent(parent_pid: int) -> None:
    # A daemon thread: when the harness dies (pytest killed), this child is re-parented
    # and exits instead of waiting forever on a collective with a dead peer.
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def parse_flags(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Splits the multi-process flags off `argv` (default `sys.argv[1:]`).

    Returns:
      `(flags, rest)`: `flags.coordinator_address`, `.num_processes`, `.process_id`, and
      the remaining arguments.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--coordinator_address", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    flags, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return flags, rest


def init_child(
    argv: Sequence[str] | None = None, *, initialization_timeout: int = 120
) -> tuple[argparse.Namespace, list[str]]:
    """Child side of `run_processes`: gloo CPU collectives, then `jax.distributed.initialize`.

    Call it before any jax computation (importing jax first is fine).

    Args:
      argv: the arguments to parse (default `sys.argv[1:]`).
      initialization_timeout: seconds to wait for every process to join.

    Returns:
      `(flags, rest)` as `parse_flags` returns them.
    """
    flags, rest = parse_flags(argv)
    _exit_with_parent(os.getppid())
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=flags.coordinator_address,
        num_processes=flags.num_processes,
        process_id=flags.process_id,
        initialization_timeout=initialization_timeout,
    )
    return flags, rest
