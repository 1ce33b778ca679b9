"""The solver registry's front: look a solver up, ask what it is, build its arguments from its preset, run it.

Importing this module imports every solver module, which registers them in `SOLVERS`: the iterative ones
(dense, cg, lissa, sqp, paper; one file each) and the fitted ones (kfac, ekfac, woodbury, datainf; `llmeraser.factors`).
"""

from __future__ import annotations

import dataclasses

import torch

import llmeraser.factors  # noqa: F401  (registers the fitted solvers)
from llmeraser.errors import ConfigError
from llmeraser.solvers import cg, dense, lissa, sqp  # noqa: F401  (imported to register the solvers)
from llmeraser.solvers.base import SOLVERS, LinearOperator, SolverArguments, SolveResult, SolverSpec

_FIELDS = {f.name for f in dataclasses.fields(SolverArguments)}


def get_solver(name: str) -> SolverSpec:
    """The solver registered as `name` (callable for the iterative ones).

    Raises:
        ConfigError: no solver has that name (the message lists the known ones).
    """
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; known solvers: {', '.join(sorted(SOLVERS))}, auto")
    return SOLVERS[name]


def is_fitted(name: str) -> bool:
    """Whether `name` solves with curvature fitted once per adapter (False for 'auto' and iterative solvers)."""
    return name in SOLVERS and SOLVERS[name].fitted


def solver_names(*, fitted: bool | None = None, path: bool | None = None) -> list[str]:
    """The registered solvers (iterative first), optionally only the (non-)fitted or path-capable ones."""
    names = [n for n, s in SOLVERS.items()
             if (fitted is None or s.fitted == fitted) and (path is None or s.path == path)]
    return sorted(names, key=lambda n: SOLVERS[n].fitted)  # iterative first


def solver_arguments(name: str, **overrides: object) -> SolverArguments | None:
    """SolverArguments for solver `name`: the defaults, then its preset, then `overrides` (None values skipped,
    so unset command-line options keep the preset). None for a fitted solver (a direct solve has no options).

    Raises:
        ConfigError: unknown solver, unknown option, or a value out of range.
    """
    spec = get_solver(name)
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown solver option(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    if spec.fitted:
        return None
    given = {k: v for k, v in overrides.items() if v is not None}
    return SolverArguments(**{**spec.preset, **given})


def solve(name: str, op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments | None = None,
          **overrides: object) -> SolveResult:
    """Solve (H + λI) x = b with iterative solver `name`.

    Args:
        name: a registered iterative solver (dense, cg, lissa, sqp, paper).
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
