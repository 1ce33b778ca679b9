"""Top-1 against weighted (APA-style) and ensemble (SISA-style) serving of sharded folders on a test set:
`serving.evaluate_sharded` with each of `--aggregates` (top-1 once, the others at each temperature), one run, written
as JSON (docs/sharded.md#serving-top-1-weighted-or-ensemble); an ensemble row also holds each shard's own AUC on the
whole test set.

    python bench/sharded_weighted.py --folders /tmp/shm-work/IR-1-4 --movielens-test --temperatures 0.05 1 \
        --out bench/results/movielens-sharded/weighted.json
    python bench/sharded_weighted.py --folders /tmp/shm-work/IR-1-4 --movielens-test --aggregates ensemble \
        --temperatures 0.05 --out bench/results/movielens-sharded/ensemble.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from llmeraser.io import atomic_write_json
from llmeraser.serving import evaluate_sharded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", nargs="+", required=True, help="sharded adapter folders")
    p.add_argument("--movielens-test", action="store_true", help="the MovieLens suite's test split (n_train 400)")
    p.add_argument("--data", default=None, help="else: a data file to evaluate on")
    p.add_argument("--aggregates", nargs="+", default=["top1", "weighted"], choices=["top1", "weighted", "ensemble"],
                   help="top1 once; weighted and ensemble at each temperature (ensemble: S passes a query)")
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.05, 1.0])
    p.add_argument("--base-model", default="default")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.movielens_test:
        from llmeraser_experiments.movielens import build_splits

        data = build_splits(n_train=400)["test"]
    else:
        from llmeraser.data import load_examples

        data = load_examples(a.data)
    rows = []
    for folder in a.folders:
        settings = [(g, None) if g == "top1" else (g, t) for g in a.aggregates for t in a.temperatures]
        for aggregate, temperature in dict.fromkeys(settings):
            start = time.perf_counter()
            result = evaluate_sharded(folder, data, base_model=a.base_model, device="cpu", aggregate=aggregate,
                                      **({"temperature": temperature} if temperature else {}))
            rows.append({"folder": folder, "aggregate": aggregate, "temperature": temperature,
                         "auc": result.get("auc"), "accuracy": result.get("accuracy"), "loss": result["loss"],
                         "seconds": time.perf_counter() - start,
                         **({"each_shard": result["routing"]["each_shard"]} if aggregate == "ensemble" else {})})
            print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(a.out, {"command": " ".join(sys.argv), "n": len(data), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
