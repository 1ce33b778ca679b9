"""What every solver shares: the linear-operator protocol, arguments, results and the name registry.

A solver finds x with (H + λI) x = b, where H is given as a `LinearOperator` (a dense matrix wrapped by
`MatrixOperator`, or a curvature operator over training data from `llmeraser.curvature`). Solvers know nothing
of models or requests: they see matrix-vector products only, so each is unit-tested on explicit matrices first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch

from llmeraser.errors import ConfigError, SolverError

logger = logging.getLogger(__name__)


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric operator H = (1/N) Σᵢ Hᵢ given by products.

    Attributes:
        dim: size of the vectors it acts on.
        num_terms: N, the number of terms of the finite sum (1 for a plain matrix).
        dtype, device: of the vectors it takes and returns.
    """

    dim: int
    num_terms: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v over all terms."""

    def sample_matvec(self, v: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(1/|S|) Σ_{i∈S} Hᵢ v for the terms S = indices: an unbiased estimate of H v."""


class MatrixOperator:
    """A dense symmetric matrix, or a finite sum of them, as a `LinearOperator`.

    Args:
        matrix: (dim, dim) H, or (N, dim, dim) terms Hᵢ with H = mean over i.
    """

    def __init__(self, matrix: torch.Tensor):
        if matrix.dim() == 2:
            matrix = matrix.unsqueeze(0)
        if matrix.dim() != 3 or matrix.shape[-1] != matrix.shape[-2]:
            raise ConfigError(f"expected a square matrix or a stack of them, got shape {tuple(matrix.shape)}")
        self.terms = matrix  # (N, dim, dim)
        self.mean = matrix.mean(0)  # (dim, dim)
        self.num_terms, self.dim = matrix.shape[0], matrix.shape[-1]
        self.dtype, self.device = matrix.dtype, matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.mean @ v

    def sample_matvec(self, v: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return (self.terms[indices] @ v).mean(0)


class CountingOperator:
    """Wraps an operator and counts its products (full and mini-batch) for the diagnostics."""

    def __init__(self, op: LinearOperator):
        self.op = op
        self.dim, self.num_terms, self.dtype, self.device = op.dim, op.num_terms, op.dtype, op.device
        self.full_products = 0
        self.sample_products = 0
        self.sampled_terms = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.full_products += 1
        return self.op.matvec(v)

    def sample_matvec(self, v: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self.sample_products += 1
        self.sampled_terms += len(indices)
        return self.op.sample_matvec(v, indices)

    @property
    def hvps_equivalent(self) -> float:
        """Products counted in full passes over the N terms (a mini-batch of size B counts B/N)."""
        return self.full_products + self.sampled_terms / max(self.num_terms, 1)


@dataclass
class SolverArguments:
    """Options of the inverse-HVP solvers. Each solver reads the fields it needs; the rest are ignored."""

    tol: float = field(default=1e-6, metadata={"help": "stop when ‖(H+λI)x − b‖/‖b‖ ≤ tol"})
    max_iters: int = field(default=200, metadata={"help": "budget of operator products (iterations)"})
    batch_size: int = field(default=0, metadata={"help": "terms per stochastic product (lissa, sqp); 0 = all"})
    lr: float = field(default=0.0, metadata={"help": "sqp step size; 0 = 1/‖H+λI‖ estimated by power iteration"})
    optimizer: str = field(default="sgd", metadata={"help": "sqp optimiser: sgd or adam"})
    scale: float = field(default=0.0, metadata={"help": "lissa scale, > ‖H+λI‖; 0 = estimated by power iteration"})
    check_every: int = field(default=10, metadata={"help": "stochastic solvers: full residual every k steps"})
    max_dense_dim: int = field(default=8192, metadata={"help": "dense refuses problems larger than this"})
    seed: int = field(default=0, metadata={"help": "seed of the mini-batch sampler"})

    def __post_init__(self) -> None:
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ConfigError(f"solver tol must be a finite number ≥ 0, got {self.tol}")
        if self.max_iters < 1:
            raise ConfigError(f"solver max_iters must be ≥ 1, got {self.max_iters}")
        if self.batch_size < 0:
            raise ConfigError(f"solver batch_size must be ≥ 0, got {self.batch_size}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"solver lr must be a finite number ≥ 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"solver optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (self.scale >= 0 and math.isfinite(self.scale)):
            raise ConfigError(f"lissa scale must be a finite number ≥ 0, got {self.scale}")
        if self.check_every < 1:
            raise ConfigError(f"solver check_every must be ≥ 1, got {self.check_every}")


@dataclass
class SolveResult:
    """x and the diagnostics of how it was found."""

    x: torch.Tensor
    solver: str
    residual: float  # ‖(H+λI)x − b‖/‖b‖, computed with the full operator
    converged: bool
    iterations: int
    hvps: float  # operator products in full-pass equivalents
    seconds: float
    history: list[float] = field(default_factory=list)  # relative residuals seen along the way
    ritz: tuple[float, float] | None = None  # (min, max) eigenvalue estimates of H on the Krylov space, if known
    damping: float | None = None  # the λ solved with, when the solver chose it (a relative damping)

    def diagnostics(self) -> dict:
        d = asdict(self)
        d.pop("x")
        return d


Solver = Callable[[LinearOperator, torch.Tensor, float, SolverArguments], SolveResult]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver. Iterative ones (`run` set) solve from operator products over the training data on every
    request; fitted ones (`fitted`) invert a curvature approximation fitted once per adapter (`llmeraser.factors`).
    `path`: one run serves every damping (`UnlearningProblem.path`). Calling a spec runs an iterative solver."""

    name: str
    run: Solver | None = None
    preset: dict = field(default_factory=dict)
    fitted: bool = False
    path: bool = False
    help: str = ""

    def __call__(self, op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments) -> SolveResult:
        if self.run is None:
            raise ConfigError(f"solver {self.name!r} is fitted: it solves with factors fitted for the adapter "
                              f"(UnlearningProblem, or llmeraser.factors.Factors.solve), not from operator products")
        return self.run(op, b, damping, args)


SOLVERS: dict[str, SolverSpec] = {}  # every solver, iterative and fitted: the one registry


def register(name: str, *, path: bool = False, help: str = "", **preset: object) -> Callable[[Solver], Solver]:
    """Register an iterative solver under `name`; `preset` gives SolverArguments defaults the user may override."""

    def wrap(fn: Solver) -> Solver:
        SOLVERS[name] = SolverSpec(name, run=fn, preset=preset, path=path, help=help)
        return fn

    return wrap


def register_fitted(name: str, help: str) -> None:
    """Register a fitted solver (its factors come from `llmeraser.factors`; every damping from one fit)."""
    SOLVERS[name] = SolverSpec(name, fitted=True, path=True, help=help)


def damped(op: LinearOperator, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ (H + λI) v with full products."""
    return lambda v: op.matvec(v) + damping * v


def relative_residual(op: LinearOperator, x: torch.Tensor, b: torch.Tensor, damping: float) -> float:
    """‖(H+λI)x − b‖ / ‖b‖ (one full product)."""
    return float(torch.linalg.vector_norm(damped(op, damping)(x) - b) / torch.linalg.vector_norm(b))


def check_finite(name: str, value: torch.Tensor | float, what: str) -> None:
    """Raise SolverError if `value` holds NaN or Inf."""
    ok = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(value)
    if not ok:
        raise SolverError(f"solver {name!r}: {what} became non-finite; try a larger --damping, a smaller step "
                          f"(lr/scale), or --solver cg")


def power_iteration(op: LinearOperator, damping: float, iters: int = 20, seed: int = 0) -> float:
    """Estimate of the largest eigenvalue of H + λI (used to set step sizes); costs `iters` full products."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64)  # host: the same start on every device
    v = v.to(dtype=op.dtype, device=op.device)
    v /= torch.linalg.vector_norm(v)
    lam = 0.0
    for _ in range(iters):
        w = damped(op, damping)(v)
        lam = float(torch.dot(v, w))
        nrm = torch.linalg.vector_norm(w)
        check_finite("power_iteration", nrm, "the iterate's norm")
        if nrm == 0:
            return max(lam, damping)
        v = w / nrm
    return lam


def check_problem(name: str, op: LinearOperator, b: torch.Tensor, damping: float) -> torch.Tensor:
    """Validate the right-hand side and the damping of a solve; return b on the operator's dtype and device.

    Raises:
        ConfigError: b is not a vector of length op.dim, or damping is not a finite number ≥ 0.
        SolverError: b holds NaN or Inf (it was computed upstream, e.g. from gradients).
    """
    if not isinstance(b, torch.Tensor) or b.dim() != 1 or b.shape[0] != op.dim:
        shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ConfigError(f"solver {name!r}: b must be a vector of length {op.dim} (the operator's dim), got {shape}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"solver {name!r}: damping must be a finite number ≥ 0, got {damping}")
    if not bool(torch.isfinite(b).all()):
        raise SolverError(f"solver {name!r}: the right-hand side b holds {int((~torch.isfinite(b)).sum())} "
                          f"non-finite entries; the gradients it came from are NaN or Inf")
    return b.to(dtype=op.dtype, device=op.device)


def zero_result(name: str, b: torch.Tensor) -> SolveResult:
    """The exact answer x = 0 for b = 0, found without any product."""
    return SolveResult(x=torch.zeros_like(b), solver=name, residual=0.0, converged=True, iterations=0, hvps=0.0,
                       seconds=0.0, history=[0.0])


def batch_sampler(op: LinearOperator, batch_size: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ H_B v on a fresh random batch B of `batch_size` terms per call (H v when 0 or ≥ num_terms).

    Terms are drawn uniformly with replacement (O(batch) per draw, and E[H_B] = H) from a CPU torch.Generator
    seeded with `seed`, so a run is reproducible.
    """
    if batch_size == 0 or batch_size >= op.num_terms:
        return op.matvec
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def sample(v: torch.Tensor) -> torch.Tensor:
        # host: the CPU generator's draws are the same on every device (batch_size indices a step, sent as they are)
        indices = torch.randint(op.num_terms, (batch_size,), generator=gen).to(op.device, non_blocking=True)
        return op.sample_matvec(v, indices)

    return sample


DIVERGED = 1e6  # a residual this many times the initial one (‖b‖/‖b‖ = 1) counts as divergence


class BestIterate:
    """The full-residual checks of an iterative solver: their history, divergence, and the best checked iterate
    (x₀ = 0 with residual 1 until one beats it), which is what the solver returns."""

    def __init__(self, name: str, op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments):
        self.name, self.op, self.b, self.damping, self.args = name, op, b, damping, args
        self.history = [1.0]
        self.x, self.residual = torch.zeros_like(b), 1.0

    def due(self, steps: int) -> bool:
        return steps % self.args.check_every == 0 or steps == self.args.max_iters

    def check(self, x: torch.Tensor, steps: int, advice: str) -> bool:
        """Record x's true residual; True once it is ≤ tol. Raises SolverError (with `advice`) on divergence."""
        residual = relative_residual(self.op, x, self.b, self.damping)
        self.history.append(residual)
        logger.debug("%s: step %d, residual %.3g", self.name, steps, residual)
        if not (math.isfinite(residual) and residual <= DIVERGED):
            raise SolverError(f"solver {self.name!r} diverged: residual {residual:.3g} after {steps} steps; {advice}")
        if residual < self.residual:
            self.x, self.residual = x, residual
        return residual <= self.args.tol
