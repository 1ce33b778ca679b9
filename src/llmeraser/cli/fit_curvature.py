"""`llmeraser fit-curvature`: fit curvature factors once, for fast requests (`job.AdapterJob.fit_curvature`)."""

from __future__ import annotations

import argparse

from llmeraser.cli.common import FMT, add_adapter_flags, add_fields, check_store, job, pick


def add_parser(sub) -> argparse.ArgumentParser:
    from llmeraser.factors import FactorArguments
    from llmeraser.solvers.api import solver_names

    p = sub.add_parser("fit-curvature", formatter_class=FMT,
                       help="fit K-FAC / EK-FAC / Woodbury / DataInf curvature once, for fast requests",
                       description="One pass over a sample of the training set (forward and backward over at "
                                   "most 2,048 examples by default: --samples) fits curvature factors for every "
                                   "trainable linear layer of the adapter and stores them (safetensors) keyed by the "
                                   "adapter's and the training set's hashes. "
                                   "Later 'unlearn --solver KIND' requests reuse them: each then costs about the "
                                   "gradients of its own edited examples.",
                       epilog="example: llmeraser fit-curvature --adapter adapters/original --train data/train.jsonl "
                              "--kind ekfac woodbury")
    add_adapter_flags(p)
    p.add_argument("--kind", nargs="+", default=["ekfac"], choices=solver_names(fitted=True),
                   help="ekfac: Kronecker eigenbasis with exact diagonal (memory independent of N); kfac: plain "
                        "Kronecker factors; woodbury: exact inverse of the fitted examples' Fisher (stores their "
                        "N × p gradients and an N × N system); datainf: per-layer approximation of that inverse, "
                        "no N × N system")
    p.add_argument("--factors", default=None, metavar="DIR", help="the store (default: ADAPTER.factors)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    add_fields(p, FactorArguments, skip=("progress",))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.factors import FactorArguments
    from llmeraser.table import format_table

    check_store(args)
    fa = FactorArguments(**pick(args, FactorArguments, skip=("progress",)), progress=not args.quiet)
    rows = job(args).fit_curvature(args.kind, fa)
    print(format_table(rows, [("kind", "kind", ""), ("n", "examples", "d"), ("tokens", "tokens", "d"),
                              ("pass", "pass s", ".1f"), ("extra", "eigen/gram s", ".1f"), ("total", "total s", ".1f"),
                              ("mib", "MiB", ".1f"), ("path", "stored in", "")]))
    print(f"one pass over {rows[0]['n']:,} examples served {len(rows)} fit(s); 'llmeraser unlearn --solver "
          f"{args.kind[0]}' now costs about the request's own gradients")
    return 0
