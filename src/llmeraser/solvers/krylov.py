"""One Krylov space, every damping: (H + λI) x = b for many λ at the cost of one solve.

Krylov spaces are shift-invariant — K_k(H + λI, b) = K_k(H, b) — so k Lanczos steps on H give, for every λ at once,
the Galerkin solution that k steps of CG on H + λI would reach: with H Q_k = Q_k T_k + β_k q_{k+1} e_kᵀ,

    x_k(λ) = ‖b‖ Q_k (T_k + λI)⁻¹ e₁,   ‖(H + λI) x_k(λ) − b‖ = ‖b‖ β_k |e_kᵀ (T_k + λI)⁻¹ e₁|.

This makes choosing the damping on validation data cheap: the products over the training set, which dominate the
cost, are paid once. Q_k is kept (k vectors of length p) and fully re-orthogonalised, so rounding does not produce
the spurious copies of eigenvalues that plain Lanczos does; the products W_k = H Q_k are kept too, so each λ's true
residual ‖b‖ ‖W_k y + λ Q_k y − b/‖b‖‖ (y = (T_k + λI)⁻¹ e₁) costs no further product.

References: Paige 1971 (Lanczos in finite precision); Frommer 2003, "BiCGStab(ℓ) for families of shifted linear
systems" (shifted Krylov solvers); Golub & Van Loan, Matrix Computations §10.1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch

from llmeraser.errors import ConfigError, SolverError
from llmeraser.solvers.base import (
    CountingOperator,
    LinearOperator,
    SolverArguments,
    SolveResult,
    check_finite,
    check_problem,
    zero_result,
)

logger = logging.getLogger(__name__)
NAME = "cg (shifted)"


def shifted_solve(op: LinearOperator, b: torch.Tensor, dampings: Sequence[float],
                  args: SolverArguments, *, relative: bool = False) -> list[SolveResult]:
    """Solve (H + λI) x = b for each λ in `dampings` with one Lanczos run of at most `args.max_iters` products.

    Stops early once every λ's residual is ≤ args.tol (or the Krylov space is exhausted). Each result's residual is
    the true one, from the stored products (no extra product); every result counts the shared Lanczos products.
    `relative`: each entry ρ means λ = ρ · θ_max, θ_max the largest Ritz value of H on the Krylov space (the largest
    curvature the request's directions see; re-estimated every step, free); each result's `damping` is the λ used.

    Raises:
        ConfigError: no dampings, or a damping that is not finite and ≥ 0.
        SolverError: H + λI is not positive definite on the Krylov space for some λ (T_k + λI has a pivot ≤ 0), or
            a non-finite value.
    """
    start = time.perf_counter()
    if not dampings:
        raise ConfigError("shifted_solve needs at least one damping")
    for lam in dampings:
        b = check_problem(NAME, op, b, lam)
    if not bool(b.any()):
        return [zero_result(NAME, b) for _ in dampings]
    counter = CountingOperator(op)
    b_norm = torch.linalg.vector_norm(b)
    basis = [b / b_norm]
    products: list[torch.Tensor] = []  # H q_j, kept for the true residuals
    alphas: list[float] = []
    betas: list[float] = []
    rhos = torch.tensor([float(x) for x in dampings], dtype=torch.float64)  # host: m scalars
    lams = rhos
    history = [1.0]
    while len(alphas) < args.max_iters:
        q = basis[-1]
        w = counter.matvec(q)
        check_finite(NAME, w, "a product H q")
        products.append(w)
        alphas.append(float(torch.dot(q, w)))
        w = w - alphas[-1] * q - (betas[-1] * basis[-2] if betas else 0)
        for v in basis:  # full re-orthogonalisation (twice is enough: Giraud et al. 2005)
            w = w - torch.dot(v, w) * v
        for v in basis:
            w = w - torch.dot(v, w) * v
        beta = float(torch.linalg.vector_norm(w))
        if relative:  # the top Ritz value only grows with k (Cauchy interlacing), so λ settles as the run goes on
            lams = rhos * max(float(torch.linalg.eigvalsh(_tridiagonal(alphas, betas))[-1]), 0.0)
        coeffs, residuals = _galerkin(alphas, betas, beta, lams)
        history.append(float(residuals.max()))
        if history[-1] <= args.tol or beta <= 1e-12 * abs(alphas[0]) or len(alphas) == op.dim:
            break
        betas.append(beta)
        basis.append(w / beta)
    ritz = torch.linalg.eigvalsh(_tridiagonal(alphas, betas))  # eigenvalue estimates of H (extremes converge first)
    q_mat = torch.stack(basis[: len(alphas)], dim=1)  # (p, k)
    w_mat = torch.stack(products, dim=1)  # (p, k) = H Q_k
    results = []
    for j, lam in enumerate(lams.tolist()):
        y = coeffs[:, j].to(q_mat)  # the tridiagonal algebra is host float64 (k × k); Q_k lives with the model
        x = float(b_norm) * (q_mat @ y)
        residual = float(torch.linalg.vector_norm(w_mat @ y + lam * (q_mat @ y) - b / b_norm))
        check_finite(NAME, residual, "the residual")
        results.append(SolveResult(x=x, solver=NAME, residual=residual, converged=residual <= args.tol,
                                   iterations=len(alphas), hvps=float(counter.hvps_equivalent),
                                   seconds=time.perf_counter() - start, history=history,
                                   ritz=(float(ritz[0]), float(ritz[-1])), damping=lam))
    logger.info("shifted cg: %d Lanczos steps for %d dampings, worst residual %.3g, %.3f s", len(alphas),
                len(dampings), max(r.residual for r in results), time.perf_counter() - start)
    return results


def _galerkin(alphas: list[float], betas: list[float], beta: float,
              lams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_k + λI)⁻¹ e₁ for each λ, as columns (k, m), and the relative residuals β |e_kᵀ (T_k + λI)⁻¹ e₁| (m,)."""
    k = len(alphas)
    t = _tridiagonal(alphas, betas)
    e1 = torch.zeros(k, dtype=torch.float64)  # host: the k × k Lanczos algebra is tiny
    e1[0] = 1.0
    cols = []
    for lam in lams.tolist():
        shifted = t + lam * torch.eye(k, dtype=torch.float64)  # host: k × k
        # CG on H + λI exists exactly when T_k + λI is positive definite (its LDLᵀ pivots are CG's curvatures).
        chol, info = torch.linalg.cholesky_ex(shifted)
        if int(info) != 0 or not math.isfinite(float(chol.diagonal().min())):
            raise SolverError(f"solver 'cg': H + λI is not positive definite on the Krylov space (λ={lam:g}, "
                              f"{k} steps); use a larger --damping or `--curvature ggn`")
        cols.append(torch.cholesky_solve(e1[:, None], chol)[:, 0])
    coeffs = torch.stack(cols, dim=1)
    return coeffs, beta * coeffs[-1].abs()


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    """T_k = tridiag(β, α, β) of the Lanczos relation (float64)."""
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))  # host: k × k
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)  # host: k × k
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t
