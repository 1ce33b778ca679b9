"""`llmeraser` command line. Exit codes: 0 success, 2 bad input or usage, 1 internal failure.

One module per command (`COMMANDS`), each with `add_parser(sub)` (its flags, help and example) and `run(args)`; more
commands come from plug-ins, found by their package's entry points (`PLUGINS`: the experiments' add `data movielens`,
`data people`, `corrupt` and `demo`; the library imports none of them). The flags are built from the same argument
dataclasses the library uses (FinetuneArguments, EraserArguments, SolverArguments, ...; `common.add_fields`), so the
help text and validation live in one place. This module owns what every command shares: the parser's top level, offline
mode, logging, torchrun ranks, SIGTERM and the mapping of errors to exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from llmeraser.cli.common import add_fields, pick
from llmeraser.errors import LLMEraserError, UserInputError

__all__ = ["COMMANDS", "DISTRIBUTED_COMMANDS", "PLUGINS", "add_fields", "build_parser", "main", "pick", "plugins"]

# the modules of llmeraser.cli, one per command, in the order `llmeraser --help` lists them (the plug-ins' after)
COMMANDS = ("finetune", "unlearn", "fit_curvature", "tune_damping", "ledger", "evaluate", "verify", "data")
# the entry-point group of command plug-ins (pyproject.toml's [project.entry-points."llmeraser.commands"]): each a
# callable add_commands(commands, datasets) that adds its subparsers to the top level's (`llmeraser COMMAND`) and to
# the `data` command's (`llmeraser data DATASET`); loaded in name order
PLUGINS = "llmeraser.commands"
DISTRIBUTED_COMMANDS = ("finetune", "unlearn", "fit-curvature", "tune-damping")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module adds its own subparser, then each plug-in its own."""
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
    added = {name: importlib.import_module(f"llmeraser.cli.{name}").add_parser(sub) for name in COMMANDS}
    for plugin in plugins():
        try:
            add_commands = plugin.load()
        except Exception as e:  # noqa: BLE001 — a broken plug-in costs its own commands, not the library's
            print(f"llmeraser: warning: command plug-in {plugin.name!r} ({plugin.value}) not loaded: "
                  f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            continue
        add_commands(commands=sub, datasets=added["data"])
    return parser


def plugins() -> list:
    """The command plug-ins installed: the entry points of group `PLUGINS`, in name order."""
    from importlib.metadata import entry_points

    return sorted(entry_points(group=PLUGINS), key=lambda ep: ep.name)


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


def _rank_prefix(args: argparse.Namespace) -> str | None:
    """The prefix of this process's messages ('llmeraser', or with its rank under torchrun; rank 0 alone prints and
    shows progress); None when the command does not run data-parallel (said on stderr: exit 2)."""
    from llmeraser import distributed

    if not distributed.launched():
        return "llmeraser"
    if args.command not in DISTRIBUTED_COMMANDS:
        print(f"llmeraser: error: '{args.command}' does not run data-parallel; run it without torchrun (these "
              f"do: {', '.join(DISTRIBUTED_COMMANDS)})", file=sys.stderr)
        return None
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # the other ranks work quietly
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — for the life of the process
    return f"llmeraser [rank {rank}/{os.environ.get('WORLD_SIZE')}]"


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
    prefix = _rank_prefix(args)
    if prefix is None:
        return 2
    _quiet_libraries(quiet=getattr(args, "quiet", False), debug=args.debug)
    return _run(args, prefix)


def _out_of_memory() -> tuple[type[BaseException], ...]:
    """torch's out-of-memory errors, looked up only when an exception reaches the handler (--help loads no torch)."""
    from llmeraser.resources import OUT_OF_MEMORY

    return OUT_OF_MEMORY


def _run(args: argparse.Namespace, prefix: str) -> int:
    """The command, its errors as exit codes (2 bad input, 1 internal failure, 130 Ctrl-C, 143 SIGTERM): one line on
    stderr, never a traceback unless --debug."""
    import signal

    from llmeraser import distributed

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
    except _out_of_memory() as e:  # one the library did not name (it names fits and updates): the advice
        if args.debug:
            raise
        from llmeraser.resources import OOM_ADVICE, oom_detail

        print(f"{prefix}: error: '{args.command}' ran out of device memory ({oom_detail(e)}); "
              f"{OOM_ADVICE.get(args.command, 'lower --batch-size')}", file=sys.stderr)
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
