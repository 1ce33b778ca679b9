"""Gradients and curvature products of the training objective over a set of examples.

Objective (docs/math.md#the-objective): R(θ) = (1/N) Σᵢ ℓ(zᵢ; θ) + (l2/2) ‖θ‖².
- `gradient`: ∇ Σᵢ wᵢ ℓ(zᵢ; θ) in one batched pass (weights ±1 give Σ[∇ℓ(z) − ∇ℓ(z′)] directly).
- `per_example_gradients`: the (N, p) matrix of ∇ℓ(zᵢ), chunked to bound memory.
- `CurvatureOperator`: v ↦ H v with H = (1/N) Σᵢ Cᵢ + l2·I, where Cᵢ is the exact Hessian ∇²ℓ(zᵢ) (double backward)
  or the Gauss-Newton matrix Jᵢᵀ ∇²_out ℓ Jᵢ (PSD; J the Jacobian of the outputs in θ). Damping is the solver's.

Under torch.distributed (`llmeraser.distributed`) each rank takes a contiguous run of the single-process batches and
the partial sums are all-reduced: every rank returns the full result.

Double backward needs eager attention in Hugging Face models (SDPA's CPU kernel has no double backward).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from llmeraser import distributed
from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.params import ParamView
from llmeraser.resources import require
from llmeraser.task import Batch, Task, per_example_loss

logger = logging.getLogger(__name__)

CURVATURES = ("ggn", "hessian")


def _grad(outputs: torch.Tensor, inputs: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outputs, inputs, allow_unused=True, materialize_grads=True, **kw))


def gradient(model: torch.nn.Module, task: Task, examples: Sequence[Example], *, weights: Sequence[float] | None = None,
             batch_size: int = 8, progress: bool = False, desc: str = "gradients") -> torch.Tensor:
    """g = ∇_θ Σᵢ wᵢ ℓ(zᵢ; θ) (wᵢ = 1 by default), a flat (p,) vector. Not normalised by N."""
    view = ParamView(model)
    w = torch.ones(len(examples), dtype=view.dtype, device=view.device) if weights is None else \
        torch.as_tensor(weights, dtype=view.dtype, device=view.device)
    if w.shape != (len(examples),):
        raise ConfigError(f"gradient: {len(examples)} examples but weights of shape {tuple(w.shape)}")
    total = torch.zeros(view.dim, dtype=view.dtype, device=view.device)
    for idx in tqdm(distributed.batches(len(examples), batch_size), desc=desc, disable=not progress, leave=False):
        losses = per_example_loss(task, model, task.collate([examples[i] for i in idx]))  # (b,)
        total += view.flatten(_grad((losses * w[idx].to(losses.dtype)).sum(), view.params))
    return distributed.all_reduce(total, desc)


def objective_gradient(model: torch.nn.Module, task: Task, examples: Sequence[Example], *, l2: float = 0.0,
                       batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """∇R(θ) = (1/N) Σᵢ ∇ℓ(zᵢ; θ) + l2·θ."""
    if not examples:
        raise ConfigError("the objective gradient needs at least one example")
    view = ParamView(model)
    g = gradient(model, task, examples, batch_size=batch_size, progress=progress, desc="objective gradient")
    return g / len(examples) + l2 * view.vector()


def per_example_gradients(model: torch.nn.Module, task: Task, examples: Sequence[Example], *, chunk_size: int = 8,
                          method: str = "vmap", progress: bool = False) -> torch.Tensor:
    """The (N, p) matrix of per-example gradients ∇ℓ(zᵢ; θ).

    `vmap` differentiates each row of a padded batch of `chunk_size` examples with torch.func (memory grows with
    chunk_size, not N); `loop` runs one backward per example. Both give the same numbers.
    """
    if method not in ("vmap", "loop"):
        raise ConfigError(f"per-example gradient method must be 'vmap' or 'loop', got {method!r}")
    view = ParamView(model)
    itemsize = view.dtype.itemsize
    # the (N, p) result, plus a chunk's gradients and their copies inside vmap
    require((len(examples) + 4 * chunk_size) * view.dim * itemsize,
            f"per-example gradients ({len(examples):,} examples × {view.dim:,} parameters)",
            "use fewer examples or a solver built on Hessian-vector products (--solver cg), which never stores them")
    out = torch.zeros(len(examples), view.dim, dtype=view.dtype, device=view.device)  # rows of other ranks stay 0
    for idx in tqdm(distributed.batches(len(examples), chunk_size), desc="per-example gradients", disable=not progress,
                    leave=False):
        chunk = [examples[i] for i in idx]
        if method == "loop":
            for i, e in zip(idx, chunk, strict=True):
                out[i] = view.flatten(_grad(per_example_loss(task, model, task.collate([e])).sum(), view.params))
        else:
            out[idx] = _vmap_grads(model, task, task.collate(chunk), view).reshape(-1, view.dim)
    return distributed.all_reduce(out, "per-example gradients")  # each row from one rank: the sum is exact


class _LossOfRow(torch.nn.Module):
    """Wraps (task, model) so torch.func.functional_call can swap θ: forward(row) = ℓ(row; θ)."""

    def __init__(self, model: torch.nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, row: Batch) -> torch.Tensor:
        batch = {k: v.unsqueeze(0) for k, v in row.items()}  # a batch of one
        return per_example_loss(self.task, self.model, batch).squeeze(0)


def _vmap_grads(model: torch.nn.Module, task: Task, batch: Batch, view: ParamView) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    wrapper = _LossOfRow(model, task)
    names = ["model." + n for n in view.names]
    params = {n: p.detach() for n, p in zip(names, view.params, strict=True)}

    def loss(p: dict[str, torch.Tensor], row: Batch) -> torch.Tensor:
        return functional_call(wrapper, p, (row,), strict=False)

    grads = vmap(grad(loss), in_dims=(None, 0))(params, batch)  # name -> (b, *shape)
    b = next(iter(batch.values())).shape[0]
    return torch.cat([grads[n].reshape(b, -1) for n in names], dim=1)  # (b, p)


class CurvatureOperator:
    """v ↦ H v with H = (1/N) Σᵢ Cᵢ + l2·I over `examples` (a `LinearOperator` for the solvers).

    Args:
        model: the model at θ̂ (its trainable parameters are θ).
        task: per-example losses.
        examples: the N training examples the curvature averages over.
        kind: "ggn" (Gauss-Newton, PSD, default) or "hessian" (exact, may be indefinite).
        l2: the L2 coefficient of the training objective (part of H, not damping).
        batch_size: examples per forward/backward pass.
    """

    def __init__(self, model: torch.nn.Module, task: Task, examples: Sequence[Example], *, kind: str = "ggn",
                 l2: float = 0.0, batch_size: int = 8, progress: bool = False):
        if kind not in CURVATURES:
            raise ConfigError(f"unknown curvature {kind!r}; expected one of {', '.join(CURVATURES)}")
        if not examples:
            raise ConfigError("the curvature needs at least one example")
        self.model, self.task, self.examples = model, task, list(examples)
        self.kind, self.l2, self.batch_size, self.progress = kind, float(l2), batch_size, progress
        self.view = ParamView(model)
        self.dim, self.num_terms = self.view.dim, len(self.examples)
        self.dtype, self.device = self.view.dtype, self.view.device
        self._full = [task.collate([self.examples[i] for i in idx])  # this rank's shard
                      for idx in distributed.batches(len(self.examples), batch_size)]

    def _product(self, v: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Σ_{i∈batch} Cᵢ v as a flat vector."""
        params = self.view.params
        if self.kind == "hessian":
            g = _grad(per_example_loss(self.task, self.model, batch).sum(), params, create_graph=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True))
            return self.view.flatten(_grad(dot, params))
        out = self.task.forward(self.model, batch)
        # J v by the double-backward trick: d/du ⟨Jᵀu, v⟩ = J v (u is a dummy, the result is linear in it).
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = _grad(out, params, grad_outputs=u, create_graph=True, retain_graph=True)
        jv = torch.autograd.grad(jt_u, u, grad_outputs=v, retain_graph=True)[0]  # like outputs
        o = out.detach().requires_grad_(True)
        g_out = torch.autograd.grad(self.task.loss(o, batch).sum(), o, create_graph=True)[0]
        h_jv = torch.autograd.grad(g_out, o, grad_outputs=jv)[0]  # ∇²_out ℓ · J v
        return self.view.flatten(_grad(out, params, grad_outputs=h_jv))

    def _apply(self, v: torch.Tensor, batches: list[Batch], count: int) -> torch.Tensor:
        vs = self.view.unflatten(v.to(self.dtype))
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for batch in tqdm(batches, desc=f"{self.kind} product", disable=not self.progress, leave=False):
            total += self._product(vs, batch)
        return distributed.all_reduce(total, f"{self.kind} product") / count + self.l2 * v

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(v, self._full, self.num_terms)

    def sample_matvec(self, v: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        idx = [int(i) for i in indices]  # the same draws on every rank (seeded); each takes a slice of them
        batches = [self.task.collate([self.examples[idx[j]] for j in chunk])
                   for chunk in distributed.batches(len(idx), self.batch_size)]
        return self._apply(v, batches, len(idx))

    def dense(self) -> torch.Tensor:
        """The explicit (p, p) matrix H (p products; for tests and small models)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cols = torch.stack([self.matvec(eye[i]) for i in range(self.dim)], dim=1)
        return (cols + cols.T) / 2
