"""The multi-process harness (tests/multiprocess.py): real jax.distributed runs on localhost.

This file is also the child script: `run_processes(__file__, [MODE, ...])` runs `_child`.
"""

import json
import sys
import time

import multiprocess as harness
import numpy as np
import pytest
from multiprocess import MultiProcessError, reserve_port, run_processes

RESULT = "RESULT "  # the line a child prints its result on


def _results(completed):
    out = []
    for r in completed:
        lines = [line for line in r.stdout.splitlines() if line.startswith(RESULT)]
        assert len(lines) == 1, r.stdout[-2000:]
        out.append(json.loads(lines[0][len(RESULT) :]))
    return out


def test_two_processes_sum_a_global_array():
    completed = run_processes(__file__, ["sum"], num_processes=2, devices_per_process=4)
    results = _results(completed)
    # Process i feeds rows 100 * i + [0, 16): the global array is both processes' rows.
    rows = np.concatenate([100 * i + np.arange(16) for i in range(2)]).astype(np.float32)
    for i, r in enumerate(results):
        assert r["process_index"] == i
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
        assert r["sum"] == float(rows.sum())
        assert r["psum"] == float(rows.sum())
        # Weighted by position: the rows landed in process order, process 0's first.
        assert r["weighted"] == float((rows * np.arange(32)).sum())
        assert r["gathered"] == rows.tolist()


def test_a_failing_process_kills_the_others_and_reports_its_stderr(tmp_path):
    start = time.monotonic()
    with pytest.raises(MultiProcessError) as info:
        # Process 1 fails once process 0 has written its line (the marker file).
        run_processes(__file__, ["fail", str(tmp_path / "p0_ready")], timeout=60)
    assert time.monotonic() - start < 30  # process 0 would sleep 600 s
    err = info.value
    assert not err.timed_out
    assert "process 1 of 2 failed" in str(err)
    assert "boom from process 1" in str(err)
    assert "process 0 waiting" in str(err)  # the survivor's stderr tail is shown too
    assert err.results[1].returncode == 3
    assert err.results[0].returncode < 0  # killed by the harness


def test_timeout_kills_every_process():
    start = time.monotonic()
    with pytest.raises(MultiProcessError) as info:
        run_processes(__file__, ["sleep"], timeout=2)
    assert time.monotonic() - start < 15
    assert info.value.timed_out
    assert "timed out after 2s" in str(info.value)
    assert all(r.returncode < 0 for r in info.value.results)


def test_coordinator_port_taken_is_retried(monkeypatch):
    import socket

    taken = socket.socket()
    taken.bind(("", 0))
    taken.listen()  # a plain listener: gRPC cannot share this port
    calls = []

    def first_taken():
        calls.append(None)
        if len(calls) == 1:
            return _yield(taken.getsockname()[1])
        return reserve_port()

    monkeypatch.setattr(harness, "reserve_port", first_taken)
    try:
        completed = run_processes(__file__, ["sum"], timeout=120)
    finally:
        taken.close()
    assert len(calls) == 2
    assert _results(completed)[0]["process_count"] == 2


class _yield:
    """A reserve_port stand-in yielding a fixed port."""

    def __init__(self, port):
        self.port = port

    def __enter__(self):
        return self.port

    def __exit__(self, *exc):
        return False


def _child(argv):
    flags, (mode, *rest) = harness.parse_flags(argv)
    if mode == "fail":  # harness mechanics only: no jax
        import pathlib

        ready = pathlib.Path(rest[0])
        if flags.process_id == 1:
            deadline = time.monotonic() + 20
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            print("boom from process 1", file=sys.stderr)
            sys.exit(3)
        print("process 0 waiting", file=sys.stderr, flush=True)
        ready.touch()
        time.sleep(600)
    if mode == "sleep":
        time.sleep(600)
    harness.init_child(argv)
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    from diffusion_jax import parallel

    mesh = parallel.create_mesh()
    local = (100 * jax.process_index() + np.arange(16)).astype(np.float32)
    x = parallel.host_to_global(local, mesh)  # [32] sharded over 8 devices
    psum = jax.jit(
        jax.shard_map(
            lambda v: jax.lax.psum(jnp.sum(v), parallel.DATA_AXIS),
            mesh=mesh,
            in_specs=P(parallel.DATA_AXIS),
            out_specs=P(),
        )
    )(x)
    weighted = jax.jit(lambda v: jnp.sum(v * jnp.arange(v.shape[0])))(x)
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "sum": float(jax.jit(jnp.sum)(x)),
        "psum": float(psum),
        "weighted": float(weighted),
        "gathered": multihost_utils.process_allgather(x, tiled=True).tolist(),
    }
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])
