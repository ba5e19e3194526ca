"""What the jobs write for people: markdown and CSV tables and PNG figures, one way each."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from etils import epath

from diffusion_jax import files


def markdown(head: Sequence[str], rows: Sequence[Sequence], rule: str | None = None) -> list[str]:
    """The lines of a markdown table: `head`, `rule` (default '|---|' per column), the rows."""

    def line(cells: Sequence) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return [line(head), rule or "|" + "---|" * len(head), *map(line, rows)]


def csv_text(rows: Sequence[Sequence], **writer_kwargs: Any) -> str:
    """`rows` (the header first) as CSV text (`csv.writer`'s keywords, e.g. lineterminator)."""
    buf = io.StringIO()
    csv.writer(buf, **writer_kwargs).writerows(rows)
    return buf.getvalue()


def save_png(fig: Any, path: str | epath.PathLike, dpi: int) -> None:
    """Writes a matplotlib `Figure` (no pyplot, no backend to choose) as a PNG, atomically."""
    with files.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
