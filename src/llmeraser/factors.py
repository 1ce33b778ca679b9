"""Fitted curvature for the adapter's linear maps: K-FAC, EK-FAC and closed forms, fitted once and reused.

Every trainable parameter of a LoRA model sits in an `nn.Linear` (LoRA's A and B are each one; a trainable head or
projector is another), so the curvature is approximated block-diagonally, one block per linear map W (out × in, a
trainable bias appended as an extra input column). One pass over the training set (forward, then backward of a
pseudo-loss) records, per block, the inputs aₜ and output gradients gₜ of every token t, and gives:

- per-example gradients ∇W_i = Σₜ gₜ aₜᵀ (an einsum per block: far cheaper than one backward per example);
- K-FAC factors A = (1/T) Σ_{i,t} aₜaₜᵀ (T = tokens counted) and G = (1/N) Σ_{i,t} gₜgₜᵀ, with F_W ≈ A ⊗ G
  ("K-FAC-expand", Eschenhagen et al. 2023; Martens & Grosse 2015);
- EK-FAC (George et al. 2018): the eigenbases Q_A, Q_G of A and G, and in that basis the exact diagonal
  Λ = (1/N) Σᵢ (Q_Gᵀ ∇W_i Q_A)² instead of K-FAC's outer product of eigenvalues (Grosse et al. 2023 use it for
  influence functions);
- `woodbury`: the exact inverse of the damped rank-N Fisher F = (1/N) Gᵀ G (G the N × p per-example gradients):
  (F + λI)⁻¹ v = (v − Gᵀ (NλI + G Gᵀ)⁻¹ G v) / λ, with G Gᵀ eigendecomposed once so every λ is cheap;
- `datainf` (Kwon et al. 2024): per block, the average of the per-example inverses instead of the inverse of the
  average, (F_W + λI)⁻¹ v ≈ (1/N) Σᵢ (gᵢgᵢᵀ + λI)⁻¹ v = (v − (1/N) Σᵢ gᵢ (gᵢᵀv)/(λ + ‖gᵢ‖²)) / λ:
  no N × N system, so it scales to training sets whose Gram matrix does not fit in memory.

Which Fisher. The pseudo-loss is the task's `fisher_loss` (fisher="mc"): for the causal-LM task, targets sampled
from the model's own prediction, so E[F] is the Gauss-Newton matrix the iterative solvers use; or the training loss
itself (fisher="empirical"), the empirical Fisher. Solving adds the training objective's l2 to the damping.

Stored and reused: `FactorStore` keeps each fit as safetensors plus meta.json under a folder (by default
`<adapter>.factors`, beside the adapter), keyed by the adapter's weights hash and the training set's hash; a fit
whose keys do not match is stale and refitted. After a request is applied the new adapter inherits the fit
(`FactorStore.derive`) while the examples edited since the last real fit stay within `refit_fraction` of the
training set; beyond it the next request refits (the report says which happened and why).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmeraser import distributed
from llmeraser.data import Example
from llmeraser.errors import AdapterError, ConfigError, ResourceError, SolverError
from llmeraser.io import atomic_dir
from llmeraser.params import ParamView
from llmeraser.resources import require
from llmeraser.task import Task

logger = logging.getLogger(__name__)

KINDS = ("kfac", "ekfac", "woodbury", "datainf")
FISHERS = ("mc", "empirical")
FORMAT = 1
FACTORS_FILE, META_FILE, DAMPING_FILE = "factors.safetensors", "meta.json", "damping.json"


@dataclass
class FactorArguments:
    """How curvature factors are fitted."""

    fisher: str = field(default="mc", metadata={
        "help": "mc: gradients at targets sampled from the model (the Gauss-Newton matrix in expectation); "
                "empirical: gradients at the training targets"})
    samples: int = field(default=0, metadata={"help": "fit on this many training examples drawn at random; 0 = all"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward pass of the fit"})
    seed: int = field(default=0, metadata={"help": "seed of the sample and of the sampled targets"})
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.fisher not in FISHERS:
            raise ConfigError(f"unknown fisher {self.fisher!r}; expected one of {', '.join(FISHERS)}")
        if self.samples < 0 or self.batch_size < 1:
            raise ConfigError(f"samples must be ≥ 0 and batch_size ≥ 1, got {self.samples}, {self.batch_size}")


@dataclass(frozen=True)
class Block:
    """One trainable linear map: its module, parameter names and shape (in counts a trainable bias)."""

    module: str
    weight: str
    bias: str | None
    out: int
    inp: int

    @property
    def dim(self) -> int:
        return self.out * self.inp


def linear_blocks(model: torch.nn.Module) -> list[Block]:
    """The trainable linear maps of `model`, in parameter order.

    Raises:
        ConfigError: a trainable parameter lies outside every trainable nn.Linear (fitted curvature cannot cover it).
    """
    view = ParamView(model)
    blocks, covered = [], set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.weight.requires_grad:
            prefix = f"{name}." if name else ""
            bias = f"{prefix}bias" if m.bias is not None and m.bias.requires_grad else None
            blocks.append(Block(name, f"{prefix}weight", bias, m.out_features, m.in_features + (bias is not None)))
            covered |= {f"{prefix}weight", bias}
    left = [n for n in view.names if n not in covered]
    if left:
        raise ConfigError(f"fitted curvature covers trainable nn.Linear layers only, but {len(left)} trainable "
                          f"parameter(s) lie elsewhere (e.g. {left[0]!r}); use --solver cg")
    order = {n: i for i, n in enumerate(view.names)}
    return sorted(blocks, key=lambda b: order[b.weight])


class _Capture:
    """Forward hooks that keep, for one batch, each block's inputs and (through tensor hooks) output gradients."""

    def __init__(self, model: torch.nn.Module, blocks: Sequence[Block]):
        modules = dict(model.named_modules())
        self.acts: dict[str, list] = {b.module: [] for b in blocks}
        self.grads: dict[str, list] = {b.module: [] for b in blocks}
        self.handles = [modules[b.module].register_forward_hook(self._hook(b.module)) for b in blocks]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            idx = len(self.acts[name])
            self.acts[name].append(inputs[0].detach())
            self.grads[name].append(None)
            if output.requires_grad:
                output.register_hook(lambda g: self.grads[name].__setitem__(idx, g.detach()))
        return hook

    def input_key(self, block: Block) -> tuple:
        """Equal for blocks that read the very same input tensors (LoRA A of q_proj and v_proj read one hidden
        state), so their A factor is computed once."""
        acts = self.acts[block.module]
        return (block.bias is not None, *[(x.data_ptr(), tuple(x.shape), tuple(x.stride())) for x in acts])

    def take(self, block: Block, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, g, m): inputs (b, T, in), output gradients (b, T, out) over the block's calls, token weights (b, T)."""
        acts, grads = self.acts[block.module], self.grads[block.module]
        if not acts:
            raise ConfigError(f"layer {block.module!r} was not used by the task's forward pass")
        b = acts[0].shape[0]
        a = torch.cat([x.reshape(b, -1, x.shape[-1]) for x in acts], dim=1)
        g = torch.cat([torch.zeros(*x.shape[:-1], block.out, dtype=x.dtype, device=x.device) if y is None else y
                       for x, y in zip(acts, grads, strict=True)], dim=1).reshape(b, -1, block.out)
        if block.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        m = mask.repeat(1, len(acts)).to(a.dtype) if mask is not None and mask.shape[1] * len(acts) == a.shape[1] \
            else torch.ones(a.shape[:2], dtype=a.dtype, device=a.device)
        self.acts[block.module], self.grads[block.module] = [], []
        return a, g, m

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def example_generators(seed: int, ids: Sequence[str]) -> list[torch.Generator]:
    """One generator per example, seeded by (seed, example id): an example's sampled targets do not depend on the
    batch or rank it lands in (a sharded fit equals the single-process one), nor on which other examples are in the
    set (a refit after a removal draws the same targets for the examples that remain)."""
    def mixed(key: str) -> int:  # hashed: nearby integer seeds give correlated Mersenne-Twister streams (measured)
        return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1

    return [torch.Generator().manual_seed(mixed(key)) for key in ids]


def _pass(model: torch.nn.Module, task: Task, examples: Sequence[Example], blocks: Sequence[Block],
          args: FactorArguments, desc: str):
    """Yield (batch indices, {module: (a, g, m)}) for each batch of this rank's shard, the gradients those of the
    Fisher pseudo-loss."""
    if args.fisher == "mc" and not hasattr(task, "fisher_loss"):
        raise ConfigError(f"task {type(task).__name__} has no fisher_loss (needed by fisher='mc'); "
                          f"use fisher='empirical'")
    params = ParamView(model).params
    capture = _Capture(model, blocks)
    try:
        for idx in tqdm(distributed.batches(len(examples), args.batch_size), desc=desc, disable=not args.progress,
                        leave=False):
            batch = task.collate([examples[i] for i in idx])
            outputs = task.forward(model, batch)
            if args.fisher == "mc":
                pseudo = task.fisher_loss(outputs, batch, example_generators(args.seed, [examples[i].id for i in idx]))
            else:
                pseudo = task.loss(outputs, batch)
            torch.autograd.grad(pseudo.sum(), params, allow_unused=True)  # fills the tensor hooks
            mask = batch.get("attention_mask")
            keys = {b.module: capture.input_key(b) for b in blocks}
            yield idx, keys, {b.module: capture.take(b, mask) for b in blocks}
    finally:
        capture.remove()


class Factors:
    """A fitted curvature approximation F of the training objective's Gauss-Newton matrix (or empirical Fisher).

    `solve(b, λ, view)` returns (F + λI)⁻¹ b for a flat vector b in `ParamView` order. `tensors` holds the fit:
    per block `{m}.QA`, `{m}.QG` (eigenvectors of A and G) and `{m}.eA`, `{m}.eG` (their eigenvalues, kfac) or
    `{m}.lam` (EK-FAC's corrected eigenvalues, out × in); `{m}.grads` (N × dim per-example gradients) and, for
    woodbury, `gram.U`, `gram.s` (the eigendecomposition of G Gᵀ)."""

    def __init__(self, kind: str, blocks: Sequence[Block], tensors: dict[str, torch.Tensor], meta: dict):
        if kind not in KINDS:
            raise ConfigError(f"unknown curvature approximation {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind, self.blocks, self.tensors, self.meta = kind, list(blocks), tensors, meta

    def _blocks_of(self, b: torch.Tensor, view: ParamView) -> list[torch.Tensor]:
        parts = dict(zip(view.names, view.unflatten(b), strict=True))
        mine = {n for blk in self.blocks for n in (blk.weight, blk.bias) if n}
        if set(view.names) != mine:
            raise AdapterError(f"the fitted {self.kind} factors cover other parameters than the model's "
                               f"({len(mine)} vs {len(view.names)} tensors); refit them for this adapter")
        out = []
        for blk in self.blocks:
            v = parts[blk.weight]
            if blk.bias is not None:
                v = torch.cat([v, parts[blk.bias][:, None]], dim=1)
            if tuple(v.shape) != (blk.out, blk.inp):
                raise AdapterError(f"layer {blk.module!r} is {tuple(v.shape)} but the factors were fitted for "
                                   f"{(blk.out, blk.inp)}; refit them for this adapter")
            out.append(v.to("cpu", torch.float64))  # the fit lives on the CPU (a GPU model's too)
        return out

    def _flat(self, xs: list[torch.Tensor], view: ParamView) -> torch.Tensor:
        parts = {}
        for blk, x in zip(self.blocks, xs, strict=True):
            parts[blk.weight] = x[:, : blk.inp - (blk.bias is not None)]
            if blk.bias is not None:
                parts[blk.bias] = x[:, -1]
        return view.flatten([parts[n].to(view.device) for n in view.names]).to(view.dtype)

    def solve(self, b: torch.Tensor, damping: float, view: ParamView) -> torch.Tensor:
        """x = (F + λI)⁻¹ b, block by block (woodbury couples the blocks through its N × N system)."""
        if not (math.isfinite(damping) and damping >= 0):
            raise ConfigError(f"damping must be a finite number ≥ 0, got {damping}")
        if damping == 0 and self.kind in ("woodbury", "datainf"):
            raise SolverError(f"{self.kind}: the Fisher of N examples has rank ≤ N < p, so it needs damping > 0 "
                              f"(or a training l2)")
        vs, t = self._blocks_of(b, view), self.tensors
        if self.kind in ("kfac", "ekfac"):
            xs = self._kronecker(vs, lambda r, lam: r / (lam + damping))
        elif self.kind == "woodbury":  # the N × p products in the stored precision, the N × N system in float64
            n = t["gram.s"].shape[0]
            u, s = t["gram.U"].double(), t["gram.s"].double()
            gv = sum(_gmv(t[f"{blk.module}.grads"], v.reshape(-1)) for blk, v in zip(self.blocks, vs, strict=True))
            c = u @ ((u.T @ gv) / (n * damping + s))
            xs = [(v - _gmv(t[f"{blk.module}.grads"].T, c).view_as(v)) / damping
                  for blk, v in zip(self.blocks, vs, strict=True)]
        else:  # datainf
            xs = []
            for blk, v in zip(self.blocks, vs, strict=True):
                g = t[f"{blk.module}.grads"]
                coef = _gmv(g, v.reshape(-1)) / (damping + g.pow(2).sum(1).double())
                xs.append((v - _gmv(g.T, coef).view_as(v) / g.shape[0]) / damping)
        x = self._flat(xs, view)
        if not bool(torch.isfinite(x).all()):
            raise SolverError(f"{self.kind}: the solution is non-finite at λ={damping}; use a larger --damping")
        return x

    def matvec(self, v: torch.Tensor, view: ParamView) -> torch.Tensor:
        """F v (for tests: the matrix this approximation inverts)."""
        vs, t = self._blocks_of(v, view), self.tensors
        if self.kind == "woodbury":
            n = t["gram.s"].shape[0]
            gv = sum(_gmv(t[f"{blk.module}.grads"], x.reshape(-1)) for blk, x in zip(self.blocks, vs, strict=True))
            return self._flat([_gmv(t[f"{blk.module}.grads"].T, gv).view_as(x) / n
                               for blk, x in zip(self.blocks, vs, strict=True)], view)
        if self.kind == "datainf":
            raise ConfigError("datainf approximates the inverse directly; it has no matrix F")
        return self._flat(self._kronecker(vs, lambda r, lam: r * lam), view)

    def _kronecker(self, vs: list[torch.Tensor], scale) -> list[torch.Tensor]:
        """Q_G scale(Q_Gᵀ V Q_A, Λ) Q_Aᵀ per block, Λ EK-FAC's diagonal or K-FAC's outer product of eigenvalues."""
        t, xs = self.tensors, []
        for blk, v in zip(self.blocks, vs, strict=True):
            qa, qg = t[f"{blk.module}.QA"].double(), t[f"{blk.module}.QG"].double()
            lam = t[f"{blk.module}.lam"].double() if self.kind == "ekfac" else \
                torch.outer(t[f"{blk.module}.eG"].double(), t[f"{blk.module}.eA"].double())
            xs.append(qg @ scale(qg.T @ v @ qa, lam) @ qa.T)
        return xs

    @property
    def fit_seconds(self) -> float:
        return float(self.meta.get("seconds", {}).get("total", 0.0))


def _gmv(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """g @ v in g's precision (no float64 copy of a large stored matrix), returned in float64."""
    return (g @ v.to(g.dtype)).double()


def fit_factors(model: torch.nn.Module, task: Task, examples: Sequence[Example], kinds: Sequence[str] = ("ekfac",),
                args: FactorArguments | None = None) -> dict[str, Factors]:
    """Fit the approximations `kinds` from one pass over `examples` (two for EK-FAC when the per-example gradients
    do not fit in memory). θ is not changed; the model is put in eval mode. Under torch.distributed each rank passes
    over its shard and the sums are all-reduced: every rank returns the same fit.

    Returns:
        kind → Factors, each with meta: kind, fisher, seed, n_examples, n_tokens, seconds {pass, eigen, correction,
        gram, total} (the shared pass counted in each).
    """
    args = args or FactorArguments()
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ConfigError(f"unknown curvature approximation(s) {unknown or kinds}; expected some of {', '.join(KINDS)}")
    examples = list(examples)
    if 0 < args.samples < len(examples):
        gen = torch.Generator().manual_seed(args.seed)
        examples = [examples[i] for i in sorted(torch.randperm(len(examples), generator=gen)[: args.samples].tolist())]
    if not examples:
        raise ConfigError("fitting curvature needs at least one training example")
    blocks = linear_blocks(model)
    view = ParamView(model)
    n, total = len(examples), sum(b.dim for b in blocks)
    mine = distributed.batch_range(n, args.batch_size)  # this rank's examples (all of them in one process)
    need_grads = bool({"woodbury", "datainf"} & set(kinds))
    keep = need_grads
    if "ekfac" in kinds and not need_grads:
        # EK-FAC's correction needs per-example gradients after the eigenbases: keep them if they fit, else re-pass
        try:
            require(len(mine) * total * view.params[0].element_size(), "kept per-example gradients", "")
            keep = True
        except ResourceError:  # not enough memory: a second pass instead
            keep = False
    elif need_grads:
        require(n * total * view.params[0].element_size(),
                f"per-example gradients for {'/'.join(kinds)} ({n:,} examples × {total:,} parameters)",
                "use --solver ekfac (Kronecker factors, memory independent of the number of examples)")
    model.eval()
    start = time.perf_counter()
    f64 = torch.float64
    a_sum = {b.module: torch.zeros(b.inp, b.inp, dtype=f64) for b in blocks}
    g_sum = {b.module: torch.zeros(b.out, b.out, dtype=f64) for b in blocks}
    tokens = {b.module: 0.0 for b in blocks}
    grads = {b.module: torch.empty(len(mine), b.dim, dtype=view.dtype) for b in blocks} if keep else {}  # my rows
    shared: dict[str, str] = {}  # block → the first block with the same inputs (its A factor serves both)
    for idx, keys, captured in _pass(model, task, examples, blocks, args, "fitting curvature"):
        if not shared:
            first = {}
            shared = {b.module: first.setdefault(keys[b.module], b.module) for b in blocks}
        elif any(keys[b.module] != keys[shared[b.module]] for b in blocks):
            raise ConfigError("layers that shared their inputs in the first batch did not in a later one")
        for blk in blocks:
            a, g, m = captured[blk.module]
            gg = g.reshape(-1, blk.out)[m.reshape(-1) > 0]  # padding tokens have zero gradient
            # products in the model's precision (a float32 model's are fast), sums over batches in float64
            g_sum[blk.module] += (gg.T @ gg).to(f64).cpu()
            if shared[blk.module] == blk.module:
                am = a.reshape(-1, blk.inp)[m.reshape(-1) > 0]  # padding tokens left out
                a_sum[blk.module] += (am.T @ am).to(f64).cpu()
                tokens[blk.module] += float(m.sum())
            if keep:
                rows = slice(idx[0] - mine.start, idx[-1] + 1 - mine.start)
                grads[blk.module][rows] = torch.bmm(g.transpose(1, 2), a).reshape(len(idx), -1).cpu()
    if distributed.is_distributed():  # add up the ranks' sums (rank 0 always has examples: its sharing pattern)
        shared = distributed.broadcast_json(shared, "factor pass")
        for blk in blocks:
            distributed.all_reduce(g_sum[blk.module], "factor pass")
            distributed.all_reduce(a_sum[blk.module], "factor pass")
        counted = distributed.all_reduce(torch.tensor([tokens[b.module] for b in blocks], dtype=f64), "factor pass")
        tokens = {b.module: float(c) for b, c in zip(blocks, counted, strict=True)}
    seconds = {"pass": time.perf_counter() - start}
    meta = {"fisher": args.fisher, "seed": args.seed, "n_examples": n, "format": FORMAT,
            "n_tokens": int(max(tokens.values())), "blocks": [dataclasses.asdict(b) for b in blocks]}
    out: dict[str, Factors] = {}
    if {"kfac", "ekfac"} & set(kinds):
        t0 = time.perf_counter()
        eig: dict[str, torch.Tensor] = {}
        a_eig: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for blk in blocks:  # eigendecompositions in the model's precision (float32: about twice as fast)
            rep = shared[blk.module]
            if rep not in a_eig:
                a_eig[rep] = torch.linalg.eigh((a_sum[rep] / max(tokens[rep], 1.0)).to(view.dtype))
            ea, qa = (t.to(f64) for t in a_eig[rep])
            eg, qg = (t.to(f64) for t in torch.linalg.eigh((g_sum[blk.module] / n).to(view.dtype)))
            eig |= {f"{blk.module}.QA": qa, f"{blk.module}.QG": qg, f"{blk.module}.eA": ea.clamp(min=0),
                    f"{blk.module}.eG": eg.clamp(min=0)}
        seconds["eigen"] = time.perf_counter() - t0
        if "kfac" in kinds:
            out["kfac"] = _factors("kfac", blocks, eig, meta, seconds, ("pass", "eigen"), view)
        if "ekfac" in kinds:
            t0 = time.perf_counter()
            lam = {b.module: torch.zeros(b.out, b.inp, dtype=f64) for b in blocks}

            def correct(blk: Block, g_rows: torch.Tensor) -> None:
                w = g_rows.view(-1, blk.out, blk.inp)
                qa, qg = (eig[f"{blk.module}.{q}"].to(w.dtype) for q in ("QA", "QG"))
                lam[blk.module] += (qg.T @ w @ qa).to(f64).pow(2).sum(0)

            if keep:
                for blk in blocks:
                    for s in range(0, len(mine), 64):
                        correct(blk, grads[blk.module][s:s + 64])
            else:
                for _, _, captured in _pass(model, task, examples, blocks, args, "EK-FAC correction"):
                    for blk in blocks:
                        a, g, _m = captured[blk.module]
                        correct(blk, torch.bmm(g.transpose(1, 2), a).cpu())
            for blk in blocks:
                distributed.all_reduce(lam[blk.module], "EK-FAC correction")
            seconds["correction"] = time.perf_counter() - t0
            tensors = {k: v for k, v in eig.items() if k.endswith((".QA", ".QG"))}
            tensors |= {f"{m}.lam": v / n for m, v in lam.items()}
            out["ekfac"] = _factors("ekfac", blocks, tensors, meta, seconds, ("pass", "eigen", "correction"), view)
    if need_grads:
        if distributed.is_distributed():  # woodbury and datainf solve with every example's gradient: gather them
            for blk in blocks:
                full = torch.zeros(n, blk.dim, dtype=view.dtype)
                full[mine.start:mine.stop] = grads[blk.module]
                grads[blk.module] = distributed.all_reduce(full, "per-example gradients")  # rows from one rank each
        by_block = {f"{m}.grads": g for m, g in grads.items()}
        if "datainf" in kinds:
            out["datainf"] = _factors("datainf", blocks, by_block, meta, seconds, ("pass",), view)
        if "woodbury" in kinds:
            t0 = time.perf_counter()
            gram = sum(g.to(f64) @ g.to(f64).T for g in grads.values())
            s, u = torch.linalg.eigh(gram)
            seconds["gram"] = time.perf_counter() - t0
            out["woodbury"] = _factors("woodbury", blocks, by_block | {"gram.U": u, "gram.s": s.clamp(min=0)}, meta,
                                       seconds, ("pass", "gram"), view)
    logger.info("fitted %s on %d examples in %.1f s", "/".join(kinds), n, time.perf_counter() - start)
    return {k: out[k] for k in kinds}


def _factors(kind: str, blocks, tensors, meta, seconds, phases, view: ParamView) -> Factors:
    store_dtype = torch.float64 if view.dtype == torch.float64 else torch.float32
    spent = {p: seconds[p] for p in phases}
    return Factors(kind, blocks, {k: v.to(store_dtype).contiguous() for k, v in tensors.items()},
                   {**meta, "kind": kind, "seconds": {**spent, "total": sum(spent.values())}})


# --------------------------------------------------------------------------------------------------- the store
def default_store(adapter: str | os.PathLike) -> Path:
    """`<adapter>.factors`, beside the adapter folder."""
    p = Path(adapter).resolve()
    return p.with_name(p.name + ".factors")


class FactorStore:
    """Fitted factors on disk: `<root>/<kind>/{factors.safetensors, meta.json}`, keyed by the adapter's weights
    hash and the training set's hash (`meta.json`: adapter_sha256, train_sha256, and the fit's details)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def load(self, kind: str, adapter_sha256: str, train_sha256: str) -> tuple[Factors | None, str]:
        """(factors, why): the stored fit of `kind` if its keys match, else (None, the reason it cannot be used)."""
        folder = self.root / kind
        if not (folder / META_FILE).is_file():
            return None, f"no {kind} factors in {self.root}"
        from safetensors import SafetensorError

        try:
            meta = json.loads((folder / META_FILE).read_text())
            if meta.get("format") != FORMAT:
                return None, f"stored {kind} factors have format {meta.get('format')}, this version reads {FORMAT}"
            if meta.get("adapter_sha256") != adapter_sha256:
                return None, f"stored {kind} factors were fitted for another adapter (its weights changed)"
            if meta.get("train_sha256") != train_sha256:
                return None, f"stored {kind} factors were fitted on another training set"
            from safetensors.torch import load_file

            tensors = load_file(str(folder / FACTORS_FILE))
            blocks = [Block(**b) for b in meta["blocks"]]
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            return None, f"stored {kind} factors in {folder} are unreadable ({type(e).__name__}: {e})"
        return Factors(kind, blocks, tensors, meta), f"loaded from {folder}"

    def save(self, factors: Factors, adapter_sha256: str, train_sha256: str, **extra: object) -> Path:
        """Write `factors` under `<root>/<kind>` atomically (replacing an older fit of that kind)."""
        from safetensors.torch import save_file

        meta = {**factors.meta, **extra, "adapter_sha256": adapter_sha256, "train_sha256": train_sha256}
        target = self.root / factors.kind
        self.root.mkdir(parents=True, exist_ok=True)
        old = None
        if target.exists():
            old = target.with_name(f".{factors.kind}.old-{os.getpid()}")
            target.rename(old)
        with atomic_dir(target) as tmp:
            save_file(factors.tensors, str(tmp / FACTORS_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        factors.meta = meta
        return target

    def save_damping(self, record: dict, adapter_sha256: str, train_sha256: str) -> Path:
        """Store the damping `damping.select_damping` chose, keyed like the factors."""
        from llmeraser.io import atomic_write_json

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / DAMPING_FILE
        atomic_write_json(path, {**record, "adapter_sha256": adapter_sha256, "train_sha256": train_sha256})
        return path

    def load_damping(self, adapter_sha256: str, train_sha256: str) -> tuple[dict | None, str]:
        """(record, why): the stored damping choice if it was made for this adapter and training set."""
        path = self.root / DAMPING_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None, f"no damping chosen yet in {self.root}"
        except (OSError, ValueError) as e:
            return None, f"{path} is unreadable ({type(e).__name__})"
        if record.get("adapter_sha256") != adapter_sha256 or record.get("train_sha256") != train_sha256:
            return None, f"the damping in {path} was chosen for another adapter or training set"
        return record, f"chosen by tune-damping ({path})"

    def derive(self, factors: Factors, source: FactorStore, adapter_sha256: str, train_sha256: str, *,
               edited: int, refit_fraction: float, request_sha256: str) -> tuple[bool, str]:
        """Record `factors` (fitted for an earlier adapter in `source`) as this store's fit for the adapter a request
        produced, unless the examples edited since the last real fit exceed `refit_fraction` of the training set.

        The factors are averages over the N training examples taken at θ̂: a request that edits k of them changes
        them by O(k/N), and Δθ moves the activations they were taken at by O(‖Δθ‖); both are small next to the Monte
        Carlo noise of a fit while k/N is small, so the fit is reused (hard-linked, no copy) until the edits add up.
        Returns (derived, why)."""
        n = int(factors.meta.get("n_train", factors.meta["n_examples"]))
        since = int(factors.meta.get("edited_since_fit", 0)) + edited
        if since > refit_fraction * n:
            return False, (f"{since} examples edited since the {factors.kind} fit ({since / n:.1%} of {n} > "
                           f"refit fraction {refit_fraction:.0%}): the next request refits")
        src = source.root / factors.kind
        target = self.root / factors.kind
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**factors.meta, "adapter_sha256": adapter_sha256, "train_sha256": train_sha256,
                "edited_since_fit": since, "derived_from": {"adapter_sha256": factors.meta.get("adapter_sha256"),
                                                            "request_sha256": request_sha256}}
        if target.exists():
            shutil.rmtree(target)
        with atomic_dir(target) as tmp:
            try:
                os.link(src / FACTORS_FILE, tmp / FACTORS_FILE)
            except OSError:  # another file system: copy
                shutil.copyfile(src / FACTORS_FILE, tmp / FACTORS_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        damping = source.root / DAMPING_FILE
        if damping.is_file():  # the λ chosen for the lineage's fit goes with it, re-keyed
            record = json.loads(damping.read_text())
            if record.get("adapter_sha256") == factors.meta.get("adapter_sha256"):
                self.save_damping({**record, "derived": True}, adapter_sha256, train_sha256)
        return True, (f"{factors.kind} factors reused for the new adapter: {since} of {n} examples "
                      f"({since / n:.1%}) edited since the fit, within the refit fraction {refit_fraction:.0%}")
