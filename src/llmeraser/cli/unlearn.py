"""`llmeraser unlearn`: apply a request to an adapter (`job.AdapterJob.unlearn` with `updates.UnlearnOptions`)."""

from __future__ import annotations

import argparse

from llmeraser.cli.common import (
    add_adapter_flags,
    add_fields,
    check_outputs,
    float_arg,
    job,
    pick,
    solver_cls,
)


def add_parser(sub) -> argparse.ArgumentParser:
    from llmeraser.eraser import EraserArguments
    from llmeraser.replay import PathArguments, RefineArguments
    from llmeraser.updates import method_names, methods_help
    from llmeraser.updates.base import REFIT_FRACTION
    from llmeraser.updates.stop import ForgetArguments

    p = sub.add_parser("unlearn", help="apply a request (remove / modify_query / correct_response) to an adapter",
                       description="Write a new adapter that behaves as if fine-tuned without (or with corrected) "
                                   "examples, plus report.json (request hash, method and why, solver, damping, "
                                   "residual, timings, ‖Δθ‖). With the adapter's recorded trajectory the default "
                                   "(--method auto) rewinds exactly or replays the path; without, one influence "
                                   "step (LLMEraser). A sharded adapter (finetune --shards) has only the shards a "
                                   "request touches rewound. The input adapter is never modified.",
                       epilog="example: llmeraser unlearn --adapter adapters/original --train data/train.jsonl "
                              "--request request.json --out adapters/unlearned   (every default: --method auto "
                              "rewinds or replays the recorded path, else one influence step; 'llmeraser unlearn "
                              "... --method rewind' is exact retraining from the first edited step)")
    add_adapter_flags(p)
    p.add_argument("--request", nargs="+",
                   help='request JSON: {"edits": [{"op": "remove", "id": ...}, ...]}; several: applied in order, '
                        'batched into one update (one replay for all of them; with --ledger each on record)')
    p.add_argument("--out", help="new adapter folder (must not exist or be empty)")
    p.add_argument("--holdout", default=None, metavar="FILE",
                   help="examples of the training data's kind and format that the adapter never saw: the report's "
                        "'evidence' then holds a membership test of the edited examples against them, before and "
                        "after (do they now look like unseen examples? docs/evidence.md); without, it says it "
                        "cannot tell. For an adapter without a recording, auto then unlearns with simnpo and stops "
                        "once the test (calibrated by the base model) finds the examples as familiar as the holdout "
                        "(docs/forget.md)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    p.add_argument("--method", default="auto", choices=method_names(), help=methods_help())
    add_fields(p, EraserArguments, skip=("solver_args", "progress", "l2", "damping", "method"), keep_default=False)
    p.add_argument("--damping", default=None, metavar="λ|auto",
                   help="λ in (H + λI)⁻¹, absolute; larger is safer but shrinks Δθ. Default: --relative-damping × "
                        "the curvature's largest eigenvalue (the same meaning on any model). 'auto': the λ that "
                        "'llmeraser tune-damping' chose on validation data for this adapter; when it found that no "
                        "λ beats no update, the adapter is written unchanged and the report says so (see --force)")
    p.add_argument("--force", action="store_true",
                   help="with --damping auto: write the update even when validation said it makes things worse")
    p.add_argument("--l2", type=float, default=None, help="the L2 coefficient of the fine-tuning objective "
                                                              "(default: the adapter's report.json, else 0)")
    p.add_argument("--factors", default=None, metavar="DIR",
                   help="fitted solvers: the factor store (default: ADAPTER.factors beside the adapter); fitted "
                        "there on first use, reused while the adapter's and the training set's hashes match")
    p.add_argument("--refit-fraction", type=float, default=REFIT_FRACTION,
                   help="fitted solvers: the new adapter inherits the factors (OUT.factors) until the examples "
                        "edited since the fit exceed this fraction of the training set; then the next request refits")
    add_fields(p, solver_cls(), prefix="solver-", keep_default=False)
    add_fields(p, PathArguments, prefix="path-", keep_default=False)
    add_fields(p, RefineArguments, prefix="refine-", keep_default=False)
    add_fields(p, ForgetArguments, prefix="forget-", keep_default=False)
    p.add_argument("--ledger", default=None, metavar="DIR",
                   help="record the request in the ledger in DIR (created on first use; its root is --adapter). "
                        "With a ledger, --train is the ORIGINAL training set: the applied requests are replayed "
                        "on it, --adapter must be the lineage's head, an applied request is a no-op")
    when = p.add_argument_group("collecting requests until a deadline (with --ledger; "
                                "docs/ledger.md#the-backlog-collect-until-a-deadline)")
    when.add_argument("--queue", action="store_true",
                      help="put --request in the ledger's backlog instead of applying it (checked against the "
                           "lineage now; no --out)")
    when.add_argument("--deadline", default=None, metavar="WHEN",
                      help="with --queue: by when the request must be applied: a duration (30d, 6h) or an ISO 8601 "
                           "time (2027-01-31T00:00Z); default none (applied with the next batch)")
    when.add_argument("--backlog", action="store_true",
                      help="apply every queued request as one update (one replay for all; each on record) to --out")
    when.add_argument("--due-within", default=None, metavar="DURATION",
                      help="with --backlog: apply only when the earliest deadline is within DURATION (e.g. 6h: what "
                           "the replay takes plus the time to the next run); otherwise write nothing and say when")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.eraser import EraserArguments
    from llmeraser.replay import PathArguments, RefineArguments
    from llmeraser.sharded import is_sharded
    from llmeraser.updates import UnlearnOptions
    from llmeraser.updates.stop import ForgetArguments

    requests = _requests(args)
    if requests is None:  # queued, or nothing due
        return 0
    if is_sharded(args.adapter):
        return _sharded(args, requests)
    damping = args.damping if args.damping in (None, "auto") else float_arg("--damping", args.damping)
    given = pick(args, EraserArguments, skip=("solver_args", "progress", "damping", "l2", "method"))
    options = UnlearnOptions(
        method=args.method, eraser=EraserArguments(**given, progress=not args.quiet), damping=damping,
        force=args.force, refit_fraction=args.refit_fraction, ledger=args.ledger,
        solver_options=pick(args, solver_cls(), prefix="solver-"),
        path=PathArguments(**pick(args, PathArguments, prefix="path-")),
        refine=RefineArguments(**pick(args, RefineArguments, prefix="refine-")),
        forget=ForgetArguments(**pick(args, ForgetArguments, prefix="forget-")))
    result = job(args, l2=args.l2).unlearn(requests, args.out, options, holdout=args.holdout)
    print(result.message)
    if result.factors_note:
        print(f"factors: {result.factors_note}")
    return 0


def _requests(args: argparse.Namespace) -> list | None:
    """The requests to apply now — the --request files, or the ledger's backlog (`ledger.backlog.take`) — or None
    when there is nothing to apply now: --queue put them in the backlog, or the backlog is not due (said, exit 0)."""
    from llmeraser.errors import ConfigError
    from llmeraser.ledger import Ledger
    from llmeraser.ledger import backlog as bl
    from llmeraser.request import load_request

    if (args.queue or args.backlog) and not args.ledger:
        raise ConfigError("--queue and --backlog work on a ledger's backlog: give --ledger DIR")
    if args.queue == args.backlog == bool(args.request) or args.backlog and args.request:
        raise ConfigError("give --request FILE… (to apply now, or with --queue to queue), or --backlog (to apply "
                          "the queued requests)")
    if (args.deadline and not args.queue) or (args.due_within and not args.backlog):
        raise ConfigError("--deadline goes with --queue, --due-within with --backlog")
    if not args.queue and not args.out:
        raise ConfigError("--out is required (the new adapter folder)")
    if args.queue and args.out:
        raise ConfigError("--queue writes no adapter: drop --out (apply the backlog later with --backlog --out)")
    for path in args.request or [None]:  # before anything is written: neither output may overwrite an input
        given = argparse.Namespace(**{**vars(args), "request": path})
        if args.queue:
            check_outputs(given, args.ledger, new=False, what="ledger")
        else:
            check_outputs(given, args.out, ledger=args.ledger)
    if not (args.queue or args.backlog):
        return [load_request(r) for r in args.request]
    now = bl.now()
    with Ledger(args.ledger, create=args.queue) as book:
        if args.queue:
            due = bl.deadline(args.deadline, now) if args.deadline else None
            print(bl.submit(book, [load_request(r) for r in args.request], _train(args), args.adapter, due=due,
                            now=now))
            return None
        requests, why = bl.take(book, bl.duration(args.due_within) if args.due_within else None, now)
    print(why)
    return requests or None


def _train(args: argparse.Namespace) -> list:
    """The training set as the adapter reads it (a single adapter's record fields, or a sharded folder's)."""
    from llmeraser.cli.common import fields
    from llmeraser.sharded import ShardedAdapter, is_sharded

    if is_sharded(args.adapter):
        return ShardedAdapter.read(args.adapter).load_train(args.train, fields(args))
    return job(args).train


def _sharded(args: argparse.Namespace, requests: list) -> int:
    """A sharded adapter (`sharded.unlearn_sharded`): the touched shards rewound, exactly; one-step and path options
    do not apply."""
    from llmeraser.cli.common import fields
    from llmeraser.errors import ConfigError
    from llmeraser.evidence import summary
    from llmeraser.sharded import ShardedAdapter, unlearn_sharded

    if args.method not in ("auto", "rewind"):
        raise ConfigError(f"{args.adapter} is a sharded adapter: unlearn rewinds the shards a request touches (exact "
                          f"retraining of those shards); --method {args.method} does not apply to it")
    sharded = ShardedAdapter.read(args.adapter)
    train = sharded.load_train(args.train, fields(args))
    holdout = sharded.load_train(args.holdout, fields(args)) if args.holdout else None
    report = unlearn_sharded(args.adapter, train, requests, args.out, ledger=args.ledger, holdout=holdout,
                             base_model=args.base_model, dtype=args.dtype, device=args.device,
                             progress=not args.quiet)
    if report["status"] != "applied":
        print(report["message"])
        return 0
    touched = report["touched_shards"]
    print(f"rewound {len(touched)} of {report['shards']} shards ({', '.join(touched)}): "
          f"exact retraining of those shards, {report['replayed_share']:.0%} of all shards' steps replayed, "
          f"{report['seconds']:.1f} s\nevidence: {summary(report['evidence'])}\nsharded adapter: {args.out}")
    return 0
