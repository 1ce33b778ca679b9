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
from llmeraser.factors.capture import Block, Statistics, passes, precision
from llmeraser.solvers.base import register_fitted

KINDS = ("kfac", "ekfac")
HELP = {"kfac": "plain Kronecker factors A ⊗ G per linear block (memory independent of N)",
        "ekfac": "Kronecker eigenbases with the exact diagonal in them (memory independent of N; the better of the "
                 "two on every test here)"}
for _kind in KINDS:
    register_fitted(_kind, HELP[_kind])


def fit(stats: Statistics, kinds: set[str], model, task, args, dtype: torch.dtype) -> dict[str, tuple[dict, dict]]:
    """kind → (tensors on the model's device, seconds by phase) for the Kronecker kinds in `kinds`; EK-FAC's
    correction reuses the kept per-example gradients, or makes a second pass when they were not kept."""
    n = stats.n
    device = next(iter(stats.g_sum.values())).device
    work, _acc = precision(dtype, device)  # eigh in float32 for a float32/bf16 model (about twice as fast)
    t0 = time.perf_counter()
    mats: dict[str, torch.Tensor] = {}
    for blk in stats.blocks:
        rep = stats.shared[blk.module]
        if f"{rep}.A" not in mats:
            mats[f"{rep}.A"] = stats.a_sum[rep] / max(stats.tokens[rep], 1.0)
        mats[f"{blk.module}.G"] = stats.g_sum[blk.module] / n
    dec = batched_eigh(mats, work)
    eig: dict[str, torch.Tensor] = {}
    for blk in stats.blocks:
        (ea, qa), (eg, qg) = dec[f"{stats.shared[blk.module]}.A"], dec[f"{blk.module}.G"]
        eig |= {f"{blk.module}.QA": qa, f"{blk.module}.QG": qg, f"{blk.module}.eA": ea.clamp(min=0),
                f"{blk.module}.eG": eg.clamp(min=0)}
    seconds = {"pass": stats.seconds, "eigen": _synced(t0, device)}
    out = {}
    if "kfac" in kinds:
        out["kfac"] = (eig, dict(seconds))
    if "ekfac" in kinds:
        t0 = time.perf_counter()
        lam = _correction(stats, eig, model, task, args)
        tensors = {k: v for k, v in eig.items() if k.endswith((".QA", ".QG"))}
        tensors |= {f"{m}.lam": v / n for m, v in lam.items()}
        out["ekfac"] = (tensors, {**seconds, "correction": _synced(t0, device)})
    return out


def batched_eigh(mats: dict[str, torch.Tensor], dtype: torch.dtype,
                 max_bytes: int = 2**30) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (eigenvalues, eigenvectors) of each symmetric matrix, on its device: matrices of one shape stacked and
    decomposed by one torch.linalg.eigh call (a GPU's batched solver, one launch instead of one a block), in stacks
    of at most `max_bytes` so the stack's copy stays bounded."""
    by_shape: dict[tuple, list[str]] = {}
    for name, m in mats.items():
        by_shape.setdefault(tuple(m.shape), []).append(name)
    out = {}
    for shape, names in by_shape.items():
        per = max(max_bytes // max(shape[0] * shape[1] * torch.finfo(dtype).bits // 8, 1), 1)
        for s in range(0, len(names), per):
            chunk = names[s:s + per]
            vals, vecs = torch.linalg.eigh(torch.stack([mats[k].to(dtype) for k in chunk]))
            out |= {k: (vals[i], vecs[i]) for i, k in enumerate(chunk)}
    return out


def _synced(t0: float, device: torch.device) -> float:
    """Seconds since t0, once the device has finished the work queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _correction(stats: Statistics, eig: dict, model, task, args) -> dict[str, torch.Tensor]:
    """Σᵢ (Q_Gᵀ ∇W_i Q_A)² per block, over every rank's examples, accumulated on the model's device."""
    device = eig[f"{stats.blocks[0].module}.QA"].device
    work, acc = precision(eig[f"{stats.blocks[0].module}.QA"].dtype, device)
    lam = {b.module: torch.zeros(b.out, b.inp, dtype=acc, device=device) for b in stats.blocks}

    def add(blk: Block, g_rows: torch.Tensor) -> None:
        w = g_rows.to(device, work).view(-1, blk.out, blk.inp)  # host-kept rows come back a chunk at a time
        qa, qg = (eig[f"{blk.module}.{q}"].to(work) for q in ("QA", "QG"))
        lam[blk.module] += (qg.T @ w @ qa).to(acc).pow(2).sum(0)

    if stats.grads is not None and stats.plan.rows is None:
        for blk in stats.blocks:
            rows = stats.grads[blk.module]
            for s in range(0, len(rows), 64):
                add(blk, rows[s:s + 64])
    else:
        for _, _, captured in passes(model, task, stats.examples, stats.blocks, args, "EK-FAC correction"):
            for blk in stats.blocks:
                a, g, _m = captured[blk.module]
                add(blk, torch.bmm(g.transpose(1, 2).to(work), a.to(work)))
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
