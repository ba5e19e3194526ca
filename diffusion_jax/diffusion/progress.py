"""Host-side progress for compiled loops: a tqdm bar fed by `jax.debug.callback`."""

import jax


class HostProgress:
    """A progress bar (steps/s, ETA) updated from inside a jitted loop.

    One instance lives with each compiled loop; `start` arms it before a call and
    `close` ends it, so the compiled program itself never changes.
    """

    def __init__(self, description: str):
        self._description = description
        self._bar = None

    def start(self, total: int) -> None:
        """Opens a new bar for `total` steps."""
        from tqdm.auto import tqdm  # lazy: only needed when progress is on

        self._bar = tqdm(total=total, desc=self._description, unit="step")

    def update(self, _step) -> None:
        """Host callback: one more step done."""
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        """Ends the current bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def tick(self, step) -> None:
        """Call inside the traced loop body to report one step from the device."""
        jax.debug.callback(self.update, step)
