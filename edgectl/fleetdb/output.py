"""Rows of named values written as an aligned table, JSON or CSV (``edgectl history``)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import IO, Any

FORMATS = ("table", "json", "csv")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def write_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], *, fmt: str, out: IO[str]
) -> None:
    if fmt == "json":
        json.dump(list(rows), out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    elif fmt == "table":
        table = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out.write("\n".join(lines) + f"\n{len(rows)} rows\n")
    else:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
