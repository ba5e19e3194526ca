"""Host-side progress for compiled loops: a tqdm bar fed by `jax.debug.callback`.

The compiled program only calls `tick(name, step)`; which bar (if any) it feeds is
host state opened by `open_bar` and closed by `close_bar` around a call, so the
program is the same with or without a bar on screen, and is shared by every caller.
"""

import functools

import jax

_BARS: dict = {}  # name -> open tqdm bar (host-side display state only)


def open_bar(name: str, total: int) -> None:
    """Opens the bar `name` for `total` steps (replacing one left open)."""
    from tqdm.auto import tqdm  # lazy: only needed when progress is on

    close_bar(name)
    _BARS[name] = tqdm(total=total, desc=name, unit="step")


def close_bar(name: str) -> None:
    """Closes the bar `name`, if open."""
    bar = _BARS.pop(name, None)
    if bar is not None:
        bar.close()


def _update(name: str, _step) -> None:
    bar = _BARS.get(name)
    if bar is not None:
        bar.update(1)


def tick(name: str, step) -> None:
    """Call inside a traced loop body: one more step of bar `name` done."""
    jax.debug.callback(functools.partial(_update, name), step)
