"""Two benchmark runs' metrics, compared value by value: what a restructuring must leave unchanged.

    python bench/same_metrics.py BEFORE/results.json AFTER/results.json

Rows are matched by (setting, seed, method); every field is compared for equality except the measurements of time
and memory, which differ from run to run. Exits 1 naming the first differences when any metric differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# wall-clock and memory measurements (and ratios of them): they vary between runs of the same code
MEASURED = {"seconds", "total", "time_ratio", "peak_mib", "gradients", "solve", "tuning", "fit", "retrain_seconds",
            "pass", "eigen", "correction", "gram", "extra", "fit_mib", "fit_vs_epoch", "grad_only", "request_vs_grad"}


def rows(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return {(r["setting"], r["seed"], r["method"]): r for r in json.load(f)["rows"]}


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    a = p.parse_args(argv)
    before, after = rows(a.before), rows(a.after)
    problems = [f"row {k} is only in {'before' if k in before else 'after'}" for k in set(before) ^ set(after)]
    compared = 0
    for k in sorted(set(before) & set(after), key=str):
        for field in sorted(set(before[k]) | set(after[k])):
            if field in MEASURED:
                continue
            compared += 1
            if not same(before[k].get(field), after[k].get(field)):
                problems.append(f"{k} {field}: {before[k].get(field)!r} → {after[k].get(field)!r}")
    print(f"{len(before)} rows, {compared} metric values compared: {len(problems)} differ")
    for line in problems[:20]:
        print(" ", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
