"""`cg`: conjugate gradient on (H + λI) x = b.

Needs H + λI symmetric positive definite along the directions it explores; converges in at most dim products in
exact arithmetic, with error shrinking like ((√κ − 1)/(√κ + 1))ᵏ for condition number κ.

References: CG: Hestenes & Stiefel 1952; LLMEraser, Ding et al., ICLR 2025, arXiv 2412.00383.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from llmeraser.errors import SolverError
from llmeraser.solvers.base import (
    CountingOperator,
    LinearOperator,
    SolverArguments,
    SolveResult,
    check_finite,
    check_problem,
    damped,
    register,
    relative_residual,
    zero_result,
)

logger = logging.getLogger(__name__)
NAME = "cg"


@register(NAME, path=True, help="conjugate gradient from x₀ = 0 (SPD: GGN, or Hessian + enough damping)")
def solve(op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments) -> SolveResult:
    """Conjugate gradient from x₀ = 0.

    With A = H + λI, r₀ = p₀ = b and for k = 0, 1, …:
        αₖ = rₖᵀrₖ / pₖᵀApₖ,  xₖ₊₁ = xₖ + αₖpₖ,  rₖ₊₁ = rₖ − αₖApₖ,
        pₖ₊₁ = rₖ₊₁ + (rₖ₊₁ᵀrₖ₊₁ / rₖᵀrₖ) pₖ.
    Stops when the recursive ‖rₖ‖/‖b‖ ≤ tol or after max_iters products. CG minimises the A-norm of the error, not
    the residual, which can grow on ill-conditioned (or float32-noisy) operators when the budget ends early; so the
    iterate with the smallest recursive residual is returned (x₀ = 0 when none beats it). The reported residual is
    recomputed with one true product, so `converged` may be False if rounding made the recursion optimistic.

    Args:
        op: the operator H.
        b: right-hand side, length op.dim.
        damping: λ ≥ 0.
        args: reads tol and max_iters.

    Raises:
        SolverError: pᵀAp ≤ 0 (A is not positive definite) or a non-finite value.
    """
    start = time.perf_counter()
    b = check_problem(NAME, op, b, damping)
    if not bool(b.any()):
        return zero_result(NAME, b)
    counter = CountingOperator(op)
    apply = damped(counter, damping)
    b_norm = float(torch.linalg.vector_norm(b))
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(torch.dot(r, r))
    history = [1.0]
    best_x, best = x.clone(), 1.0
    iterations = 0
    while iterations < args.max_iters and math.sqrt(rr) / b_norm > args.tol:
        ap = apply(p)
        curvature = float(torch.dot(p, ap))
        check_finite(NAME, curvature, "the curvature pᵀ(H+λI)p")
        if curvature <= 0:
            raise SolverError(f"solver 'cg': the damped curvature is not positive definite along a search "
                              f"direction (pᵀ(H+λI)p = {curvature:.3g} at iteration {iterations}, λ={damping}); "
                              f"use a larger --damping or `--curvature ggn`")
        alpha = rr / curvature
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        rr_next = float(torch.dot(r, r))
        check_finite(NAME, rr_next, "the residual")
        p = r + (rr_next / rr) * p
        rr = rr_next
        iterations += 1
        history.append(math.sqrt(rr) / b_norm)
        if history[-1] < best:
            best_x, best = x.clone(), history[-1]
    x = best_x
    residual = relative_residual(counter, x, b, damping)
    check_finite(NAME, residual, "the residual")
    result = SolveResult(x=x, solver=NAME, residual=residual, converged=residual <= args.tol, iterations=iterations,
                         hvps=counter.hvps_equivalent, seconds=time.perf_counter() - start, history=history)
    logger.info("cg: %d iterations, residual %.3g (tol %g), %.3f s", iterations, residual, args.tol, result.seconds)
    return result
