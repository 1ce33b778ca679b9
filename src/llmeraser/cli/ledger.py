"""`llmeraser ledger show|verify`: a lineage's history (`ledger.Ledger.rows`) and its hash check (`Ledger.verify`)."""

from __future__ import annotations

import argparse
import sys

from llmeraser.cli.common import FMT

COLUMNS = [("seq", "#", "d"), ("update", "update", "d"), ("time", "updated (UTC)", ""), ("status", "status", ""),
           ("request", "request", ""),
           ("edits", "edits", ""), ("input", "input", ""), ("output", "output", ""), ("solver", "solver", ""),
           ("residual", "residual", ".1e"), ("note", "output folder / error", "")]


BACKLOG = [("request", "request", ""), ("edits", "edits", ""), ("submitted", "submitted (UTC)", ""),
           ("deadline", "deadline (UTC)", "")]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ledger", formatter_class=FMT, help="show or verify the history of an adapter lineage",
                       description="show: every request of the lineage (status, the update it was applied in — "
                                   "requests applied together share one —, hashes, solver, residual) and the backlog "
                                   "('unlearn --queue'). verify: "
                                   "recompute the sha256 of the root and of every applied output adapter and check "
                                   "the chain, update by update; exit 1 on any mismatch.",
                       epilog="example: llmeraser ledger verify runs/ledger")
    p.add_argument("action", choices=["show", "verify"], help="what to do")
    p.add_argument("dir", help="the ledger folder (given to 'unlearn --ledger')")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.ledger import Ledger
    from llmeraser.ledger.backlog import queued
    from llmeraser.table import format_table

    with Ledger(args.dir, create=False) as ledger:
        if args.action == "show":
            root = ledger.root() or {}
            print(f"lineage root: {root.get('root_adapter')} (sha256 {str(root.get('root_sha256'))[:12]}…), "
                  f"training set {str(root.get('train_sha256'))[:12]}… ({root.get('n_train')} examples), "
                  f"since {root.get('created')}\n")
            rows = ledger.rows()
            print(format_table(rows, COLUMNS) if rows else "no requests yet")
            waiting = queued(ledger)
            if waiting:
                print(f"\nbacklog: {len(waiting)} request(s) queued (apply with 'unlearn --backlog')\n")
                print(format_table([{"request": q.request.hash[:12], "edits": q.request.summary(),
                                     "submitted": q.submitted.isoformat(timespec="seconds"),
                                     "deadline": q.deadline.isoformat(timespec="seconds") if q.deadline else "none"}
                                    for q in waiting], BACKLOG))
            return 0
        problems = ledger.verify()
        applied = len(ledger.entries("applied"))
    if problems:
        print("\n".join(f"MISMATCH {p}" for p in problems))
        print(f"ledger {args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ledger {args.dir}: the root and {applied} applied request(s) match their recorded sha256")
    return 0
