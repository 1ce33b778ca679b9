"""`llmeraser` command line. Exit codes: 0 success, 2 bad input or usage, 1 internal failure.

Flags are built from the same argument dataclasses the library uses (FinetuneArguments, EraserArguments,
SolverArguments), so the help text and validation live in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from llmeraser.errors import LLMEraserError, UserInputError

_TYPES = {"int": int, "float": float, "str": str, "float | None": float, "int | None": int, "str | None": str,
          "bool": bool}


# ----------------------------------------------------------------------------------------------------- helpers
def add_fields(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: tuple[str, ...] = (),
               keep_default: bool = True) -> None:
    """One flag per dataclass field: --PREFIXNAME, typed, with the field's help and default.

    With keep_default=False the flag defaults to None (unset), so a preset or a stored value can fill it in later.
    """
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip or f.type not in _TYPES:
            continue
        default = f.default if keep_default else argparse.SUPPRESS  # unset: absent, `pick` reads None
        shown = "the solver's preset" if prefix == "solver-" else f.default
        kind = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else {"type": _TYPES[f.type]}
        group.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{prefix.replace('-', '_')}{f.name}",
                           default=default, help=f"{f.metadata.get('help', '')} (default: {shown})", **kind)


def pick(args: argparse.Namespace, cls: type, *, prefix: str = "", skip: tuple[str, ...] = ()) -> dict:
    """The values of `cls`'s flags that were given (None = unset)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f"{prefix.replace('-', '_')}{f.name}", None)
        if f.name not in skip and value is not None:
            out[f.name] = value
    return out


# ---------------------------------------------------------------------------------------------------- commands
def cmd_finetune(args: argparse.Namespace) -> int:
    from llmeraser import distributed
    from llmeraser.data import examples_hash, load_examples
    from llmeraser.finetune import FinetuneArguments, finetune
    from llmeraser.models import load_base_model
    from llmeraser.params import save_adapter
    from llmeraser.record import LoraSettings, finetune_record, lora_model
    from llmeraser.task import CausalLMTask

    _check_outputs(args, args.out)
    fields = _fields(args)
    train = load_examples(args.train, fields)
    distributed.check_same({"training set": examples_hash(train)}, "checking the inputs")
    ft = FinetuneArguments(**pick(args, FinetuneArguments), progress=not args.quiet)
    base, tokenizer = load_base_model(args.base_model, dtype=args.dtype, device=args.device)
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, kind=args.peft, virtual_tokens=args.virtual_tokens,
                        targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    model = lora_model(base, lora, seed=ft.seed)
    result = finetune(model, CausalLMTask(tokenizer, max_length=args.max_length), train, ft)
    record = finetune_record(max_length=args.max_length, l2=ft.l2, lora=lora, base_model=args.base_model,
                             dtype=args.dtype, train_sha256=examples_hash(train))
    if fields is not None:
        record["data_fields"] = fields.to_dict()
    report = {"kind": "finetune", "task": record,
              "arguments": dataclasses.asdict(ft), "lora": lora.to_dict(), "train_sha256": examples_hash(train),
              "n_train": len(train), "result": result.to_dict()}
    write_more = result.trajectory.save if result.trajectory is not None else None
    distributed.on_rank0(lambda: str(save_adapter(model, args.out, report=report, write_more=write_more)),
                         "writing the adapter")
    print(f"fine-tuned {len(train)} examples in {result.seconds:.1f} s: last epoch's loss {result.losses[-1]:.4f}, "
          f"R(θ) = {result.objective:.4f}, ‖∇R‖ = {result.grad_norm:.2e}\nadapter: {args.out}")
    return 0


def _check_outputs(args: argparse.Namespace, out: str | os.PathLike, **kwargs) -> None:
    """`io.check_output_paths` on `out` (and kwargs: ledger, new, what) against every input path the command was given,
    before any work."""
    from llmeraser.io import check_output_paths

    base = getattr(args, "base_model", "default")
    inputs = {"adapter": getattr(args, "adapter", None), "training set": getattr(args, "train", None),
              "request": getattr(args, "request", None), "validation set": getattr(args, "valid", None),
              "base model": None if base == "default" else base}
    check_output_paths(out, inputs=inputs, **kwargs)


def _store(args: argparse.Namespace) -> None:
    """Check the factor store that fit-curvature and tune-damping write (--factors, default ADAPTER.factors)."""
    from llmeraser.factors import default_store

    _check_outputs(args, args.factors or default_store(args.adapter), new=False, what="factor store")


def _fields(args: argparse.Namespace):
    """The DataFields given on the command line, or None when none was (then: the record's, else the defaults)."""
    from llmeraser.data import DataFields

    given = pick(args, DataFields)
    if getattr(args, "no_id_field", False):
        given["id_field"] = None
    return DataFields(**given) if given else None


def _job(args: argparse.Namespace, **record):
    from llmeraser.job import AdapterJob

    return AdapterJob(args.adapter, args.train, base_model=args.base_model, dtype=args.dtype, device=args.device,
                      max_length=args.max_length, fields=_fields(args), factors=getattr(args, "factors", None),
                      progress=not args.quiet, **record)


def cmd_unlearn(args: argparse.Namespace) -> int:
    from llmeraser.eraser import EraserArguments
    from llmeraser.replay import PathArguments, RefineArguments
    from llmeraser.updates import UnlearnOptions

    _check_outputs(args, args.out, ledger=args.ledger)
    damping = args.damping if args.damping in (None, "auto") else _float_arg("--damping", args.damping)
    given = pick(args, EraserArguments, skip=("solver_args", "progress", "damping", "l2", "method"))
    options = UnlearnOptions(
        method=args.method, eraser=EraserArguments(**given, progress=not args.quiet), damping=damping,
        force=args.force, refit_fraction=args.refit_fraction, ledger=args.ledger,
        solver_options=pick(args, _solver_cls(), prefix="solver-"),
        path=PathArguments(**pick(args, PathArguments, prefix="path-")),
        refine=RefineArguments(**pick(args, RefineArguments, prefix="refine-")))
    result = _job(args, l2=args.l2).unlearn(args.request, args.out, options)
    print(result.message)
    if result.factors_note:
        print(f"factors: {result.factors_note}")
    return 0


def _float_arg(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserInputError(f"{flag} takes a number or 'auto', got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise UserInputError(f"{flag} must be a finite number ≥ 0, got {text!r}")
    return value


def cmd_fit_curvature(args: argparse.Namespace) -> int:
    from llmeraser.factors import FactorArguments
    from llmeraser.table import format_table

    _store(args)
    fa = FactorArguments(**pick(args, FactorArguments, skip=("progress",)), progress=not args.quiet)
    rows = _job(args).fit_curvature(args.kind, fa)
    print(format_table(rows, [("kind", "kind", ""), ("n", "examples", "d"), ("tokens", "tokens", "d"),
                              ("pass", "pass s", ".1f"), ("extra", "eigen/gram s", ".1f"), ("total", "total s", ".1f"),
                              ("mib", "MiB", ".1f"), ("path", "stored in", "")]))
    print(f"one pass over the training set served {len(rows)} fit(s); 'llmeraser unlearn --solver {args.kind[0]}' "
          f"now costs about the request's own gradients")
    return 0


def cmd_tune_damping(args: argparse.Namespace) -> int:
    from llmeraser.damping import DampingArguments
    from llmeraser.table import format_table

    _store(args)
    damping_args = DampingArguments(**{k: tuple(v) if k == "dampings" else v
                                       for k, v in pick(args, DampingArguments).items()})
    result, path = _job(args).tune_damping(args.valid, damping_args, solver=args.solver, fisher=args.fisher,
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


def cmd_ledger(args: argparse.Namespace) -> int:
    from llmeraser.ledger import Ledger
    from llmeraser.table import format_table

    with Ledger(args.dir, create=False) as ledger:
        if args.action == "show":
            root = ledger.root() or {}
            print(f"lineage root: {root.get('root_adapter')} (sha256 {str(root.get('root_sha256'))[:12]}…), "
                  f"training set {str(root.get('train_sha256'))[:12]}… ({root.get('n_train')} examples), "
                  f"since {root.get('created')}\n")
            rows = [{"seq": e.seq, "time": e.updated, "status": e.status, "request": e.request_sha256[:12],
                     "edits": " ".join(f"{k}={v}" for k, v in e.request.counts().items() if v),
                     "input": e.input_sha256[:12], "output": (e.output_sha256 or e.staged_sha256 or "")[:12],
                     "solver": f"{e.report['method']}/{e.report['solver']}" if e.report else "",
                     "residual": e.report["solve"]["residual"] if e.report else float("nan"),
                     "note": e.error or (e.output_adapter if e.status == "applied" else "")}
                    for e in ledger.entries()]
            print(format_table(rows, [("seq", "#", "d"), ("time", "updated (UTC)", ""), ("status", "status", ""),
                                      ("request", "request", ""), ("edits", "edits", ""), ("input", "input", ""),
                                      ("output", "output", ""), ("solver", "solver", ""),
                                      ("residual", "residual", ".1e"), ("note", "output folder / error", "")])
                  if rows else "no requests yet")
            return 0
        problems = ledger.verify()
        applied = len(ledger.entries("applied"))
    if problems:
        print("\n".join(f"MISMATCH {p}" for p in problems))
        print(f"ledger {args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ledger {args.dir}: the root and {applied} applied request(s) match their recorded sha256")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from llmeraser.data import load_examples
    from llmeraser.io import atomic_write_json
    from llmeraser.metrics import evaluate
    from llmeraser.models import load_base_model
    from llmeraser.params import load_adapter
    from llmeraser.record import DEFAULT_MAX_LENGTH, TrainingRecord
    from llmeraser.task import CausalLMTask

    data = load_examples(args.data, _fields(args))
    record = TrainingRecord(max_length=DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length)
    if args.adapter:
        record = TrainingRecord.read(args.adapter, max_length=args.max_length)
        if record.warning(args.adapter) and "max_length" in record.assumed:
            logging.getLogger(__name__).warning("%s", record.warning(args.adapter))
    base, tokenizer = load_base_model(args.base_model, dtype=args.dtype, device=args.device)
    model = load_adapter(base, args.adapter, trainable=False) if args.adapter else base
    task = CausalLMTask(tokenizer, max_length=record.length, rendering=record.rendering)
    task.calibrate(data)
    result = evaluate(model, task, data, batch_size=args.batch_size, progress=not args.quiet)
    if args.out:
        atomic_write_json(args.out, result)
    summary = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_ids(args: argparse.Namespace) -> int:
    from llmeraser.data import describe, load_examples
    from llmeraser.table import format_table

    examples = load_examples(args.train, _fields(args))
    shown = [e for e in examples if not args.grep or args.grep.lower() in describe(e, width=10**9).lower()]
    rows = [{"id": e.id, "shape": e.shape, "text": describe(e, width=args.width)} for e in shown[: args.limit]]
    print(format_table(rows, [("id", "id", ""), ("shape", "shape", ""), ("text", "prompt → response", "")]))
    more = f" (first {args.limit} shown)" if len(shown) > args.limit else ""
    example = json.dumps({"edits": [{"op": "remove", "id": shown[0].id if shown else "ID"}]})
    print(f"{len(shown)} of {len(examples)} examples{' match ' + repr(args.grep) if args.grep else ''}{more}; name "
          f"them in a request: {example}")
    return 0


def cmd_data_movielens(args: argparse.Namespace) -> int:
    from llmeraser.experiments.movielens import build_splits, default_folder, write_splits, yes_ratio

    folder = args.folder or default_folder()
    splits = build_splits(folder, n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test, seed=args.seed)
    write_splits(splits, args.out, seed=args.seed, source=folder)
    for name, examples in splits.items():
        print(f"{name:5s} {len(examples):5d} examples, {yes_ratio(examples):.0%} Yes -> {Path(args.out) / name}.jsonl")
    return 0


def cmd_data_people(args: argparse.Namespace) -> int:
    from llmeraser.experiments.people import build_people, write_people

    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.seed)
    paths = write_people(data, args.out, seed=args.seed, sizes={"n_people": args.n_people, "facts": args.facts,
                                                                "n_heldout": args.n_heldout})
    for name, path in paths.items():
        print(f"{name:9s} -> {path}")
    return 0


def cmd_corrupt(args: argparse.Namespace) -> int:
    from llmeraser.data import load_examples
    from llmeraser.experiments.corrupt import corrupt, write_corruption

    corrupted, request = corrupt(load_examples(args.train), kind=args.kind, ratio=args.ratio, seed=args.seed)
    write_corruption(corrupted, request, args.out)
    print(f"corrupted {len(request.edits)} of {len(corrupted)} examples ({args.kind}); the request that undoes it: "
          f"{Path(args.out) / 'request.json'}; corrupted training set: {Path(args.out) / 'train.jsonl'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llmeraser.experiments.demo import run_movielens_demo, run_tiny_demo
    from llmeraser.table import format_table

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
    print(f"\nunlearned adapter: {result['adapter']}\nreport:            {result['report']}")
    return 0


def _solver_cls() -> type:
    from llmeraser.solvers.base import SolverArguments

    return SolverArguments


# ------------------------------------------------------------------------------------------------------ parser
TRAIN_HELP = ("the training data the adapter was fine-tuned on: JSONL, JSON, parquet or a datasets save_to_disk "
              "folder; records {id, prompt, response}, TRL's {prompt, completion} or chats {messages} (docs/data.md)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder")
    p.add_argument("--dtype", default="float32",
                   help="of the base model: float32 (default), float64, bfloat16 or float16 (the adapter, its "
                        "gradients, curvature products and solves stay float32)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when there is one, else the CPU; under torchrun each rank's own), cpu, "
                        "cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _data_flags(p: argparse.ArgumentParser) -> None:
    """The record-field flags of a command that reads training data (unset: the adapter's record, else defaults)."""
    from llmeraser.data import DataFields

    add_fields(p, DataFields, keep_default=False)
    p.add_argument("--no-id-field", action="store_true",
                   help="the records have no id: every example's id comes from its content (see 'llmeraser data ids')")


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags and help, one block per command: declarative and long on purpose (no logic here; the
    option dataclasses supply most flags through `add_fields`)."""
    from llmeraser.damping import DEFAULT_GRID, DampingArguments
    from llmeraser.eraser import EraserArguments
    from llmeraser.factors import FactorArguments
    from llmeraser.finetune import FinetuneArguments
    from llmeraser.record import DEFAULT_MAX_LENGTH, PEFT_KINDS, LoraSettings
    from llmeraser.replay import PathArguments, RefineArguments
    from llmeraser.solvers.api import solver_names
    from llmeraser.updates import method_names, methods_help
    from llmeraser.updates.base import REFIT_FRACTION

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="llmeraser",
        description="Make a PEFT-fine-tuned LLM forget or correct training examples without retraining "
                    "(influence-function unlearning, LLMEraser).",
        epilog="Run 'llmeraser COMMAND --help' for a command's options and an example. Exit codes: 0 success, "
               "2 bad input or usage, 1 internal failure. Data-parallel (finetune, unlearn, fit-curvature, "
               "tune-damping): 'torchrun --standalone --nproc-per-node N -m llmeraser unlearn ...' (gloo on CPU, "
               "nccl on GPUs; $LLMERASER_DIST_TIMEOUT seconds for a silent rank, default 1800).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter (the objective the eraser assumes)",
                       description="Fine-tune LoRA on R(θ) = mean response NLL + (l2/2)‖θ‖², dropout off, "
                                   "deterministic. Writes the adapter (safetensors), report.json and, with Adam, "
                                   "the recorded trajectory (trajectory.safetensors: θ₀ and every step's gradient) "
                                   "that lets 'unlearn' rewind exactly or replay the path (docs/path.md).",
                       epilog="example: llmeraser finetune --train data/train.jsonl --out adapters/original "
                              "--epochs 1 --lr 1e-3")
    _common(p)
    p.add_argument("--train", required=True, help=TRAIN_HELP.replace(" the adapter was fine-tuned on", ""))
    _data_flags(p)
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
    add_fields(p, FinetuneArguments, skip=("progress",))
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("unlearn", help="apply a request (remove / modify_query / correct_response) to an adapter",
                       description="Write a new adapter that behaves as if fine-tuned without (or with corrected) "
                                   "examples, plus report.json (request hash, method and why, solver, damping, "
                                   "residual, timings, ‖Δθ‖). With the adapter's recorded trajectory the default "
                                   "(--method auto) rewinds exactly or replays the path; without, one influence "
                                   "step (LLMEraser). The input adapter is never modified.",
                       epilog="example: llmeraser unlearn --adapter adapters/original --train data/train.jsonl "
                              "--request request.json --out adapters/unlearned   (every default: --method auto "
                              "rewinds or replays the recorded path, else one influence step; 'llmeraser unlearn "
                              "... --method rewind' is exact retraining from the first edited step)")
    _common(p)
    p.add_argument("--adapter", required=True, help="the fine-tuned PEFT adapter folder")
    p.add_argument("--train", required=True, help=TRAIN_HELP)
    _data_flags(p)
    p.add_argument("--request", required=True, help='request JSON: {"edits": [{"op": "remove", "id": ...}, ...]}')
    p.add_argument("--out", required=True, help="new adapter folder (must not exist or be empty)")
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
    add_fields(p, _solver_cls(), prefix="solver-", keep_default=False)
    add_fields(p, PathArguments, prefix="path-", keep_default=False)
    add_fields(p, RefineArguments, prefix="refine-", keep_default=False)
    p.add_argument("--ledger", default=None, metavar="DIR",
                   help="record the request in the ledger in DIR (created on first use; its root is --adapter). "
                        "With a ledger, --train is the ORIGINAL training set: the applied requests are replayed "
                        "on it, --adapter must be the lineage's head, an applied request is a no-op")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("fit-curvature", formatter_class=fmt,
                       help="fit K-FAC / EK-FAC / Woodbury / DataInf curvature once, for fast requests",
                       description="One pass over the training set (forward and backward, like a training epoch) "
                                   "fits curvature factors for every trainable linear layer of the adapter and "
                                   "stores them (safetensors) keyed by the adapter's and the training set's hashes. "
                                   "Later 'unlearn --solver KIND' requests reuse them: each then costs about the "
                                   "gradients of its own edited examples.",
                       epilog="example: llmeraser fit-curvature --adapter adapters/original --train data/train.jsonl "
                              "--kind ekfac woodbury")
    _common(p)
    p.add_argument("--adapter", required=True, help="the fine-tuned PEFT adapter folder")
    p.add_argument("--train", required=True, help=TRAIN_HELP)
    _data_flags(p)
    p.add_argument("--kind", nargs="+", default=["ekfac"], choices=solver_names(fitted=True),
                   help="ekfac: Kronecker eigenbasis with exact diagonal (memory independent of N); kfac: plain "
                        "Kronecker factors; woodbury: exact inverse of the N-example Fisher (stores N × p "
                        "gradients and an N × N system); datainf: per-layer approximation of that inverse, no "
                        "N × N system")
    p.add_argument("--factors", default=None, metavar="DIR", help="the store (default: ADAPTER.factors)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    add_fields(p, FactorArguments, skip=("progress",))
    p.set_defaults(func=cmd_fit_curvature)

    p = sub.add_parser("tune-damping", formatter_class=fmt, help="choose λ on validation data (held-out removals)",
                       description="Choose the damping λ on VALIDATION data: for a few random held-out removals "
                                   "from the training set, compare each λ's predicted change of every validation "
                                   "example's loss with the actual change (a warm-started fine-tune without them, "
                                   "minus one with them). The score is the squared error relative to predicting no "
                                   "change: below 1 the update helps. Stores the choice for 'unlearn --damping "
                                   "auto'. Costs (trials + 1) fine-tuning epochs.",
                       epilog="example: llmeraser tune-damping --adapter adapters/original --train data/train.jsonl "
                              "--valid data/valid.jsonl --solver ekfac")
    _common(p)
    p.add_argument("--adapter", required=True, help="the fine-tuned PEFT adapter folder")
    p.add_argument("--train", required=True, help=TRAIN_HELP)
    _data_flags(p)
    p.add_argument("--valid", required=True, help="validation JSONL (held out from training; never the test set)")
    p.add_argument("--solver", default="auto", choices=[*solver_names(path=True), "auto"],
                   help="the solver whose λ is chosen")
    p.add_argument("--fisher", default="mc", choices=["mc", "empirical"], help="fitted solvers: which Fisher")
    p.add_argument("--seed", type=int, default=0, help="seed of the removal sets, fine-tunes and fitted targets")
    p.add_argument("--factors", default=None, metavar="DIR", help="the store (default: ADAPTER.factors)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    p.add_argument("--dampings", type=float, nargs="+", default=list(DEFAULT_GRID), help="the λ grid")
    add_fields(p, DampingArguments, skip=("dampings", "seed"))
    p.set_defaults(func=cmd_tune_damping)

    p = sub.add_parser("ledger", formatter_class=fmt, help="show or verify the history of an adapter lineage",
                       description="show: every request of the lineage (status, hashes, solver, residual). verify: "
                                   "recompute the sha256 of the root and of every applied output adapter and check "
                                   "the chain; exit 1 on any mismatch.",
                       epilog="example: llmeraser ledger verify runs/ledger")
    p.add_argument("action", choices=["show", "verify"], help="what to do")
    p.add_argument("dir", help="the ledger folder (given to 'unlearn --ledger')")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("evaluate", help="response loss per example, and AUC/accuracy for Yes/No data",
                       description="Evaluate a base model (+ adapter) on a JSONL file.",
                       epilog="example: llmeraser evaluate --adapter adapters/unlearned --data data/test.jsonl "
                              "--out eval.json")
    _common(p)
    p.add_argument("--adapter", default=None, help="PEFT adapter folder (default: the base model alone)")
    p.add_argument("--data", required=True, help="data to evaluate on (the formats of --train elsewhere)")
    _data_flags(p)
    p.add_argument("--out", default=None, help="write the full JSON (with per-example losses) here")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("data", help="list a training set's ids, or build a dataset (movielens, people)",
                       description="'ids': list the ids of training data as 'unlearn' reads it. Build training "
                                   "data: 'movielens': a TALLRec-style Yes/No task from the "
                                   "MovieLens-100k files inside the recbole wheel (read in place, never copied). "
                                   "'people': facts about fictitious people, for the generative benchmark.")
    data_sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    q = data_sub.add_parser("ids", formatter_class=fmt, help="list a training set's ids, to name them in a request",
                            description="Read training data as 'unlearn' reads it and list each example's id, shape "
                                        "and a preview. Records without ids get stable ids from their content.",
                            epilog="example: llmeraser data ids --train chat.jsonl --grep 'Jane Doe'")
    q.add_argument("--train", required=True, help=TRAIN_HELP.replace(" the adapter was fine-tuned on", ""))
    _data_flags(q)
    q.add_argument("--grep", default=None, help="only the examples whose text contains this (case-insensitive)")
    q.add_argument("--limit", type=int, default=50, help="rows to show at most")
    q.add_argument("--width", type=int, default=70, help="characters of each preview")
    q.set_defaults(func=cmd_data_ids)
    q = data_sub.add_parser("movielens", formatter_class=fmt, help="MovieLens-100k → train/valid/test JSONL",
                            description="The user's recent liked and disliked titles, then 'Will the user like X?'; "
                                        "response ' Yes' (rating ≥ 4) or ' No'. Split by time; ids 'u<user>-<item>'.",
                            epilog="example: llmeraser data movielens --out data --n-train 400")
    q.add_argument("--out", required=True, help="folder for train/valid/test.jsonl and meta.json")
    q.add_argument("--n-train", type=int, default=400, help="training examples")
    q.add_argument("--n-valid", type=int, default=100, help="validation examples")
    q.add_argument("--n-test", type=int, default=200, help="test examples")
    q.add_argument("--seed", type=int, default=0, help="sampling seed")
    q.add_argument("--folder", default=None, help="an ml-100k folder in recbole's format (default: recbole's)")
    q.set_defaults(func=cmd_data_movielens)
    q = data_sub.add_parser("people", formatter_class=fmt, help="fictitious people's facts → QA JSONL + requests",
                            description="A TOFU-shaped set built offline from our own word lists (docs/people.md): "
                                        "each person's facts as 'Question: …\\nAnswer:' records with paraphrased "
                                        "and perturbed answers in each record's extra keys; held-out people (never to "
                                        "be trained on); general-knowledge probes; and requests: forget01/05/10 "
                                        "(remove every fact of 1/5/10% of the people, at least one) and correct "
                                        "(one person's facts replaced). The same sizes and seed give the same bytes.",
                            epilog="example (the benchmark's fine-tune, which memorises the facts): llmeraser data "
                                   "people --out people && llmeraser finetune --train people/train.jsonl --out "
                                   "adapters/people --epochs 8 --lr 2e-3 --lora-targets q_proj,k_proj,v_proj,"
                                   "o_proj,gate_proj,up_proj,down_proj && llmeraser unlearn --adapter "
                                   "adapters/people --train people/train.jsonl --request "
                                   "people/requests/forget05.json --out adapters/people-forget05")
    q.add_argument("--out", required=True, help="folder for train/heldout/general.jsonl, requests/ and meta.json")
    q.add_argument("--n-people", type=int, default=30, help="people trained on")
    q.add_argument("--facts", type=int, default=6, help="facts per person")
    q.add_argument("--n-heldout", type=int, default=4, help="people never trained on (membership inference)")
    q.add_argument("--seed", type=int, default=0, help="seed of every draw")
    q.set_defaults(func=cmd_data_people)

    p = sub.add_parser("corrupt", formatter_class=fmt,
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
    p.set_defaults(func=cmd_corrupt)

    p = sub.add_parser("demo", formatter_class=fmt, help="the main job, end to end on the embedded model and data",
                       description="MovieLens-100k data, a LoRA fine-tune of SmolLM2-135M-Instruct (cached after the "
                                   "first run), a removal request for the users with the most examples, unlearning, "
                                   "and a table of original vs unlearned (vs retrained with --with-retrain). "
                                   "--tiny runs the same path on a tiny model built offline, in seconds.",
                       epilog="example: llmeraser demo --out runs/demo --with-retrain")
    p.add_argument("--out", help="folder for the unlearned adapter and report (default: a new temporary folder)")
    p.add_argument("--base-model", default="default", help="'default' or a local Hugging Face model folder")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default 400; tiny: 60)")
    p.add_argument("--users", type=int, default=3, help="users whose examples are removed")
    p.add_argument("--with-retrain", action="store_true", help="also retrain without them (minutes)")
    p.add_argument("--damping", type=float, default=None,
                   help="λ of the unlearning solve (default: 0.3, chosen on validation data by bench/tune_damping.py)")
    p.add_argument("--curvature-samples", type=int, default=8, help="training examples the curvature is estimated on")
    p.add_argument("--tiny", action="store_true", help="the tiny offline model instead of the embedded one")
    p.add_argument("--remove", type=int, default=2, help="--tiny: examples to remove")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_libraries(*, quiet: bool, debug: bool) -> None:
    """transformers' own warnings and weight-loading bars are noise here; keep them only with --debug."""
    import warnings

    from transformers.utils import logging as hf_logging

    if not debug:
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)
    if quiet:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


DISTRIBUTED_COMMANDS = ("finetune", "unlearn", "fit-curvature", "tune-damping")


class Terminated(BaseException):
    """SIGTERM (torchrun stops the other ranks so when one fails): raised so that cleanup runs, like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM")


def _offline() -> None:
    """No network, ever: the Hugging Face libraries' offline mode, set before they are imported (huggingface_hub reads
    it at import; peft's hub lookups read the environment when called)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "huggingface_hub" in sys.modules:  # imported already (in process, by the caller): tell it too
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def main(argv: list[str] | None = None) -> int:
    _offline()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import signal

    from llmeraser import distributed

    rank, prefix = 0, "llmeraser"
    if distributed.launched():  # one of several ranks under torchrun
        if args.command not in DISTRIBUTED_COMMANDS:
            print(f"llmeraser: error: '{args.command}' does not run data-parallel; run it without torchrun (these "
                  f"do: {', '.join(DISTRIBUTED_COMMANDS)})", file=sys.stderr)
            return 2
        rank = int(os.environ.get("RANK", "0"))
        prefix = f"llmeraser [rank {rank}/{os.environ.get('WORLD_SIZE')}]"
        if rank != 0:  # rank 0 prints and shows progress; the others work quietly
            args.quiet = True
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — for the life of the process
    _quiet_libraries(quiet=getattr(args, "quiet", False), debug=args.debug)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    completed = False
    try:
        if distributed.launched():
            distributed.init_from_env()
        code = args.func(args)
        completed = True
        return code
    except distributed.Mirrored:  # rank 0's bad input: rank 0 reports it
        return 2
    except UserInputError as e:
        if args.debug:
            raise
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prefix}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except (LLMEraserError, Exception) as e:  # noqa: BLE001 — one line, never a traceback, unless --debug
        if args.debug:
            raise
        print(f"{prefix}: failed: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.shutdown(completed=completed)


if __name__ == "__main__":
    sys.exit(main())
