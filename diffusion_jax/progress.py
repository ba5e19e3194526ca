"""The one progress meter of host-side loops: units done of a total, rate(s) and ETA as log lines.

(Compiled loops have their own bar, fed from inside the program: `diffusion.progress`.)
Also `absl_records_dropped`, which keeps other libraries' chatter out of those logs.
"""

from __future__ import annotations

import contextlib
import logging as logging_std
import time
from collections.abc import Callable, Iterator

from absl import logging


class Progress:
    """Counts units done out of `total` and logs `what: done/total unit, rate unit/s, ETA`.

    Args: `total` None = unknown (no ETA); `done`: units finished before this run (not in
    its rate); `also`: `(factor, name)` of a second rate (steps x batch = images);
    `every_s` / `every_n`: log at most once in so many seconds / only at multiples of n
    (and the total); `untimed_first`: the first update starts the clock (its time is mostly
    compiling); `quiet`: count only (other processes; callers wording lines with `eta()`).
    """

    def __init__(self, what: str, total: int | None, *, done: int = 0, unit: str = "images",
                 also: tuple[int, str] | None = None, every_s: float = 0.0, every_n: int = 1,
                 untimed_first: bool = False, quiet: bool = False):  # fmt: skip
        self.what, self.total, self.unit, self.also = what, total, unit, also
        self.every_s, self.every_n, self.quiet = every_s, every_n, quiet
        self.done = self._first = done
        self._start = self._last = None if untimed_first else time.perf_counter()

    def update(self, n: int = 1) -> None:
        """`n` more units done; logs a line when one is due."""
        self.at(self.done + n)

    def at(self, done: int) -> None:
        """The count is now `done`; logs a line when one is due."""
        self.done, now = done, time.perf_counter()
        if self._start is None:
            self._start = self._last = now
            self._first = done
            return
        due = done % self.every_n == 0 or done == self.total
        if due and now - self._last >= self.every_s and not self.quiet:
            self._last = now
            logging.info("%s", self.line())

    def rate(self) -> float:
        """Units per second of this run's work (0 before any)."""
        if self._start is None:
            return 0.0
        return (self.done - self._first) / max(time.perf_counter() - self._start, 1e-9)

    def eta(self) -> str:
        """'ETA <s> s', 'ETA unknown' (no rate yet) or 'done'."""
        remaining, rate = (self.total or 0) - self.done, self.rate()
        if remaining <= 0:
            return "done"
        if not rate:
            return "ETA unknown"
        seconds = remaining / rate
        return f"ETA {seconds:.0f} s" + (f" ({seconds / 3600:.1f} h)" if seconds >= 3600 else "")

    def line(self) -> str:
        """The log line: count, rate(s) and (with a total) the ETA."""
        rate = self.rate()
        count = self.done if self.total is None else f"{self.done}/{self.total}"
        parts = [f"{self.what}: {count} {self.unit}", f"{rate:.3g} {self.unit}/s"]
        if self.also:
            parts.append(f"{rate * self.also[0]:.3g} {self.also[1]}/s")
        return ", ".join(parts + ([] if self.total is None else [self.eta()]))


@contextlib.contextmanager
def absl_records_dropped(drop: Callable[[logging_std.LogRecord], bool]) -> Iterator[None]:
    """Drops the log records `drop` selects from absl's logger while the block runs."""

    def keep(record: logging_std.LogRecord) -> bool:
        return not drop(record)

    absl_logger = logging.get_absl_logger()
    absl_logger.addFilter(keep)
    try:
        yield
    finally:
        absl_logger.removeFilter(keep)
