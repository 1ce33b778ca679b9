"""Woodbury's fallback when N × p per-example gradients do not fit: a rank-k Nyström approximation of F = GᵀG/N.

One streaming pass accumulates Y = GᵀG Ω = Σᵢ gᵢ (gᵢᵀ Ω) for a seeded p × k Ω with orthonormal columns (p × k memory
whatever N is); then the stable single-pass Nyström of Tropp, Yurtsever, Udell & Cevher (2017, "Fixed-rank
approximation of a positive-semidefinite matrix from streaming data", Alg. 3) gives F_k = U diag(e) Uᵀ with
U p × k orthonormal, and (F_k + λI)⁻¹ v = U diag(1/(e + λ)) Uᵀ v + (v − U Uᵀ v)/λ exactly.

What the theory says (their Theorem 4.1, Gaussian Ω; an orthonormalised one spans the same random subspace):
- F_k ≼ F always (Nyström never adds curvature), so ‖F − F_k‖_* = tr F − tr F_k;
- E ‖F − F_k‖_* ≤ (1 + r/(k − r − 1)) ‖F − [[F]]_r‖_* for every r < k − 1 ([[F]]_r: the best rank-r approximation);
- F_k = F when rank F ≤ k (so at k ≥ N it is the exact Woodbury fit, up to rounding).
"""

from __future__ import annotations

import torch

from llmeraser import distributed


class Nystrom:
    """Y = Σᵢ gᵢ (gᵢᵀ Ω) accumulated batch by batch on the model's device (Ω seeded, the same on every rank)."""

    def __init__(self, dims: list[int], rank: int, seed: int, device: torch.device, dtype: torch.dtype,
                 acc: torch.dtype):
        p = sum(dims)
        gen = torch.Generator(device=device).manual_seed(seed)
        gauss = torch.randn(p, rank, generator=gen, device=device, dtype=torch.float64 if acc == torch.float64
                            else torch.float32)
        self.omega = torch.linalg.qr(gauss).Q.to(dtype)  # (p, k), orthonormal columns
        self.y = torch.zeros(p, rank, dtype=acc, device=device)
        self.offsets = [sum(dims[:i]) for i in range(len(dims) + 1)]

    def add(self, rows: list[torch.Tensor]) -> None:
        """Add a batch's per-example gradients, one (b, dim) tensor per block in block order."""
        cut = list(zip(self.offsets[:-1], self.offsets[1:], strict=True))
        z = sum(g.to(self.omega.dtype) @ self.omega[a:b] for g, (a, b) in zip(rows, cut, strict=True))  # (b, k)
        for g, (a, b) in zip(rows, cut, strict=True):
            self.y[a:b] += (g.to(self.omega.dtype).T @ z).to(self.y.dtype)

    def finish(self, n: int) -> dict[str, torch.Tensor]:
        """{sketch.U (p, k), sketch.e (k,)}: F_k = U diag(e) Uᵀ ≈ GᵀG/n, summed over every rank's examples."""
        distributed.all_reduce(self.y, "Nyström sketch")
        u, s = nystrom(self.omega, self.y)
        return {"sketch.U": u, "sketch.e": s / n}


def nystrom(omega: torch.Tensor, y: torch.Tensor, tries: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, Λ) with U Λ Uᵀ = Y (Ωᵀ Y)⁺ Yᵀ for Y = A Ω, A PSD (Tropp et al. 2017, Alg. 3), in float64.

    A shift ν (of the order of the products' rounding) keeps Ωᵀ Y_ν positive definite for the Cholesky factor and is
    taken off the eigenvalues afterwards; when rounding made Ωᵀ Y indefinite by more than ν, ν grows tenfold."""
    eps = torch.finfo(omega.dtype).eps  # the products' precision
    omega, y = omega.double(), y.double()
    nu = max(float(y.norm()) * eps * y.shape[0] ** 0.5, torch.finfo(torch.float64).tiny)
    for _ in range(tries):
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        if int(info) == 0:
            break
        nu *= 10
    else:
        raise ValueError("Nyström sketch: Ωᵀ Y is not positive definite (non-finite gradients?)")
    b = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # Y_ν C⁻ᵀ, (p, k)
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    return u, (sigma.pow(2) - nu).clamp(min=0)
