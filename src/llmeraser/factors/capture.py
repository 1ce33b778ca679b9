"""Capturing what every fitted curvature needs, in one pass over the training set.

Every trainable parameter of a LoRA model sits in an `nn.Linear` (LoRA's A and B are each one; a trainable head or
projector is another), so the fitted approximations are block-diagonal, one block per linear map W (out × in, a
trainable bias appended as an extra input column). One pass (forward, then backward of a pseudo-loss) records, per
block, the inputs aₜ and output gradients gₜ of every token t, and accumulates:

- the per-block sums Σ aₜaₜᵀ and Σ gₜgₜᵀ (the Kronecker factors' statistics, `kronecker`);
- per-example gradients ∇W_i = Σₜ gₜ aₜᵀ (one bmm per block: far cheaper than one backward per example), kept when
  a kind needs them (`gram`, and EK-FAC's correction).

Which Fisher: the pseudo-loss is the task's `fisher_loss` (fisher="mc": for the causal-LM task, targets sampled from
the model's own prediction, so E[F] is the Gauss-Newton matrix the iterative solvers use) or the training loss
itself (fisher="empirical"). See docs/math.md#curvature.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from llmeraser import distributed
from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.factors.memory import Plan
from llmeraser.factors.sketch import Nystrom
from llmeraser.params import ParamView
from llmeraser.task import Task


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


class Capture:
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


def example_generators(seed: int, ids: Sequence[str], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per example on `device` (where the model is, so the targets are drawn there), seeded by (seed,
    example id): an example's sampled targets do not depend on the batch or rank it lands in (a sharded fit equals
    the single-process one), nor on which other examples are in the set (a refit after a removal draws the same
    targets for the examples that remain). Devices have different generators (the CPU's Mersenne Twister, CUDA's
    Philox), so the draws are reproducible per device type."""
    def mixed(key: str) -> int:  # hashed: nearby integer seeds give correlated Mersenne-Twister streams (measured)
        return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1

    return [torch.Generator(device=device).manual_seed(mixed(key)) for key in ids]


def passes(model: torch.nn.Module, task: Task, examples: Sequence[Example], blocks: Sequence[Block],
          args, desc: str) -> Iterator:
    """Yield (batch indices, input keys, {module: (a, g, m)}) for each batch of this rank's shard, the gradients
    those of the Fisher pseudo-loss."""
    if args.fisher == "mc" and not hasattr(task, "fisher_loss"):
        raise ConfigError(f"task {type(task).__name__} has no fisher_loss (needed by fisher='mc'); "
                          f"use fisher='empirical'")
    view = ParamView(model)
    capture = Capture(model, blocks)
    try:
        for idx in tqdm(distributed.batches(len(examples), args.batch_size), desc=desc, disable=not args.progress,
                        leave=False):
            batch = task.collate([examples[i] for i in idx])
            outputs = task.forward(model, batch)
            if args.fisher == "mc":
                gens = example_generators(args.seed, [examples[i].id for i in idx], view.device)
                pseudo = task.fisher_loss(outputs, batch, gens)
            else:
                pseudo = task.loss(outputs, batch)
            torch.autograd.grad(pseudo.sum(), view.params, allow_unused=True)  # fills the tensor hooks
            mask = batch.get("attention_mask")
            mask = mask.to(view.device) if mask is not None else None
            keys = {b.module: capture.input_key(b) for b in blocks}
            yield idx, keys, {b.module: capture.take(b, mask) for b in blocks}
    finally:
        capture.remove()


def precision(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(products, sums): a batch's products in the model's precision but at least float32 (bf16 products lose
    digits), their sums over batches in float64 — except on Apple's MPS, which has no float64."""
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return work, torch.float32 if device.type == "mps" else torch.float64


@dataclass
class Statistics:
    """What one pass accumulated, summed over every rank: the inputs of every fitted kind. Its tensors live on the
    model's device (kept gradients where the plan put them); the fit sends its result to the host once."""

    blocks: list[Block]
    examples: list[Example]  # the examples fitted on (the sample, if any)
    shared: dict[str, str]  # block → the first block that reads the same inputs (its A factor serves both)
    a_sum: dict[str, torch.Tensor]  # (in, in) Σ aₜaₜᵀ over counted tokens, only for the blocks in shared.values()
    g_sum: dict[str, torch.Tensor]  # (out, out) Σ gₜgₜᵀ
    tokens: dict[str, float]  # tokens counted per block (padding left out)
    grads: dict[str, torch.Tensor] | None  # (rows, out·in) per-example gradients of this rank's kept rows, if kept
    mine: range  # this rank's examples
    seconds: float
    plan: Plan = field(default_factory=lambda: Plan(kronecker=True))
    sketch: dict[str, torch.Tensor] | None = None  # woodbury's Nyström factors, when the plan made one

    @property
    def n(self) -> int:
        return len(self.examples)

    def kept(self) -> tuple[int, int, int]:
        """(total, lo, hi): how many rows are kept over all ranks, and this rank's share as positions lo:hi among
        them (the kept rows are sorted and a rank's examples contiguous, so its share is one run)."""
        rows = self.plan.rows
        if rows is None:
            return self.n, self.mine.start, self.mine.stop
        return len(rows), bisect.bisect_left(rows, self.mine.start), bisect.bisect_left(rows, self.mine.stop)


def collect(model: torch.nn.Module, task: Task, examples: list[Example], blocks: list[Block], args,
            plan: Plan) -> Statistics:
    """One hooked pass over `examples` (this rank's shard): the Kronecker sums and token counts, and what `plan`
    asks of the per-example gradients (kept, on the device or the host; fed to a Nyström sketch). Everything is
    accumulated on the model's device, nothing goes to the host inside the loop (except gradient rows the plan keeps
    on the host); sums are all-reduced across ranks, kept gradients stay with the rank that computed them."""
    view = ParamView(model)
    device, (work, acc) = view.device, precision(view.dtype, view.device)
    mine = distributed.batch_range(len(examples), args.batch_size)  # this rank's examples (all, in one process)
    model.eval()
    start = time.perf_counter()
    sums = plan.kronecker
    a_sum = {b.module: torch.zeros(b.inp, b.inp, dtype=acc, device=device) for b in blocks} if sums else {}
    g_sum = {b.module: torch.zeros(b.out, b.out, dtype=acc, device=device) for b in blocks} if sums else {}
    tokens = torch.zeros(len(blocks), dtype=acc, device=device)
    stats = Statistics(blocks, examples, {}, a_sum, g_sum, {}, None, mine, 0.0, plan)
    _, lo, hi = stats.kept()
    grads = {b.module: torch.empty(hi - lo, b.dim, dtype=view.dtype, device=device if plan.keep == "device" else
                                   "cpu") for b in blocks} if plan.keep else None
    nys = Nystrom([b.dim for b in blocks], plan.rank, args.seed, device, work, acc) if plan.rank else None
    shared: dict[str, str] = {}
    for idx, keys, captured in passes(model, task, examples, blocks, args, "fitting curvature"):
        if not shared:
            first: dict = {}
            shared = {b.module: first.setdefault(keys[b.module], b.module) for b in blocks}
        elif any(keys[b.module] != keys[shared[b.module]] for b in blocks):
            raise ConfigError("layers that shared their inputs in the first batch did not in a later one")
        rows = []
        for j, blk in enumerate(blocks):
            a, g, m = captured[blk.module]
            w = (m > 0).to(work).reshape(-1, 1)  # padding tokens weigh 0 (no boolean indexing: no device sync)
            if shared[blk.module] == blk.module:
                tokens[j] += w.sum()
            if sums:
                gg = g.reshape(-1, blk.out).to(work) * w  # (padding already has zero gradient; masked anyway)
                g_sum[blk.module] += (gg.T @ gg).to(acc)
                if shared[blk.module] == blk.module:
                    am = a.reshape(-1, blk.inp).to(work) * w
                    a_sum[blk.module] += (am.T @ am).to(acc)
            if plan.per_example:
                rows.append(torch.bmm(g.transpose(1, 2).to(work), a.to(work)).reshape(len(idx), -1))
        if nys is not None:
            nys.add(rows)
        if grads is not None:
            _keep(grads, blocks, rows, idx, stats, lo)
    if not shared:  # this rank had no batch: the sharing pattern comes from rank 0
        shared = {b.module: b.module for b in blocks}
    if distributed.is_distributed():  # add up the ranks' sums (rank 0 always has examples: its sharing pattern)
        shared = distributed.broadcast_json(shared, "factor pass")
        for blk in blocks if sums else ():
            distributed.all_reduce(g_sum[blk.module], "factor pass")
            distributed.all_reduce(a_sum[blk.module], "factor pass")
        distributed.all_reduce(tokens, "factor pass")
    counted = tokens.tolist()  # the pass's one transfer to the host: token counts
    by_block = {b.module: counted[j] for j, b in enumerate(blocks)}
    stats.tokens = {b.module: by_block[shared[b.module]] for b in blocks}
    stats.shared, stats.grads = shared, grads
    stats.sketch = nys.finish(len(examples)) if nys is not None else None
    stats.seconds = time.perf_counter() - start
    return stats


def _keep(grads: dict, blocks: list[Block], rows: list[torch.Tensor], idx: list[int], stats: Statistics,
          lo: int) -> None:
    """Store the batch's per-example gradient rows that the plan keeps (all, or the sampled ones)."""
    if stats.plan.rows is None:
        dst, src = slice(idx[0] - stats.mine.start, idx[-1] + 1 - stats.mine.start), None
    else:
        first = bisect.bisect_left(stats.plan.rows, idx[0])
        last = bisect.bisect_left(stats.plan.rows, idx[-1] + 1)
        if first == last:
            return
        dst = slice(first - lo, last - lo)
        src = torch.tensor([r - idx[0] for r in stats.plan.rows[first:last]], device=rows[0].device)
    for blk, r in zip(blocks, rows, strict=True):
        r = r if src is None else r.index_select(0, src)
        keep = grads[blk.module]
        keep[dst] = r.to(keep.device, keep.dtype)  # to the host only where the plan keeps rows there


def gather_gradients(stats: Statistics, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every kept example's gradient per block (rows, out·in), gathered from the ranks (rows from one rank each)."""
    if not distributed.is_distributed():
        return stats.grads
    total, lo, hi = stats.kept()
    out = {}
    for blk in stats.blocks:
        mine = stats.grads[blk.module]
        full = torch.zeros(total, blk.dim, dtype=dtype, device=mine.device)
        full[lo:hi] = mine
        out[blk.module] = distributed.all_reduce(full, "per-example gradients")
    return out
