"""The one markdown renderer of evaluation results: rows of dicts, columns that say how to show them.

Every results table of the project (``eval.report``, ``eval.scoring``, ``compressors.color.evaluation``,
``compressors.cskv.evaluation``, the model card's evaluation) is a list of ``Column``s over result rows; a missing or NaN value shows as ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def missing(value: Any) -> bool:
    """No number to show or average: ``None`` or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (floats), as it is (others), ``-`` for a missing or NaN value."""
    if missing(value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Column:
    """One column: its header, and the cell of a row (``key`` formatted with ``digits``, or ``cell(row)``)."""

    header: str
    key: str = ""
    digits: int = 3
    cell: Callable[[dict[str, Any]], Any] | None = None

    def render(self, row: dict[str, Any]) -> str:
        value = self.cell(row) if self.cell is not None else row.get(self.key)
        return value if isinstance(value, str) else fmt(value, self.digits)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.render(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
