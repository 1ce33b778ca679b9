"""What the commands share: flags built from the library's argument dataclasses (`add_fields`, `pick`), the common
and data flags, the up-front output checks and the adapter job a command works on."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

from llmeraser.errors import UserInputError


class FMT(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each flag's default shown once: the flags built from a dataclass field (`add_fields`) say theirs
    already (or the solver's preset), so argparse adds none to them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "(default: " in (action.help or "") else super()._get_help_string(action)

_TYPES = {"int": int, "float": float, "str": str, "float | None": float, "int | None": int, "str | None": str,
          "bool": bool}

TRAIN_HELP = ("the training data the adapter was fine-tuned on: JSONL, JSON, parquet or a datasets save_to_disk "
              "folder; records {id, prompt, response}, TRL's {prompt, completion} or chats {messages} (docs/data.md)")


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


def add_common(p: argparse.ArgumentParser) -> None:
    """--base-model, --dtype, --device and --quiet: every command that loads a model."""
    p.add_argument("--base-model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder")
    p.add_argument("--dtype", default="float32",
                   help="of the base model: float32 (default), float64, bfloat16 or float16 (the adapter, its "
                        "gradients, curvature products and solves stay float32)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when there is one, else the CPU; under torchrun each rank's own), cpu, "
                        "cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_adapter_flags(p: argparse.ArgumentParser) -> None:
    """The common flags, the adapter, its training set and the training set's record fields: what a command that
    works on a fine-tuned adapter reads (unlearn, fit-curvature, tune-damping)."""
    add_common(p)
    p.add_argument("--adapter", required=True, help="the fine-tuned PEFT adapter folder")
    p.add_argument("--train", required=True, help=TRAIN_HELP)
    add_data_flags(p)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The record-field flags of a command that reads training data (unset: the adapter's record, else defaults)."""
    from llmeraser.data import DataFields

    add_fields(p, DataFields, keep_default=False)
    p.add_argument("--no-id-field", action="store_true",
                   help="the records have no id: every example's id comes from its content (see 'llmeraser data ids')")


def fields(args: argparse.Namespace):
    """The DataFields given on the command line, or None when none was (then: the record's, else the defaults)."""
    from llmeraser.data import DataFields

    given = pick(args, DataFields)
    if getattr(args, "no_id_field", False):
        given["id_field"] = None
    return DataFields(**given) if given else None


def check_outputs(args: argparse.Namespace, out: str | os.PathLike, **kwargs) -> None:
    """`io.check_output_paths` on `out` (and kwargs: ledger, new, what) against every input path the command was given,
    before any work."""
    from llmeraser.io import check_output_paths

    base = getattr(args, "base_model", "default")
    inputs = {"adapter": getattr(args, "adapter", None), "training set": getattr(args, "train", None),
              "request": getattr(args, "request", None), "validation set": getattr(args, "valid", None),
              "base model": None if base == "default" else base}
    check_output_paths(out, inputs=inputs, **kwargs)


def check_store(args: argparse.Namespace) -> None:
    """Check the factor store that fit-curvature and tune-damping write (--factors, default ADAPTER.factors)."""
    from llmeraser.factors import default_store

    check_outputs(args, args.factors or default_store(args.adapter), new=False, what="factor store")


def job(args: argparse.Namespace, **record):
    """The `AdapterJob` on --adapter and --train with the command's model, data and store flags."""
    from llmeraser.job import AdapterJob

    return AdapterJob(args.adapter, args.train, base_model=args.base_model, dtype=args.dtype, device=args.device,
                      max_length=args.max_length, fields=fields(args), factors=getattr(args, "factors", None),
                      progress=not args.quiet, **record)


def float_arg(flag: str, text: str) -> float:
    """`text` as a finite number ≥ 0, else a UserInputError naming `flag`."""
    try:
        value = float(text)
    except ValueError:
        raise UserInputError(f"{flag} takes a number or 'auto', got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise UserInputError(f"{flag} must be a finite number ≥ 0, got {text!r}")
    return value


def solver_cls() -> type:
    """`SolverArguments` (imported when a parser is built, not when the package is)."""
    from llmeraser.solvers.base import SolverArguments

    return SolverArguments
