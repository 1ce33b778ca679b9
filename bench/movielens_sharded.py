"""Sharded adapters on MovieLens: IR-1, IR-10, RC-10 at S ∈ {1, 4, 8} shards by user (docs/sharded.md).

    python bench/movielens_sharded.py --work /tmp/shm-work --out bench/results/movielens-sharded
    python bench/movielens_sharded.py --tiny --out DIR     a tiny random model, seconds (what the test runs)
    python bench/movielens_sharded.py --settings IR-1 --shards 1 4 --out DIR

The suite's settings and recipe (bench/run.py, n_train 400, one epoch), every adapter made with the library:
`finetune_sharded(..., by="user")` (S = 1: the single adapter) and `unlearn_sharded` (S = 1: a rewind of the whole
run, i.e. the single adapter's retrain). Test queries routed top-1 by each folder's router. Writes OUT/results.json
and OUT/table.md; what is measured: `llmeraser_experiments.sharded_movielens`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from llmeraser.errors import ConfigError, DataError
from llmeraser_experiments.sharded_movielens import ShardedMovieLensArguments, run_sharded_movielens

RESULTS = Path(__file__).parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and 48 training examples: seconds")
    p.add_argument("--settings", nargs="+", default=None, metavar="SETTING", help="default: IR-1 IR-10 RC-10")
    p.add_argument("--shards", nargs="+", type=int, default=None, metavar="S", help="default: 1 4 8 (1 required)")
    p.add_argument("--spread-seeds", nargs="*", type=int, default=None, metavar="SEED",
                   help="the single adapter retrained from these seeds on the first setting (default: 1 2)")
    p.add_argument("--time-seeds", nargs="*", type=int, default=None, metavar="SEED",
                   help="… and on the other settings (default: none: their retrain time is the first's per step)")
    p.add_argument("--work", default=None, metavar="DIR", help="keep every folder here, reused by a rerun")
    p.add_argument("--out", default=None, help="output folder (new); default bench/results/movielens-sharded-<time>")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if a.tiny:
        torch.set_num_threads(1)
    overrides = {k: tuple(v) for k, v in {"settings": a.settings, "shards": a.shards, "spread_seeds": a.spread_seeds,
                                          "time_seeds": a.time_seeds}.items() if v is not None}
    out = Path(a.out or RESULTS / f"movielens-sharded-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        args = (ShardedMovieLensArguments.tiny if a.tiny else ShardedMovieLensArguments)(**overrides)
        result = run_sharded_movielens(args, out, work=a.work)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text())
    print(f"{len(result['rows'])} rows in {result['seconds']:.0f} s -> {out}/results.json, table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
