"""The experiments' commands, a plug-in of `llmeraser`'s command line: `llmeraser data movielens`, `data people`,
`corrupt` and `demo` (one module each for corrupt and demo, one for the datasets; each with its parser and run).

Registered in pyproject.toml under the entry-point group `llmeraser.commands` (`llmeraser.cli.PLUGINS`); the library
finds it there and never imports this package.
"""

from __future__ import annotations

import argparse

# the modules of the top-level commands, in the order `llmeraser --help` lists them (after the library's)
COMMANDS = ("corrupt", "demo")


def add_commands(commands: argparse._SubParsersAction, datasets: argparse._SubParsersAction) -> None:
    """Add this package's commands to `llmeraser`'s: `commands` the top level's subparsers (`llmeraser COMMAND`),
    `datasets` the `data` command's (`llmeraser data DATASET`)."""
    import importlib

    importlib.import_module("llmeraser_experiments.commands.data").add_parser(datasets)
    for name in COMMANDS:
        importlib.import_module(f"llmeraser_experiments.commands.{name}").add_parser(commands)
