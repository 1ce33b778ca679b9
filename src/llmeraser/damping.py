"""Choosing the damping λ on held-out data: predicted against actual validation-loss changes of held-out removals.

Never the test split. For each of `trials` random removal sets R_j of `size` training examples:

- actual_j = ℓ_val(θ_{D∖R_j}) − ℓ_val(θ_D): both are warm-started fine-tunes from θ̂ with the same recipe, seed and
  (id-hash, `trajectory.epoch_order`) example order, so the control θ_D cancels what further training alone would
  change and what is left is the effect of R_j on each validation example's loss;
- pred_j(λ) = ℓ_val(θ̂ + Δθ_λ(R_j)) − ℓ_val(θ̂), with Δθ_λ the eraser's update for "remove R_j" at damping λ.

score(λ) = Σ_j ‖pred_j(λ) − actual_j‖² / Σ_j ‖actual_j‖²: 0 is perfect agreement, 1 is what no update at all
(λ = ∞) scores, so a best score ≥ 1 means the update does not help at any λ of the grid and the tool should decline.
The chosen λ is the grid's argmin; Pearson's r between the pooled predictions and actual changes is reported too.

Cost: (trials + 1) warm-started fine-tunes of `epochs` each, and trials × |grid| + trials + 2 validation passes;
the updates themselves are cheap with a fitted solver (one fit serves every trial and λ) or a cg damping path.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmeraser.data import Example, examples_hash
from llmeraser.eraser import EraserArguments, UnlearningProblem, fit_for_solver
from llmeraser.errors import ConfigError
from llmeraser.factors import Factors
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.params import ParamView
from llmeraser.request import Request
from llmeraser.solvers.api import get_solver, is_fitted, solver_names
from llmeraser.task import Task, per_example_loss

DEFAULT_GRID = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)


@dataclass
class DampingArguments:
    """How λ is chosen (`select_damping`)."""

    dampings: tuple[float, ...] = field(default=DEFAULT_GRID, metadata={"help": "the λ grid"})
    trials: int = field(default=3, metadata={"help": "held-out removal sets"})
    size: float = field(default=0.01, metadata={"help": "fraction of the training set each removes (at least 1)"})
    epochs: int = field(default=1, metadata={"help": "epochs of each warm-started reference fine-tune"})
    lr: float = field(default=1e-3, metadata={"help": "Adam step size of the reference fine-tunes"})
    seed: int = field(default=0, metadata={"help": "seed of the removal sets and of the fine-tunes' order"})

    def __post_init__(self) -> None:
        if not self.dampings or not all(math.isfinite(d) and d >= 0 for d in self.dampings):
            raise ConfigError(f"dampings must be a non-empty list of finite numbers ≥ 0, got {self.dampings}")
        if self.trials < 1 or self.epochs < 1 or not 0 < self.size < 1 or not self.lr > 0:
            raise ConfigError("trials and epochs must be ≥ 1, size in (0, 1) and lr > 0")


def _losses(model: torch.nn.Module, task: Task, examples: Sequence[Example], batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([per_example_loss(task, model, task.collate(list(examples[i:i + batch_size]))).double()
                          for i in range(0, len(examples), batch_size)]).cpu()


def select_damping(model: torch.nn.Module, task: Task, train: Sequence[Example], valid: Sequence[Example],
                   eraser: EraserArguments, args: DampingArguments | None = None, *,
                   factors: Factors | None = None, recipe: FinetuneArguments | None = None,
                   progress: bool = False) -> dict:
    """Score every λ of the grid (module docstring) and return the record: chosen λ, scores, Pearson r, the removal
    sets, seconds, and the hashes of the data it was chosen on. θ is restored before returning.

    `recipe`: how the reference fine-tunes run (default: Adam for `args.epochs` at `args.lr`, with the eraser's l2
    and batch size); use the adapter's own recipe where it is known."""
    args = args or DampingArguments()
    if eraser.solver == "auto" or not get_solver(eraser.solver).path:
        raise ConfigError(f"choosing the damping needs solver cg (one Krylov run per removal serves every λ) or a "
                          f"fitted solver ({', '.join(solver_names(fitted=True))}), got {eraser.solver!r}")
    if is_fitted(eraser.solver) and factors is None:
        factors = fit_for_solver(model, task, train, eraser)
    if not valid:
        raise ConfigError("choosing the damping needs validation examples")
    train = list(train)
    k = max(1, round(args.size * len(train)))
    if k >= len(train):
        raise ConfigError(f"a held-out removal of {k} examples leaves nothing of {len(train)} to train on")
    start = time.perf_counter()
    view = ParamView(model)
    theta = view.vector()
    bs = eraser.batch_size
    recipe = recipe or FinetuneArguments(epochs=args.epochs, lr=args.lr, batch_size=bs, seed=args.seed,
                                         l2=eraser.l2, final_check=False, progress=progress)
    try:
        base = _losses(model, task, valid, bs)
        finetune(model, task, train, recipe)
        control = _losses(model, task, valid, bs)
        rng = random.Random(args.seed)
        pred = {lam: [] for lam in args.dampings}
        actual, removed = [], []
        for _ in range(args.trials):
            ids = sorted(rng.sample([e.id for e in train], k))
            removed.append(ids)
            view.set_vector(theta)
            problem = UnlearningProblem(model, task, train, Request.remove(*ids), eraser, factors)
            for lam, update in zip(args.dampings, problem.path(args.dampings), strict=True):
                view.set_vector(theta + update.delta)
                pred[lam].append(_losses(model, task, valid, bs) - base)
            view.set_vector(theta)
            drop = set(ids)
            finetune(model, task, [e for e in train if e.id not in drop], recipe)
            actual.append(_losses(model, task, valid, bs) - control)
    finally:
        view.set_vector(theta)
    act = torch.cat(actual)
    scale = float(act.pow(2).sum())
    rows = []
    for lam in args.dampings:
        p = torch.cat(pred[lam])
        error = float((p - act).pow(2).sum()) / scale if scale > 0 else float("nan")
        r = float(torch.corrcoef(torch.stack([p, act]))[0, 1]) if p.std() > 0 and act.std() > 0 else float("nan")
        rows.append({"damping": lam, "score": error, "pearson": r})
    best = min(rows, key=lambda row: row["score"] if not math.isnan(row["score"]) else math.inf)
    return {"chosen": best["damping"], "declines": not best["score"] < 1.0, "scores": rows,
            "solver": eraser.solver, "method": eraser.method, "trials": args.trials, "removal_size": k,
            "removed": removed, "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
            "train_sha256": examples_hash(train), "valid_sha256": examples_hash(list(valid)),
            "seconds": time.perf_counter() - start}
