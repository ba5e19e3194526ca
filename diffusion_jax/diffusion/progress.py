"""Host-side progress for compiled loops: a tqdm bar fed by `jax.debug.callback`.

A loop body calls `tick(name, total, step)`; tracing creates one `_Bar` that the
compiled program owns, opened by its first step and closed by its last, so no host
state outlives a program and no caller opens or closes anything.
"""

import jax


class _Bar:
    """The bar of one compiled loop (display state only)."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self._bar = name, int(total), None

    def update(self, step) -> None:
        if self._bar is None or int(step) == 0:  # a new run (or one that failed midway)
            from tqdm.auto import tqdm  # lazy: only needed when progress is on

            self.close()
            self._bar = tqdm(total=self.total, desc=self.name, unit="step")
        self._bar.update(1)
        if self._bar.n >= self.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def tick(name: str, total: int, step) -> None:
    """Call inside a traced loop body of `total` steps: one more step of bar `name` done."""
    jax.debug.callback(_Bar(name, total).update, step)
