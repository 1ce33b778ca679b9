"""`llmeraser corrupt`: corrupt queries or responses of a training set, and write the request that undoes it."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmeraser.cli.common import FMT


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("corrupt", formatter_class=FMT,
                       help="corrupt queries or responses, and write the undoing request",
                       description="For testing query modification and response correction end to end: corrupt a "
                                   "fraction of the training set and write the request that undoes it. query: random "
                                   "unseen titles inserted into the liked history; response: Yes/No flipped.",
                       epilog="example: llmeraser corrupt --train data/train.jsonl --kind response --ratio 0.1 "
                              "--seed 0 --out data/rc10")
    p.add_argument("--train", required=True, help="training JSONL (from 'llmeraser data movielens')")
    p.add_argument("--kind", required=True, choices=["query", "response"], help="what to corrupt")
    p.add_argument("--ratio", type=float, required=True, help="fraction of examples to corrupt, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice")
    p.add_argument("--out", required=True, help="folder for train.jsonl (corrupted) and request.json")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.data import load_examples
    from llmeraser_experiments.corrupt import corrupt, write_corruption

    corrupted, request = corrupt(load_examples(args.train), kind=args.kind, ratio=args.ratio, seed=args.seed)
    write_corruption(corrupted, request, args.out)
    print(f"corrupted {len(request.edits)} of {len(corrupted)} examples ({args.kind}); the request that undoes it: "
          f"{Path(args.out) / 'request.json'}; corrupted training set: {Path(args.out) / 'train.jsonl'}")
    return 0
