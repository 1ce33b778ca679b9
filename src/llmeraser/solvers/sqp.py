"""`sqp` and `paper`: (H + λI)⁻¹ b as the minimiser of a stochastic finite-sum quadratic, as in LLMEraser.

LLMEraser writes the inverse-HVP as argmin_x f(x) = ½ xᵀ(H + λI)x − bᵀx, with H = (1/N) Σᵢ Hᵢ, and runs a
stochastic optimiser on it. The gradient used here is ∇f(x) = H_B x + λx − b, formed directly from one product.
(Differentiating ½ xᵀ(H x) with H x detached, as the published code does, gives ½H x + λx − b and so solves
(½H + λI) x = b: twice the answer when λ = 0.)

References: LLMEraser, Ding et al., ICLR 2025, arXiv 2412.00383.
"""

from __future__ import annotations

import logging
import math
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
BETA1, BETA2 = 0.9, 0.999  # Adam's usual moment decays
ADAM_EPS_FACTOR = 1e-8  # Adam's ε relative to rms(b), so the update does not depend on the units of b


def default_lr(optimizer: str, top: float, b: torch.Tensor) -> float:
    """Step size when args.lr = 0, from the estimate `top` of the largest eigenvalue of H + λI.

    SGD: 1/top, the classic 1/L step for an L-smooth quadratic (stable below 2/L); with full batches this is
    LiSSA with scale `top`.
    Adam: its step moves each coordinate by about lr whatever the gradient's size, so lr is a length in x, not a
    step per unit of gradient (1/top or 0.1/top would have the wrong units). We take rms(b)/top: at x₀ = 0 the
    gradient is −b, so this is the rms size of the first SGD step above, and Adam's first move matches it. Measured
    on SPD problems of condition 1e2–1e3 it converges in fewer steps than SGD; with mini-batches its noise floor
    is about twice SGD's, so lower lr there if accuracy matters more than speed.
    """
    if optimizer == "sgd":
        return 1.0 / top
    return float(torch.linalg.vector_norm(b)) / math.sqrt(b.numel()) / top


def _solve(name: str, op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments) -> SolveResult:
    start = time.perf_counter()
    b = check_problem(name, op, b, damping)
    if not bool(b.any()):
        return zero_result(name, b)
    counter = CountingOperator(op)
    lr = args.lr
    if lr == 0:
        top = power_iteration(counter, damping, seed=args.seed)
        if not top > 0:
            raise SolverError(f"solver {name!r}: the estimated top eigenvalue of H + λI is {top:.3g} ≤ 0, so it is "
                              f"not positive definite; use a larger --damping or `--curvature ggn`")
        lr = default_lr(args.optimizer, top, b)
    product = batch_sampler(counter, args.batch_size, args.seed)
    eps = ADAM_EPS_FACTOR * float(torch.linalg.vector_norm(b)) / math.sqrt(b.numel())
    x = torch.zeros_like(b)
    m = torch.zeros_like(b)  # Adam's first moment
    v = torch.zeros_like(b)  # Adam's second moment
    track = BestIterate(name, counter, b, damping, args)
    steps = 0
    while steps < args.max_iters:
        grad = product(x) + damping * x - b  # ∇f(x) = H_B x + λx − b, not ½H_B x + λx − b
        steps += 1
        if args.optimizer == "sgd":
            x = x - lr * grad
        else:
            m = BETA1 * m + (1 - BETA1) * grad
            v = BETA2 * v + (1 - BETA2) * grad * grad
            m_hat = m / (1 - BETA1**steps)
            v_hat = v / (1 - BETA2**steps)
            x = x - lr * m_hat / (v_hat.sqrt() + eps)
        if track.due(steps) and track.check(x, steps, f"{args.optimizer}, lr {lr:.3g}, λ={damping}: use a smaller lr "
                                                      f"(or lr 0 to estimate it) or a larger --damping"):
            break
    x, residual, history = track.x, track.residual, track.history
    result = SolveResult(x=x, solver=name, residual=residual, converged=residual <= args.tol, iterations=steps,
                         hvps=counter.hvps_equivalent, seconds=time.perf_counter() - start, history=history)
    logger.info("%s: %d %s steps, lr %.3g, residual %.3g (tol %g), %.3f s", name, steps, args.optimizer, lr,
                residual, args.tol, result.seconds)
    return result


@register("sqp", help="the paper's stochastic quadratic, SGD or Adam on mini-batch products", max_iters=1000)
def solve(op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments) -> SolveResult:
    """Minimise f(x) = ½ xᵀ(H + λI)x − bᵀx from x₀ = 0 by SGD or Adam (args.optimizer) with the gradient

        ∇f(x) = H_B x + λx − b,

    H_B x = op.sample_matvec(x, B) on batch_size random terms (op.matvec when batch_size is 0). The minimiser
    solves (H + λI) x = b. SGD with lr = 1/s and full batches is exactly the LiSSA recursion with scale s.
    Adam is hand-written: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², x ← x − lr m̂/(√v̂ + ε) with bias-corrected
    m̂, v̂ (β₁ = 0.9, β₂ = 0.999, ε = 1e-8 rms(b)).

    The full residual is computed every check_every steps (and at the last); the result is the checked iterate
    with the smallest residual (x₀ = 0 if none beats it), with that residual. This matters for Adam with a
    constant lr, which can get close and then drift away again as its second-moment estimate decays.

    Args:
        op: the operator H.
        b: right-hand side, length op.dim.
        damping: λ ≥ 0.
        args: reads tol, max_iters (steps), batch_size, lr (0 = from power iteration, see `default_lr`),
            optimizer, check_every and seed.

    Raises:
        SolverError: the residual became non-finite or grew past 1e6, or the estimated ‖H + λI‖ is not positive.
    """
    return _solve("sqp", op, b, damping, args)


@register("paper", help="sqp with the authors' settings (Adam, lr 1e-5, batch 1, 20 steps)", optimizer="adam",
          lr=1e-5, batch_size=1, max_iters=20, check_every=20, tol=0.0)
def solve_paper(op: LinearOperator, b: torch.Tensor, damping: float, args: SolverArguments) -> SolveResult:
    """`sqp` with the LLMEraser authors' settings: Adam, lr 1e-5, batch 1, 20 steps (but x₀ = 0 and the correct
    gradient H_B x + λx − b).

    So few, so small steps do not solve the system; the result reports its true residual with converged=False
    (tol 0). It exists to measure the published configuration, not to be used.
    """
    return _solve("paper", op, b, damping, args)
