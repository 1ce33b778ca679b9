"""`llmeraser evaluate`: response loss per example, and AUC/accuracy for Yes/No data (`job.AdapterJob.evaluate`)."""

from __future__ import annotations

import argparse
import json

from llmeraser.cli.common import add_common, add_data_flags, fields


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="response loss per example, and AUC/accuracy for Yes/No data",
                       description="Evaluate a base model (+ adapter) on a JSONL file.",
                       epilog="example: llmeraser evaluate --adapter adapters/unlearned --data data/test.jsonl "
                              "--out eval.json")
    add_common(p)
    p.add_argument("--adapter", default=None,
                   help="PEFT adapter folder (default: the base model alone), or a sharded adapter (each example "
                        "answered by the shard its router picks)")
    p.add_argument("--data", required=True, help="data to evaluate on (the formats of --train elsewhere)")
    add_data_flags(p)
    p.add_argument("--out", default=None, help="write the full JSON (with per-example losses) here")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--aggregate", default="top1", choices=["top1", "weighted", "ensemble"],
                   help="a sharded adapter: top1 answers each example with the shard its router picks (one pass); "
                        "weighted (APA-style) with every shard's LoRA update summed, weighted per example by the "
                        "router (one pass; plain LoRA only); ensemble (SISA-style) with every shard's answer mixed, "
                        "weighted by the router (S passes). top1 suits queries about trained subjects (the people "
                        "benchmark); on queries no shard has seen (MovieLens' new users) it pools shards whose scores "
                        "sit on different scales: test AUC 0.55 against the ensemble's 0.68 at S = 4 "
                        "(docs/sharded.md#serving-top-1-weighted-or-ensemble)")
    p.add_argument("--temperature", type=float, default=0.05,
                   help="with --aggregate weighted or ensemble: the router's softmax temperature over cosine "
                        "similarities (smaller: closer to top-1; large: the shards alike)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.errors import ConfigError
    from llmeraser.io import atomic_write_json
    from llmeraser.job import AdapterJob
    from llmeraser.serving import evaluate_sharded
    from llmeraser.sharded import ShardedAdapter, is_sharded

    common = {"base_model": args.base_model, "dtype": args.dtype, "device": args.device,
              "max_length": args.max_length, "batch_size": args.batch_size, "progress": not args.quiet}
    if args.adapter and is_sharded(args.adapter):  # each example answered by the shard its router picks
        data = ShardedAdapter.read(args.adapter).load_train(args.data, fields(args))
        result = evaluate_sharded(args.adapter, data, aggregate=args.aggregate, temperature=args.temperature,
                                  **common)
    else:
        if args.aggregate != "top1":
            raise ConfigError(f"--aggregate {args.aggregate} combines the shards of a sharded adapter; --adapter is "
                              f"not one")
        result = AdapterJob.evaluate(args.adapter, args.data, fields=fields(args), **common)
    if args.out:
        atomic_write_json(args.out, result)
    summary = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    print(json.dumps(summary, indent=2))
    return 0
