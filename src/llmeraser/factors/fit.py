"""Fitted curvature: the approximation F of the training objective's Gauss-Newton matrix that a fitted solver
inverts, fitted once per adapter from one pass (`capture`) and solved directly for any λ.

The kinds (registered in the solver registry as fitted solvers): `kronecker` (kfac, ekfac) and `gram` (woodbury,
datainf). Solving adds the training objective's l2 to the damping (the eraser does).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmeraser.data import Example
from llmeraser.errors import AdapterError, ConfigError, SolverError
from llmeraser.factors import gram, kronecker, memory
from llmeraser.factors.capture import Block, collect, linear_blocks
from llmeraser.params import ParamView
from llmeraser.resources import OOM_ADVICE, device_memory
from llmeraser.task import Task

logger = logging.getLogger(__name__)

MODULES = {**{k: kronecker for k in kronecker.KINDS}, **{k: gram for k in gram.KINDS}}
KINDS = tuple(MODULES)
HELP = {**kronecker.HELP, **gram.HELP}
FISHERS = ("mc", "empirical")
TOP = "fit.top_eigenvalue"  # the stored scale of F (one float64), beside the kind's own tensors
FORMAT = 1
# Every kind's F is an average over the training set (kfac/ekfac's factors over tokens and EK-FAC's correction over
# examples; woodbury's and datainf's Fisher over examples): with samples = 0 it is estimated from at most this many
# examples drawn at random, so a fit costs at most this many examples' forward and backward passes (0.2 of an epoch at
# N = 10,000) and the Gram kinds' N × N system and stored gradients stop growing with N — kronfluence caps its
# covariance and eigenvalue passes the same way. What the sample costs in accuracy, against the noise a fit on all N
# has anyway (its sampled Fisher targets): bench/fit_sample.py, docs/fit-on-device.md#a-sample-of-the-training-set.
FIT_SAMPLE = 2048


def sample_size(n: int, samples: int = 0) -> int:
    """How many of n examples a fit passes over: `samples` (capped at n), or with samples = 0 at most FIT_SAMPLE."""
    return min(samples or FIT_SAMPLE, n)


@dataclass
class FactorArguments:
    """How curvature factors are fitted."""

    fisher: str = field(default="mc", metadata={
        "help": "mc: gradients at targets sampled from the model (the Gauss-Newton matrix in expectation); "
                "empirical: gradients at the training targets"})
    samples: int = field(default=0, metadata={
        "help": f"fit on this many training examples drawn at random (≥ the training set: all of them); 0 = "
                f"at most {FIT_SAMPLE:,} (every kind's F is an average over examples: a sample estimates it, at a "
                f"fraction of an epoch)"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward pass of the fit"})
    seed: int = field(default=0, metadata={"help": "seed of the sample and of the sampled targets"})
    sketch: int = field(default=0, metadata={
        "help": "woodbury/datainf: 0 = exact while the N per-example gradients fit in memory, else a sketch as large "
                "as fits (up to 1024); K > 0 = always a sketch of size K (a rank-K Nyström approximation for "
                "woodbury, K examples drawn at random for datainf)"})
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.fisher not in FISHERS:
            raise ConfigError(f"unknown fisher {self.fisher!r}; expected one of {', '.join(FISHERS)}")
        if self.samples < 0 or self.batch_size < 1 or self.sketch < 0:
            raise ConfigError(f"samples and sketch must be ≥ 0 and batch_size ≥ 1, got {self.samples}, "
                              f"{self.sketch}, {self.batch_size}")


class Factors:
    """A fitted curvature approximation F of the training objective's Gauss-Newton matrix (or empirical Fisher).

    `solve(b, λ, view)` returns (F + λI)⁻¹ b for a flat vector b in `ParamView` order. `tensors` holds the fit:
    per block `{m}.QA`, `{m}.QG` (eigenvectors of A and G) and `{m}.eA`, `{m}.eG` (their eigenvalues, kfac) or
    `{m}.lam` (EK-FAC's corrected eigenvalues, out × in); `{m}.grads` (N × dim per-example gradients) and, for
    woodbury, `gram.U`, `gram.s` (the eigendecomposition of G Gᵀ) — or, when G did not fit in memory, `sketch.U`,
    `sketch.e` (a rank-k Nyström F ≈ U diag(e) Uᵀ; `factors.sketch`), and datainf's `{m}.grads` then hold k sampled
    examples' rows (meta `gram` says which)."""

    def __init__(self, kind: str, blocks: Sequence[Block], tensors: dict[str, torch.Tensor], meta: dict):
        if kind not in KINDS:
            raise ConfigError(f"unknown curvature approximation {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind, self.blocks, self.tensors, self.meta = kind, list(blocks), tensors, meta
        self._math = MODULES[kind]

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
        x = self._flat(self._math.solve(self.kind, self.tensors, self.blocks, self._blocks_of(b, view), damping),
                       view)
        if not bool(torch.isfinite(x).all()):
            raise SolverError(f"{self.kind}: the solution is non-finite at λ={damping}; use a larger --damping")
        return x

    def matvec(self, v: torch.Tensor, view: ParamView) -> torch.Tensor:
        """F v (for tests: the matrix this approximation inverts)."""
        return self._flat(self._math.matvec(self.kind, self.tensors, self.blocks, self._blocks_of(v, view)), view)

    def top_eigenvalue(self) -> float:
        """The largest eigenvalue of F: the curvature's scale, which a relative damping is taken against (computed
        when fitted and stored with the factors; a store written before that computes it now)."""
        if TOP in self.tensors:
            return float(self.tensors[TOP][0])
        return self._math.top_eigenvalue(self.kind, self.tensors, self.blocks)

    @property
    def fit_seconds(self) -> float:
        return float(self.meta.get("seconds", {}).get("total", 0.0))


def fit_factors(model: torch.nn.Module, task: Task, examples: Sequence[Example], kinds: Sequence[str] = ("ekfac",),
                args: FactorArguments | None = None) -> dict[str, Factors]:
    """Fit the approximations `kinds` from one pass over `examples` (two for EK-FAC when the per-example gradients
    do not fit in memory). θ is not changed; the model is put in eval mode. Under torch.distributed each rank passes
    over its shard and the sums are all-reduced: every rank returns the same fit.

    Returns:
        kind → Factors, each with meta: kind, fisher, seed, n_examples, n_tokens, seconds {pass, eigen, correction,
        gram, total} (the shared pass counted in each), and for woodbury/datainf `gram` {method: exact, nystrom or
        sampled; size; why}. The pass and the decompositions run on the model's device; the factors come to the host
        once, at the end.

    Raises:
        ResourceError: the device ran out of memory (naming the options that need less), or not even the smallest
            sketch of the Gram kinds fits.
    """
    args = args or FactorArguments()
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ConfigError(f"unknown curvature approximation(s) {unknown or kinds}; expected some of {', '.join(KINDS)}")
    examples = list(examples)
    samples = sample_size(len(examples), args.samples)
    if samples < len(examples):
        gen = torch.Generator().manual_seed(args.seed)
        # host: which examples to fit on (indices, the same on every device)
        examples = [examples[i] for i in sorted(torch.randperm(len(examples), generator=gen)[:samples].tolist())]
    if not examples:
        raise ConfigError("fitting curvature needs at least one training example")
    blocks = linear_blocks(model)  # refuses parameters outside linear layers before any work
    view = ParamView(model)
    wanted = set(kinds)
    plan = memory.plan(model, [b.dim for b in blocks], kinds, len(examples), args)
    for kind, how in plan.gram.items():
        (logger.info if how["method"] == "exact" else logger.warning)(
            "%s: %s (%s)", kind, "exact" if how["method"] == "exact" else
            f"{how['method']} sketch of size {how['size']}", how["why"])
    with device_memory(f"the {'/'.join(kinds)} fit over {len(examples):,} examples in batches of "
                       f"{args.batch_size}", OOM_ADVICE["fit-curvature"]):
        stats = collect(model, task, examples, blocks, args, plan)
        fits = {}
        if wanted & set(kronecker.KINDS):
            fits |= kronecker.fit(stats, wanted, model, task, args, view.dtype)
        if wanted & set(gram.KINDS):
            fits |= gram.fit(stats, wanted, view.dtype)
    meta = {"fisher": args.fisher, "seed": args.seed, "n_examples": stats.n, "format": FORMAT,
            "n_tokens": int(max(stats.tokens.values())), "blocks": [dataclasses.asdict(b) for b in stats.blocks]}
    store_dtype = torch.float64 if view.dtype == torch.float64 else torch.float32
    out = {}
    for kind in kinds:
        tensors, seconds = fits[kind]
        # F's scale, which a relative damping is taken against: once here, on the device, not in every request
        top = MODULES[kind].top_eigenvalue(kind, tensors, stats.blocks)
        host = {k: v.to("cpu", store_dtype).contiguous() for k, v in tensors.items()}  # the fit's one transfer
        host[TOP] = torch.tensor([top], dtype=torch.float64)  # host: the stored scalar
        extra = {"gram": plan.gram[kind]} if kind in plan.gram else {}
        out[kind] = Factors(kind, stats.blocks, host,
                            {**meta, **extra, "kind": kind, "seconds": {**seconds, "total": sum(seconds.values())}})
    logger.info("fitted %s on %d examples in %.1f s", "/".join(kinds), stats.n, max(f.fit_seconds for f in
                                                                                     out.values()))
    return out
