"""`llmeraser tune-damping`: choose λ on validation data and store it (`job.AdapterJob.tune_damping`)."""

from __future__ import annotations

import argparse

from llmeraser.cli.common import FMT, add_adapter_flags, add_fields, check_store, job, pick


def add_parser(sub) -> argparse.ArgumentParser:
    from llmeraser.damping import DEFAULT_GRID, DampingArguments
    from llmeraser.solvers.api import solver_names

    p = sub.add_parser("tune-damping", formatter_class=FMT, help="choose λ on validation data (held-out removals)",
                       description="Choose the damping λ on VALIDATION data: for a few random held-out removals "
                                   "from the training set, compare each λ's predicted change of every validation "
                                   "example's loss with the actual change (a warm-started fine-tune without them, "
                                   "minus one with them). The score is the squared error relative to predicting no "
                                   "change: below 1 the update helps. Stores the choice for 'unlearn --damping "
                                   "auto'. Costs (trials + 1) fine-tuning epochs.",
                       epilog="example: llmeraser tune-damping --adapter adapters/original --train data/train.jsonl "
                              "--valid data/valid.jsonl --solver ekfac")
    add_adapter_flags(p)
    p.add_argument("--valid", required=True, help="validation JSONL (held out from training; never the test set)")
    p.add_argument("--solver", default="auto", choices=[*solver_names(path=True), "auto"],
                   help="the solver whose λ is chosen")
    p.add_argument("--fisher", default="mc", choices=["mc", "empirical"], help="fitted solvers: which Fisher")
    p.add_argument("--seed", type=int, default=0, help="seed of the removal sets, fine-tunes and fitted targets")
    p.add_argument("--factors", default=None, metavar="DIR", help="the store (default: ADAPTER.factors)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    p.add_argument("--dampings", type=float, nargs="+", default=list(DEFAULT_GRID), help="the λ grid")
    add_fields(p, DampingArguments, skip=("dampings", "seed"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.damping import DampingArguments
    from llmeraser.table import format_table

    check_store(args)
    damping_args = DampingArguments(**{k: tuple(v) if k == "dampings" else v
                                       for k, v in pick(args, DampingArguments).items()})
    result, path = job(args).tune_damping(args.valid, damping_args, solver=args.solver, fisher=args.fisher,
                                          seed=args.seed)
    print(format_table([{**r, "chosen": "←" if r["damping"] == result["chosen"] else ""} for r in result["scores"]],
                       [("damping", "λ", "g"), ("score", "error/no-update", ".3f"), ("pearson", "pearson r", ".3f"),
                        ("chosen", "", "")]))
    verdict = ("no λ beat no update: the update does not help this adapter at these removal sizes, so 'unlearn "
               "--damping auto' will decline (write the adapter unchanged) unless given --force"
               if result["declines"] else f"chosen λ = {result['chosen']:g}")
    print(f"{verdict} ({result['trials']} held-out removals of {result['removal_size']} examples, "
          f"{result['seconds']:.0f} s); saved in {path}; use it with 'llmeraser unlearn --damping auto'")
    return 0
