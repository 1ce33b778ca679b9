"""`llmeraser finetune`: fine-tune a LoRA adapter on the objective the eraser assumes (`finetune.finetune_adapter`)."""

from __future__ import annotations

import argparse

from llmeraser.cli.common import TRAIN_HELP, add_common, add_data_flags, add_fields, check_outputs, fields, pick


def add_parser(sub) -> argparse.ArgumentParser:
    from llmeraser.finetune import FinetuneArguments
    from llmeraser.record import DEFAULT_MAX_LENGTH, PEFT_KINDS, LoraSettings

    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter (the objective the eraser assumes)",
                       description="Fine-tune LoRA on R(θ) = mean response NLL + (l2/2)‖θ‖², dropout off, "
                                   "deterministic. Writes the adapter (safetensors), report.json and, with Adam, "
                                   "the recorded trajectory (trajectory.safetensors: θ₀ and every step's gradient) "
                                   "that lets 'unlearn' rewind exactly or replay the path (docs/path.md).",
                       epilog="example: llmeraser finetune --train data/train.jsonl --out adapters/original "
                              "--epochs 1 --lr 1e-3")
    add_common(p)
    p.add_argument("--train", required=True, help=TRAIN_HELP.replace(" the adapter was fine-tuned on", ""))
    add_data_flags(p)
    p.add_argument("--out", required=True, help="new adapter folder (must not exist or be empty)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="tokens per example (prompt cut from the left)")
    p.add_argument("--lora-r", type=int, default=LoraSettings.r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=LoraSettings.alpha, help="LoRA alpha (scale alpha/r)")
    p.add_argument("--lora-targets", default=",".join(LoraSettings.targets),
                   help="comma-separated module names (every kind but prompt and prefix)")
    p.add_argument("--peft", default="lora", choices=PEFT_KINDS,
                   help="the adapter kind: lora, rslora (LoRA scaled alpha/√r), dora (weight-decomposed LoRA), ia3, "
                        "loha, lokr, prompt (prompt tuning), prefix (prefix tuning)")
    p.add_argument("--virtual-tokens", type=int, default=LoraSettings.virtual_tokens,
                   help="prompt and prefix tuning: the number of virtual tokens")
    p.add_argument("--shards", type=int, default=1,
                   help="S > 1: partition the data into S shards and fine-tune one recorded adapter per shard (SISA), "
                        "written as one folder; 'unlearn' then retrains only the shards a request touches, exactly "
                        "(docs/sharded.md)")
    p.add_argument("--shard-by", default=None, metavar="FIELD",
                   help="with --shards: the record field naming each example's data subject (a user, a person, a "
                        "document), so that one subject lives in one shard (default: every example its own subject)")
    add_fields(p, FinetuneArguments, skip=("progress",))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from llmeraser.data import load_examples
    from llmeraser.finetune import FinetuneArguments, finetune_adapter
    from llmeraser.record import LoraSettings

    check_outputs(args, args.out)
    given = fields(args)
    train = load_examples(args.train, given)
    ft = FinetuneArguments(**pick(args, FinetuneArguments), progress=not args.quiet)
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, kind=args.peft, virtual_tokens=args.virtual_tokens,
                        targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    recipe = {"base_model": args.base_model, "dtype": args.dtype, "device": args.device, "lora": lora, "args": ft,
              "max_length": args.max_length, "fields": given, "announce": None if args.quiet else print}
    if args.shards != 1 or args.shard_by:
        from llmeraser.sharded import finetune_sharded

        sharded = finetune_sharded(train, args.out, shards=args.shards, by=args.shard_by, **recipe)
        sizes = ", ".join(map(str, sharded.partition.sizes()))
        by = f", each {args.shard_by!r} in one shard" if args.shard_by else ""
        print(f"fine-tuned {len(train)} examples as {args.shards} shards of {sizes} examples{by}, in "
              f"{sharded.manifest['seconds']:.1f} s\nsharded adapter: {args.out}")
        return 0
    result = finetune_adapter(train, args.out, **recipe).result
    print(f"fine-tuned {len(train)} examples in {result.seconds:.1f} s: last epoch's loss {result.losses[-1]:.4f}, "
          f"R(θ) = {result.objective:.4f}, ‖∇R‖ = {result.grad_norm:.2e}\nadapter: {args.out}")
    return 0
