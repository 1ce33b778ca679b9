"""`llmeraser` command line. Exit codes: 0 success, 2 bad input or usage, 1 internal failure."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile

from llmeraser.errors import LLMEraserError, UserInputError


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["—" if isinstance(r[k], float) and math.isnan(r[k]) else format(r[k], f)
                      for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from llmeraser.demo import run_tiny_demo

    out = args.out or tempfile.mkdtemp(prefix="llmeraser-demo-")
    result = run_tiny_demo(out, n=args.n_train, remove=args.remove, progress=not args.quiet)
    print(f"tiny LoRA Llama, {result['n_train']} training facts, removing {', '.join(result['removed'])} "
          f"(fine-tuned to ‖∇R‖ = {result['grad_norm']:.1e})\n")
    print(format_table(result["rows"], [("method", "method", ""), ("forget_loss", "forget loss", ".4f"),
                                        ("retain_loss", "retain loss", ".4f"), ("delta_norm", "‖Δθ‖", ".4f"),
                                        ("cosine", "cos(Δθ, retrain)", ".3f"), ("residual", "residual", ".1e"),
                                        ("seconds", "seconds", ".2f")]))
    print(f"\nunlearned adapter: {result['adapter']}\nreport:            {result['report']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmeraser",
        description="Make a PEFT-fine-tuned LLM forget or correct training examples without retraining "
                    "(influence-function unlearning, LLMEraser).",
        epilog="Run 'llmeraser COMMAND --help' for a command's options and an example.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="end-to-end demo on a tiny model built offline (seconds)",
                          description="Fine-tune a tiny LoRA Llama on synthetic facts, remove a few, and compare "
                                      "unlearning with retraining.",
                          epilog="example: llmeraser demo --out runs/demo")
    demo.add_argument("--out", help="folder for the adapters and report (default: a new temporary folder)")
    demo.add_argument("--n-train", type=int, default=60, help="training examples (default 60)")
    demo.add_argument("--remove", type=int, default=2, help="examples to remove (default 2)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserInputError as e:
        if args.debug:
            raise
        print(f"llmeraser: error: {e}", file=sys.stderr)
        return 2
    except (LLMEraserError, RuntimeError, MemoryError) as e:
        if args.debug:
            raise
        print(f"llmeraser: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmeraser: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
