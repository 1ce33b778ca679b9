"""`lissa`: the LiSSA / truncated Neumann-series recursion for (H + λI)⁻¹ b.

References: LiSSA: Agarwal, Bullins & Hazan 2017 (arXiv 1602.03943); LLMEraser, Ding et al., ICLR 2025,
arXiv 2412.00383.
"""

from __future__ import annotations

import logging
import time

import torch

from llmeraser.errors import SolverError
from llmeraser.solvers.base import (
    BestIterate,
    CountingOperator,
    LinearOperator,
    SolverArguments,
    SolveResult,
    batch_sampler,
    check_problem,
    power_iteration,
    register,
    zero_result,
)

logger = logging.getLogger(__name__)
NAME = "lissa"


@register(NAME, help="Neumann series, optionally on mini-batches", max_iters=1000)
def solve(op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments) -> SolveResult:
    """Neumann recursion from x₀ = 0:

        xⱼ₊₁ = b/s + (I − (H_B + λI)/s) xⱼ,

    whose fixed point is (H + λI)⁻¹ b (xⱼ = Σ_{i<j} (I − A/s)ⁱ b/s, A = H + λI). It converges when
    0 < λ(A) < 2s, at rate 1 − λ_min(A)/s per step. H_B is H (batch_size 0) or the mean of batch_size random terms,
    which leaves a noise floor on the residual. s = args.scale, or 1.1 × a power-iteration estimate of ‖A‖.
    The full residual is computed every check_every steps (and at the last); the result is the checked iterate
    with the smallest residual (x₀ = 0 if none beats it), with that residual.

    Args:
        op: the operator H.
        b: right-hand side, length op.dim.
        damping: λ ≥ 0.
        args: reads tol, max_iters (steps), batch_size, scale, check_every and seed.

    Raises:
        SolverError: the residual became non-finite or grew past 1e6 (scale too small or A not positive definite),
            or the estimated ‖A‖ is not positive.
    """
    start = time.perf_counter()
    b = check_problem(NAME, op, b, damping)
    if not bool(b.any()):
        return zero_result(NAME, b)
    counter = CountingOperator(op)
    scale = args.scale
    if scale == 0:
        top = power_iteration(counter, damping, seed=args.seed)
        if not top > 0:
            raise SolverError(f"solver 'lissa': the estimated top eigenvalue of H + λI is {top:.3g} ≤ 0, so it is "
                              f"not positive definite; use a larger --damping or `--curvature ggn`")
        scale = 1.1 * top
    product = batch_sampler(counter, args.batch_size, args.seed)
    track = BestIterate(NAME, counter, b, damping, args)
    x = torch.zeros_like(b)
    steps = 0
    while steps < args.max_iters:
        x = x + (b - product(x) - damping * x) / scale
        steps += 1
        if track.due(steps) and track.check(x, steps, f"scale {scale:.3g}, λ={damping}: use a larger scale (or "
                                                      f"scale 0 to estimate it) or a larger --damping"):
            break
    x, residual, history = track.x, track.residual, track.history
    result = SolveResult(x=x, solver=NAME, residual=residual, converged=residual <= args.tol, iterations=steps,
                         hvps=counter.hvps_equivalent, seconds=time.perf_counter() - start, history=history)
    logger.info("lissa: %d steps, scale %.3g, residual %.3g (tol %g), %.3f s", steps, scale, residual, args.tol,
                result.seconds)
    return result
