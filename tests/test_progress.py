"""The one progress meter: its lines against rates and ETAs worked out by hand."""

import logging
import types

import pytest

from diffusion_jax import progress as progress_lib


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_lib, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def lines(caplog):
    return [r.getMessage() for r in caplog.records]


def test_rate_counts_only_this_runs_work_and_the_eta_follows(clock, caplog):
    meter = progress_lib.Progress("sampling", 100, done=40)
    with caplog.at_level(logging.INFO, logger="absl"):
        clock[0] += 4.0
        meter.update(20)  # 20 images in 4 s: 5 images/s, 40 left
        clock[0] += 4.0
        meter.update(40)
    assert lines(caplog) == [
        "sampling: 60/100 images, 5 images/s, ETA 8 s",
        "sampling: 100/100 images, 7.5 images/s, done",
    ]


def test_every_n_and_the_total_and_a_second_rate_with_an_untimed_first_step(clock, caplog):
    meter = progress_lib.Progress(
        "training", 7, unit="steps", also=(32, "images"), every_n=3, untimed_first=True
    )
    with caplog.at_level(logging.INFO, logger="absl"):
        for step in range(1, 8):
            clock[0] += 60.0 if step == 1 else 0.5  # the first step compiles: not timed
            meter.at(step)
    assert lines(caplog) == [
        "training: 3/7 steps, 2 steps/s, 64 images/s, ETA 2 s",
        "training: 6/7 steps, 2 steps/s, 64 images/s, ETA 0 s",
        "training: 7/7 steps, 2 steps/s, 64 images/s, done",
    ]


def test_every_s_an_unknown_total_and_a_quiet_meter(clock, caplog):
    meter = progress_lib.Progress("Inception features", None, every_s=30.0)
    quiet = progress_lib.Progress("sweep", 4, unit="points", quiet=True)
    assert quiet.eta() == "ETA unknown"
    with caplog.at_level(logging.INFO, logger="absl"):
        for _ in range(4):
            clock[0] += 10.0
            meter.update(100)
            quiet.update()
    assert lines(caplog) == ["Inception features: 300 images, 10 images/s"]
    assert quiet.eta() == "done"
    quiet.total = 4 + 3600  # 3600 left at 0.1 points/s
    assert quiet.eta() == "ETA 36000 s (10.0 h)"
