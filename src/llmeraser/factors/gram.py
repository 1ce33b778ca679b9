"""The Gram kinds: Woodbury and DataInf, from the N × p per-example gradients G (rows gᵢ, split by block) of the
examples the fit passed over (at most `fit.FIT_SAMPLE` drawn at random unless `--samples` says otherwise: N below is
that sample's size, and F estimates the training set's Fisher from it).

- `woodbury`: the exact inverse of the damped rank-N Fisher F = (1/N) Gᵀ G, coupling every block:
  (F + λI)⁻¹ v = (v − Gᵀ (NλI + G Gᵀ)⁻¹ G v) / λ, with G Gᵀ eigendecomposed once so that every λ is cheap;
- `datainf` (Kwon et al. 2024): per block, the average of the per-example inverses instead of the inverse of the
  average, (F_W + λI)⁻¹ v ≈ (1/N) Σᵢ (gᵢgᵢᵀ + λI)⁻¹ v = (v − (1/N) Σᵢ gᵢ (gᵢᵀv)/(λ + ‖gᵢ‖²)) / λ: no N × N system,
  so it scales to training sets whose Gram matrix does not fit in memory.

Both have rank ≤ N < p, so they need λ > 0 (or a training l2).

When N × p does not fit in memory (`memory.plan`), woodbury inverts a rank-k Nyström approximation of F instead
(`sketch`; stored as `sketch.U`, `sketch.e`) and datainf averages over k examples drawn at random (an unbiased
estimate of its mean over all N); the fit's meta (`gram`) says which was used and why.
"""

from __future__ import annotations

import time

import torch

from llmeraser.errors import ConfigError, SolverError
from llmeraser.factors.capture import Block, Statistics, gather_gradients
from llmeraser.solvers.base import register_fitted

KINDS = ("woodbury", "datainf")
HELP = {"woodbury": "exact inverse of the fitted examples' Fisher (stores their N × p gradients and an N × N system)",
        "datainf": "per-layer approximation of that inverse, no N × N system"}
for _kind in KINDS:
    register_fitted(_kind, HELP[_kind])


def fit(stats: Statistics, kinds: set[str], dtype: torch.dtype) -> dict[str, tuple[dict, dict]]:
    """kind → (tensors, seconds by phase) for the Gram kinds in `kinds`: exact from the kept per-example gradients,
    or from the sketch the plan chose when they did not fit (`memory`; the plan's `gram` says which)."""
    out = {}
    if "woodbury" in kinds and stats.sketch is not None:
        out["woodbury"] = (dict(stats.sketch), {"pass": stats.seconds})
    if not ({"datainf", "woodbury"} & kinds) - set(out):
        return out
    grads = gather_gradients(stats, dtype)
    by_block = {f"{m}.grads": g for m, g in grads.items()}
    if "datainf" in kinds:
        out["datainf"] = (by_block, {"pass": stats.seconds})
    if "woodbury" in kinds and "woodbury" not in out:
        t0 = time.perf_counter()
        s, u = torch.linalg.eigh(gram_matrix(grads.values()))
        out["woodbury"] = (by_block | {"gram.U": u, "gram.s": s.clamp(min=0)},
                           {"pass": stats.seconds, "gram": time.perf_counter() - t0})
    return out


def gram_matrix(grads, chunk: int = 2**16) -> torch.Tensor:
    """G Gᵀ (N × N, float64) summed over the blocks, on the gradients' device, column chunk by column chunk (no
    float64 copy of the whole N × p)."""
    total = None
    for g in grads:
        for s in range(0, g.shape[1], chunk):
            c = g[:, s:s + chunk].double()
            total = c @ c.T if total is None else total + c @ c.T
    return total


def _gmv(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """g @ v in g's precision (no float64 copy of a large stored matrix), returned in float64."""
    return (g @ v.to(g.dtype)).double()


def _gv(t: dict, blocks: list[Block], vs: list[torch.Tensor]) -> torch.Tensor:
    """G v (N,), summed over the blocks."""
    return sum(_gmv(t[f"{blk.module}.grads"], v.reshape(-1)) for blk, v in zip(blocks, vs, strict=True))


def _low_rank(t: dict, vs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, e, v): the Nyström sketch in float64 and the blocks' vectors concatenated in block order."""
    return t["sketch.U"].double(), t["sketch.e"].double(), torch.cat([v.reshape(-1) for v in vs])


def _split(x: torch.Tensor, vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """x cut back into the blocks' shapes."""
    out, at = [], 0
    for v in vs:
        out.append(x[at:at + v.numel()].view_as(v))
        at += v.numel()
    return out


def solve(kind: str, t: dict, blocks: list[Block], vs: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """(F + λI)⁻¹ v (woodbury: exact; datainf: per block, the mean of per-example inverses)."""
    if damping == 0:
        raise SolverError(f"{kind}: the Fisher of N examples has rank ≤ N < p, so it needs damping > 0 "
                          f"(or a training l2)")
    if "sketch.U" in t:  # F ≈ U diag(e) Uᵀ (Nyström): exact Woodbury for it
        u, e, v = _low_rank(t, vs)
        x = v / damping + u @ ((1 / (e + damping) - 1 / damping) * (u.T @ v))
        return _split(x, vs)
    if kind == "woodbury":  # the N × p products in the stored precision, the N × N system in float64
        n, u = t["gram.s"].shape[0], t["gram.U"]  # U's products in its stored precision (no N × N float64 copy)
        c = _gmv(u, _gmv(u.T, _gv(t, blocks, vs)) / (n * damping + t["gram.s"].double()))
        return [(v - _gmv(t[f"{blk.module}.grads"].T, c).view_as(v)) / damping
                for blk, v in zip(blocks, vs, strict=True)]
    xs = []
    for blk, v in zip(blocks, vs, strict=True):
        g = t[f"{blk.module}.grads"]
        coef = _gmv(g, v.reshape(-1)) / (damping + g.pow(2).sum(1).double())
        xs.append((v - _gmv(g.T, coef).view_as(v) / g.shape[0]) / damping)
    return xs


def matvec(kind: str, t: dict, blocks: list[Block], vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """F v = (1/N) Gᵀ G v (woodbury's matrix; datainf approximates an inverse and has none)."""
    if kind == "datainf":
        raise ConfigError("datainf approximates the inverse directly; it has no matrix F")
    if "sketch.U" in t:
        u, e, v = _low_rank(t, vs)
        return _split(u @ (e * (u.T @ v)), vs)
    gv = _gv(t, blocks, vs)
    n = gv.shape[0]
    return [_gmv(t[f"{blk.module}.grads"].T, gv).view_as(v) / n for blk, v in zip(blocks, vs, strict=True)]


def top_eigenvalue(kind: str, t: dict, blocks: list[Block], iters: int = 50) -> float:
    """The largest eigenvalue of the full F = (1/N) Gᵀ G, the curvature's scale for a relative damping (woodbury:
    from the stored eigendecomposition of G Gᵀ; datainf: power iteration on G Gᵀ without forming it)."""
    if "sketch.e" in t:
        return float(t["sketch.e"].max())
    if kind == "woodbury":
        return float(t["gram.s"].max()) / t["gram.s"].shape[0]
    grads = [t[f"{blk.module}.grads"] for blk in blocks]
    n = grads[0].shape[0]
    v = torch.ones(n, dtype=torch.float64, device=grads[0].device) / n ** 0.5
    lam = 0.0
    for _ in range(iters):  # u ↦ G Gᵀ u, block by block
        w = sum(_gmv(g, _gmv(g.T, v)) for g in grads)
        lam = float(v @ w)
        norm = float(w.norm())
        if norm == 0:
            break
        v = w / norm
    return lam / n
