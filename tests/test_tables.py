"""compressors.tables: the one markdown renderer of results."""

import math

from ctxzip.compressors.tables import Column, fmt, markdown_table


def test_columns_format_keys_cells_and_missing_values() -> None:
    rows = [{"name": "a", "x": 0.123456, "n": 3}, {"name": "b", "x": math.nan, "n": 4, "extra": "y"}]
    columns = [Column("name", "name"), Column("x", "x", digits=2), Column("twice n", cell=lambda r: 2 * r["n"]),
               Column("extra", "extra")]
    assert markdown_table(rows, columns).splitlines() == [
        "| name | x | twice n | extra |", "|---|---|---|---|", "| a | 0.12 | 6 | - |", "| b | - | 8 | y |"]
    assert fmt(None) == fmt(math.nan) == "-" and fmt(1.5, 1) == "1.5" and fmt(7) == "7"
