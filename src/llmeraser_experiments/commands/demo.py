"""`llmeraser demo`: the main job end to end on the embedded model and data, or (--tiny) on a tiny offline model."""

from __future__ import annotations

import argparse
import tempfile

from llmeraser.cli.common import FMT


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", formatter_class=FMT, help="the main job, end to end on the embedded model and data",
                       description="MovieLens-100k data, a recorded LoRA fine-tune of SmolLM2-135M-Instruct "
                                   "(cached after the first run), a removal request for the users with the most "
                                   "examples, 'llmeraser unlearn' with no options beside the paper's one-step "
                                   "update, and a table of original vs unlearned vs retrained (without the "
                                   "retraining: --no-with-retrain). --tiny runs the same path on a tiny model built "
                                   "offline, in seconds.",
                       epilog="example: llmeraser demo --out runs/demo")
    p.add_argument("--out", help="folder for the unlearned adapter and report (default: a new temporary folder)")
    p.add_argument("--base-model", default="default", help="'default' or a local Hugging Face model folder")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default 400; tiny: 60)")
    p.add_argument("--users", type=int, default=3, help="users whose examples are removed")
    p.add_argument("--with-retrain", action=argparse.BooleanOptionalAction, default=True,
                   help="also retrain without them (cached after the first run), the reference the table compares "
                        "with; --no-with-retrain skips it")
    p.add_argument("--damping", type=float, default=None,
                   help="λ of the paper's one-step row (default: 0.3, chosen on validation data by "
                        "bench/tune_damping.py); the unlearn row takes every default")
    p.add_argument("--curvature-samples", type=int, default=8, help="training examples the curvature is estimated on")
    p.add_argument("--tiny", action="store_true", help="the tiny offline model instead of the embedded one")
    p.add_argument("--remove", type=int, default=2, help="--tiny: examples to remove")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.table import format_table
    from llmeraser_experiments.demo import run_movielens_demo, run_tiny_demo

    out = args.out or tempfile.mkdtemp(prefix="llmeraser-demo-")
    if args.tiny:
        result = run_tiny_demo(out, n=args.n_train or 60, remove=args.remove, progress=not args.quiet)
        print(f"tiny LoRA Llama, {result['n_train']} training facts, removing {', '.join(result['removed'])} "
              f"(fine-tuned to ‖∇R‖ = {result['grad_norm']:.1e})\n")
        columns = [("method", "method", ""), ("forget_loss", "forget loss", ".4f"),
                   ("retain_loss", "retain loss", ".4f"), ("delta_norm", "‖Δθ‖", ".4f"),
                   ("cosine", "cos(Δθ, retrain)", ".3f"), ("residual", "residual", ".1e"),
                   ("seconds", "seconds", ".2f")]
    else:
        result = run_movielens_demo(out, base_model=args.base_model, n_train=args.n_train or 400,
                                    users=args.users, with_retrain=args.with_retrain,
                                    curvature_samples=args.curvature_samples, progress=not args.quiet,
                                    **({} if args.damping is None else {"damping": args.damping}))
        print(f"\nSmolLM2-135M-Instruct + LoRA, MovieLens-100k: {result['n_train']} training examples, "
              f"{result['n_test']} test; request: remove all {len(result['removed'])} examples of users "
              f"{', '.join(map(str, result['users']))}\n")
        columns = [("method", "method", ""), ("test_auc", "test AUC", ".4f"), ("test_acc", "test acc", ".3f"),
                   ("forget_loss", "forget loss", ".4f"), ("delta_norm", "‖Δθ‖", ".4f"),
                   ("residual", "residual", ".1e"), ("seconds", "seconds", ".1f")]
    print(format_table(result["rows"], columns))
    if result.get("choice"):
        print(f"\nunlearn with no options: {result['choice']}")
    print(f"\nunlearned adapter: {result['adapter']}\nreport:            {result['report']}")
    return 0
