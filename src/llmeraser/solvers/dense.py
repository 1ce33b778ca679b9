"""`dense`: the exact reference solve by materialising H + λI.

Solves (H + λI) x = b by an LU factorisation (torch.linalg.solve) in float64. H is the operator's matrix when it
is a `MatrixOperator`, else it is built column by column as H eᵢ (op.dim products), so this is only for small
problems (≤ args.max_dense_dim).

References: LLMEraser, Ding et al., ICLR 2025, arXiv 2412.00383 (the exact influence update it approximates).
"""

from __future__ import annotations

import logging
import time

import torch

from llmeraser.errors import ResourceError, SolverError
from llmeraser.resources import require
from llmeraser.solvers.base import (
    CountingOperator,
    LinearOperator,
    MatrixOperator,
    SolverArguments,
    SolveResult,
    check_finite,
    check_problem,
    register,
    relative_residual,
    zero_result,
)

logger = logging.getLogger(__name__)
NAME = "dense"


def materialise(op: LinearOperator) -> torch.Tensor:
    """H as a (dim, dim) matrix: `.mean` of a MatrixOperator, else the columns H eᵢ (dim products)."""
    inner = op.op if isinstance(op, CountingOperator) else op
    if isinstance(inner, MatrixOperator):
        return inner.mean
    eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
    return torch.stack([op.matvec(eye[:, i]) for i in range(op.dim)], dim=1)


@register(NAME, help="materialise H and solve exactly (the reference; small problems only)")
def solve(op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments) -> SolveResult:
    """x = (H + λI)⁻¹ b exactly (up to rounding), by LU in float64.

    If H + λI is exactly singular, falls back to the minimum-norm least-squares solution (SVD-based, on the CPU)
    and reports its residual; an indefinite H + λI is solved as is.

    Args:
        op: the operator H.
        b: right-hand side, length op.dim.
        damping: λ ≥ 0.
        args: reads max_dense_dim and tol (for `converged`).

    Returns:
        The solution with iterations = 1 and hvps = the products used (dim to build H unless op is a
        MatrixOperator, plus one for the reported residual).

    Raises:
        ResourceError: op.dim > args.max_dense_dim, or the matrices would not fit in the available memory.
        SolverError: the solution is non-finite.
    """
    start = time.perf_counter()
    b = check_problem(NAME, op, b, damping)
    if not bool(b.any()):
        return zero_result(NAME, b)
    if op.dim > args.max_dense_dim:
        raise ResourceError(f"solver 'dense' would build a {op.dim} × {op.dim} matrix but the limit "
                            f"(max_dense_dim) is {args.max_dense_dim}; use `--solver cg` instead")
    # the matrix, its damped float64 copy and the LU factors: three dim × dim float64 arrays
    require(3 * op.dim**2 * 8, f"solver 'dense' ({op.dim:,} × {op.dim:,} matrix in float64)",
            "use --solver cg (Hessian-vector products, memory linear in the parameters)")
    counter = CountingOperator(op)
    a = materialise(counter).to(torch.float64)
    a = a + damping * torch.eye(op.dim, dtype=torch.float64, device=a.device)
    rhs = b.to(torch.float64)
    check_finite(NAME, a, "the damped matrix H + λI")
    try:
        x = torch.linalg.solve(a, rhs)
    except torch.linalg.LinAlgError:
        logger.warning("dense: H + λI (dim %d, λ=%g) is singular; using the minimum-norm least-squares solution",
                       op.dim, damping)
        x = torch.linalg.lstsq(a.cpu(), rhs.cpu().unsqueeze(1), driver="gelsd").solution.squeeze(1).to(a.device)
    if not bool(torch.isfinite(x).all()):
        raise SolverError(f"solver 'dense': the solution is non-finite (H + λI is numerically singular at "
                          f"λ={damping}); use a larger --damping")
    x = x.to(op.dtype)
    residual = relative_residual(counter, x, b, damping)
    check_finite(NAME, residual, "the residual")
    result = SolveResult(x=x, solver=NAME, residual=residual, converged=residual <= args.tol, iterations=1,
                         hvps=counter.hvps_equivalent, seconds=time.perf_counter() - start, history=[residual])
    logger.info("dense: dim %d, residual %.3g, %g products, %.3f s", op.dim, residual, result.hvps, result.seconds)
    return result
