"""Plain-text tables for the command line and the benchmarks."""

from __future__ import annotations

import math


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; columns are (key, header, format spec); NaN prints as —."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["—" if isinstance(r.get(k), float) and math.isnan(r[k]) else format(r.get(k, ""), f)
                      for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
