"""The Kronecker kinds: K-FAC and EK-FAC, per linear block W (out × in).

- K-FAC ("K-FAC-expand", Eschenhagen et al. 2023; Martens & Grosse 2015): A = (1/T) Σ_{i,t} aₜaₜᵀ (T tokens counted),
  G = (1/N) Σ_{i,t} gₜgₜᵀ, F_W ≈ A ⊗ G, inverted in the eigenbases Q_A, Q_G with eigenvalues e_G e_Aᵀ;
- EK-FAC (George et al. 2018; Grosse et al. 2023 use it for influence functions): the same eigenbases with the exact
  diagonal Λ = (1/N) Σᵢ (Q_Gᵀ ∇W_i Q_A)² in them instead of K-FAC's outer product of eigenvalues.

Both are block-diagonal: they ignore the coupling between blocks (between LoRA A and B of one layer too), which on
the tiny LoRA LM is part of what separates them from the exact solve (docs/tests.md#fitted-curvature).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from llmeraser import distributed
from llmeraser.factors.capture import Block, Statistics, passes
from llmeraser.solvers.base import register_fitted

KINDS = ("kfac", "ekfac")
HELP = {"kfac": "plain Kronecker factors A ⊗ G per linear block (memory independent of N)",
        "ekfac": "Kronecker eigenbases with the exact diagonal in them (memory independent of N; the better of the "
                 "two on every test here)"}
for _kind in KINDS:
    register_fitted(_kind, HELP[_kind])


def fit(stats: Statistics, kinds: set[str], model, task, args, dtype: torch.dtype) -> dict[str, tuple[dict, dict]]:
    """kind → (tensors, seconds by phase) for the Kronecker kinds in `kinds`; EK-FAC's correction reuses the kept
    per-example gradients, or makes a second pass when they were not kept."""
    f64, n = torch.float64, stats.n
    t0 = time.perf_counter()
    eig: dict[str, torch.Tensor] = {}
    a_eig: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for blk in stats.blocks:  # eigendecompositions in the model's precision (float32: about twice as fast)
        rep = stats.shared[blk.module]
        if rep not in a_eig:
            a_eig[rep] = torch.linalg.eigh((stats.a_sum[rep] / max(stats.tokens[rep], 1.0)).to(dtype))
        ea, qa = (t.to(f64) for t in a_eig[rep])
        eg, qg = (t.to(f64) for t in torch.linalg.eigh((stats.g_sum[blk.module] / n).to(dtype)))
        eig |= {f"{blk.module}.QA": qa, f"{blk.module}.QG": qg, f"{blk.module}.eA": ea.clamp(min=0),
                f"{blk.module}.eG": eg.clamp(min=0)}
    seconds = {"pass": stats.seconds, "eigen": time.perf_counter() - t0}
    out = {}
    if "kfac" in kinds:
        out["kfac"] = (eig, dict(seconds))
    if "ekfac" in kinds:
        t0 = time.perf_counter()
        lam = _correction(stats, eig, model, task, args)
        tensors = {k: v for k, v in eig.items() if k.endswith((".QA", ".QG"))}
        tensors |= {f"{m}.lam": v / n for m, v in lam.items()}
        out["ekfac"] = (tensors, {**seconds, "correction": time.perf_counter() - t0})
    return out


def _correction(stats: Statistics, eig: dict, model, task, args) -> dict[str, torch.Tensor]:
    """Σᵢ (Q_Gᵀ ∇W_i Q_A)² per block, over every rank's examples."""
    lam = {b.module: torch.zeros(b.out, b.inp, dtype=torch.float64) for b in stats.blocks}

    def add(blk: Block, g_rows: torch.Tensor) -> None:
        w = g_rows.view(-1, blk.out, blk.inp)
        qa, qg = (eig[f"{blk.module}.{q}"].to(w.dtype) for q in ("QA", "QG"))
        lam[blk.module] += (qg.T @ w @ qa).to(torch.float64).pow(2).sum(0)

    if stats.grads is not None:
        for blk in stats.blocks:
            rows = stats.grads[blk.module]
            for s in range(0, len(rows), 64):
                add(blk, rows[s:s + 64])
    else:
        for _, _, captured in passes(model, task, stats.examples, stats.blocks, args, "EK-FAC correction"):
            for blk in stats.blocks:
                a, g, _m = captured[blk.module]
                add(blk, torch.bmm(g.transpose(1, 2), a).cpu())
    for blk in stats.blocks:
        distributed.all_reduce(lam[blk.module], "EK-FAC correction")
    return lam


def _eigenvalues(kind: str, t: dict, blk: Block) -> torch.Tensor:
    """(out, in) the approximation's eigenvalues of block `blk` in the basis Q_G ⊗ Q_A."""
    if kind == "ekfac":
        return t[f"{blk.module}.lam"].double()
    return torch.outer(t[f"{blk.module}.eG"].double(), t[f"{blk.module}.eA"].double())


def _apply(kind: str, t: dict, blocks: list[Block], vs: list[torch.Tensor],
           scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Q_G scale(Q_Gᵀ V Q_A, Λ) Q_Aᵀ per block."""
    xs = []
    for blk, v in zip(blocks, vs, strict=True):
        qa, qg = t[f"{blk.module}.QA"].double(), t[f"{blk.module}.QG"].double()
        xs.append(qg @ scale(qg.T @ v @ qa, _eigenvalues(kind, t, blk)) @ qa.T)
    return xs


def solve(kind: str, t: dict, blocks: list[Block], vs: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """(F_W + λI)⁻¹ V per block."""
    return _apply(kind, t, blocks, vs, lambda r, lam: r / (lam + damping))


def matvec(kind: str, t: dict, blocks: list[Block], vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """F_W V per block."""
    return _apply(kind, t, blocks, vs, lambda r, lam: r * lam)


def top_eigenvalue(kind: str, t: dict, blocks: list[Block]) -> float:
    """Σ over blocks of each block's largest eigenvalue: an upper bound on the largest eigenvalue of the full,
    block-coupled F (for PSD F, vᵀFv ≤ (Σₖ ‖vₖ‖ √λₖ)² ≤ Σₖ λₖ by Cauchy-Schwarz), and the scale a relative damping is
    taken against. The block-diagonal F's own largest eigenvalue would be far smaller than the full curvature's (on
    the embedded model ~0.8 against ~15, docs/math.md#damping) and make the same relative damping much weaker."""
    return sum(float(_eigenvalues(kind, t, blk).max()) for blk in blocks)
