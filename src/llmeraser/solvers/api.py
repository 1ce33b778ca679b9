"""Solvers by name: look one up, build its arguments from its preset, and run it.

Importing this module imports every solver module, which registers them in `SOLVERS` and `PRESETS`.
"""

from __future__ import annotations

import dataclasses

import torch

from llmeraser.errors import ConfigError
from llmeraser.solvers import cg, dense, lissa, sqp  # noqa: F401  (imported to register the solvers)
from llmeraser.solvers.base import PRESETS, SOLVERS, LinearOperator, Solver, SolverArguments, SolveResult

_FIELDS = {f.name for f in dataclasses.fields(SolverArguments)}


def get_solver(name: str) -> Solver:
    """The solver registered as `name`.

    Raises:
        ConfigError: no solver has that name (the message lists the known ones).
    """
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; known solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def solver_arguments(name: str, **overrides: object) -> SolverArguments:
    """SolverArguments for solver `name`: the defaults, then its preset, then `overrides` (None values skipped,
    so unset command-line options keep the preset).

    Raises:
        ConfigError: unknown solver, unknown option, or a value out of range.
    """
    get_solver(name)
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown solver option(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return SolverArguments(**{**PRESETS[name], **given})


def solve(name: str, op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments | None = None,
          **overrides: object) -> SolveResult:
    """Solve (H + λI) x = b with solver `name`.

    Args:
        name: a registered solver (dense, cg, lissa, sqp, paper).
        op: the operator H.
        b: right-hand side, length op.dim.
        damping: λ ≥ 0.
        args: complete arguments; None builds them with `solver_arguments(name, **overrides)`.
        **overrides: SolverArguments fields to change (applied on top of `args` when given).
    """
    solver = get_solver(name)
    if args is None:
        args = solver_arguments(name, **overrides)
    elif overrides:
        unknown = sorted(set(overrides) - _FIELDS)
        if unknown:
            raise ConfigError(f"unknown solver option(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
        args = dataclasses.replace(args, **{k: v for k, v in overrides.items() if v is not None})
    return solver(op, b, damping, args)
