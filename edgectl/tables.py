"""Rows of values as an aligned text table (``edgectl status``, ``shadow --status``,
``history``), or as JSON or CSV."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import IO, Any

FORMATS = ("table", "json", "csv")


def cell(value: Any, *, digits: int = 1) -> str:
    """``-`` for None, floats with ``digits`` decimals, anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def aligned(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The header, a rule of dashes, then the rows, each column as wide as its widest cell."""
    table = [list(heads)] + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def write_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], *, fmt: str, out: IO[str]
) -> None:
    """``rows`` (dicts) as an aligned table with a row count, a JSON array, or CSV."""
    if fmt == "json":
        json.dump(list(rows), out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    elif fmt == "table":
        cells = [[cell(r.get(c), digits=2) for c in columns] for r in rows]
        out.write("\n".join(aligned(columns, cells)) + f"\n{len(rows)} rows\n")
    else:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
