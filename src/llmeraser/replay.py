"""The path's pieces: the options of path replay and of the refinement, the checks a recording passes before any
replay (`verify_recording`), the secant curvature path replay may use, the kept examples' loss check, and the Update
of a method that computes the new θ itself. The updates themselves — `rewind` (exact), `path` (after DeltaGrad), and
`refine` — are update methods in `llmeraser.updates.along_path`; docs/path.md says what each does and measured.

On memorised examples θ̂ is already close to a minimiser of the *edited* objective (their gradients are ~0), so an
update computed from θ̂ alone — one step, Newton, any curvature there — barely moves, while retraining lands
elsewhere because its *path* differs:

- `rewind` (exact): rebuild the state just before the first step that saw an edited example (`Trajectory.state`)
  and run fine-tuning's own loop (`finetune.run_steps`) over the edited set from there. The steps before are the
  same in retraining (the id-hash order is stable under edits), so the result IS retraining, bit for bit, at the
  cost of the replayed suffix. Its output carries its own exact trajectory, so the next request can rewind too.
- `path` (approximate, after DeltaGrad — Wu, Dobriban & Davidson, ICML 2020): run the edited trajectory w_k
  over the recorded mini-batches, with Adam's own state, without recomputing most gradients. The kept examples'
  mean gradient at w_k is predicted as their gradient at θ_k (the recorded batch gradient less the edited examples'
  own, taken exactly at θ_k) plus, optionally, a secant (L-BFGS) curvature times w_k − θ_k; it is computed exactly on
  every `exact_every`-th step and on every step of the final `exact_tail` of the run, which repairs what the
  predicted steps got wrong. Corrected versions' gradients are taken exactly at w_k. Only the kept part is
  predicted: a removed example's gradient grows fast as its loss rises off the path, and predicting the whole
  batch's gradient while subtracting that one exactly acts as gradient ascent. Each recorded batch keeps its kept
  examples (and gets the corrected versions), so for removals the target is retraining over the recorded batches
  minus the removed examples (retraining's own batches shift by one example after each removal: the same order,
  other boundaries).
- `refine`: damped Newton-CG steps on the edited objective R′ from the one-step update, each with a backtracking
  line search on R′, stopping when ‖∇R′‖ falls below `tol` × its value at θ̂; it returns the iterate with the
  smallest ‖∇R′‖ (a line search on R′ guarantees descent of R′, not of its gradient), and the report gives that
  residual before and after — how far from a stationary point of R′ the new adapter is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmeraser import distributed
from llmeraser.data import Example
from llmeraser.errors import AdapterError, ConfigError, RequestError, SolverError
from llmeraser.params import ParamView
from llmeraser.solvers.base import SolveResult
from llmeraser.task import Task, per_example_loss
from llmeraser.trajectory import Trajectory, first_step_seeing

logger = logging.getLogger(__name__)


@dataclass
class PathArguments:
    """Which steps of `path_replay` compute the kept examples' gradients exactly; the others predict them."""

    exact_every: int = field(default=8, metadata={
        "help": "path: an exact kept-batch gradient every this many steps before the tail"})
    exact_tail: float = field(default=0.5, metadata={
        "help": "path: the fraction of the recorded steps, at the end, that are all exact (they repair what the "
                "predicted steps got wrong; on the memorised case of bench/path_study.py, with an exact step every "
                "8th too, 0.5 left the kept facts' loss at 1.02× the original's, 0.34 at 1.11×; docs/path.md)"})
    burn_in: int = field(default=0, metadata={"help": "path: exact steps right after the first edited step"})
    history: int = field(default=0, metadata={
        "help": "path: secant pairs (L-BFGS memory) that predict the kept gradient's change between exact steps; "
                "0 = predict no change (measured better on memorised facts: the secant's isotropic part pulls "
                "the removed facts back, docs/path.md)"})

    def __post_init__(self) -> None:
        if self.exact_every < 1 or self.burn_in < 0 or self.history < 0:
            raise ConfigError("exact_every must be ≥ 1, burn_in and history ≥ 0")
        if not 0 <= self.exact_tail <= 1:
            raise ConfigError(f"exact_tail must be in [0, 1], got {self.exact_tail}")

    def tail_start(self, n_steps: int) -> int:
        """The first step of the exact tail (`exact_tail` of the steps, rounded up)."""
        return n_steps - math.ceil(self.exact_tail * n_steps - 1e-9)

    def plan(self, steps: Sequence[Sequence[int]], first: int, train: Sequence[Example],
             edits: dict[str, Example | None]) -> list[PlannedStep]:
        """What `path_replay` does at each step from `first` on, decided before it runs (the choice depends on the
        schedule and the edits only): 'skip' (every example of the batch removed: retraining over these batches has
        no such step), 'exact' (the edited batch's gradient taken exactly at w_k) or 'predicted'. The one home of
        that rule: the replay, its gradient count (`cost`) and auto's forecast in seconds all read it."""
        tail = self.tail_start(len(steps))
        out, next_exact = [], first
        for k in range(first, len(steps)):
            here = sum(train[i].id in edits for i in steps[k])
            new = sum(edits[train[i].id] is not None for i in steps[k] if train[i].id in edits)
            kept = len(steps[k]) - here
            if kept + new == 0:
                kind = "skip"
            elif kept and (k - first < self.burn_in or k >= next_exact or k >= tail):
                kind = "exact"
                if k >= next_exact:
                    next_exact = k + self.exact_every
            else:
                kind = "predicted"
            out.append(PlannedStep(k, kind, kept, here, new))
        return out

    def cost(self, steps: Sequence[Sequence[int]], first: int, train: Sequence[Example],
             edits: dict[str, Example | None], batch_size: int) -> float:
        """A forecast, before running, of the examples whose gradients `path_replay` takes relative to retraining's,
        counted step by step as it counts them (`PlannedStep.gradients`). On MovieLens RC-40 the corrections'
        gradients alone were 0.8 of retraining's (docs/path.md), so they decide whether path replay is cheaper."""
        units = sum(n for s in self.plan(steps, first, train, edits) for n in s.gradients(self.history > 0))
        return units / (len(steps) * batch_size)


@dataclass(frozen=True)
class PlannedStep:
    """One step of a path replay (`PathArguments.plan`): its index, kind, and how many of its recorded batch's
    examples are kept, edited (`here`) and have a corrected version (`new`)."""

    k: int
    kind: str
    kept: int
    here: int
    new: int

    def gradients(self, secant: bool) -> list[int]:
        """The sizes of the gradient calls `path_replay` makes at this step. An exact step is one pass over the
        edited batch (kept examples and corrected versions together); only with a secant model does it also need the
        kept part's gradient at θ_k and the corrections' own (the secant pair), two more calls. A predicted step
        takes the edited examples' gradients at θ_k (to remove them from the recorded batch gradient) and the
        corrected versions' at w_k."""
        if self.kind == "skip":
            return []
        if self.kind == "exact":
            return [self.kept + self.new] + ([n for n in (self.here, self.new) if n] if secant else [])
        return [n for n in ((self.here if self.kept else 0), self.new) if n]


@dataclass
class RefineArguments:
    """How `refine` iterates Newton steps on the edited objective."""

    steps: int = field(default=3, metadata={"help": "refine: Newton-CG steps at most"})
    tol: float = field(default=0.1, metadata={
        "help": "refine: stop when ‖∇R′‖ ≤ this × ‖∇R′(θ̂)‖ (the residual the report certifies)"})
    cg_iters: int = field(default=10, metadata={"help": "refine: CG iterations per Newton step"})
    backtracks: int = field(default=4, metadata={"help": "refine: step halvings the line search may take"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.cg_iters < 1 or self.backtracks < 0 or not self.tol >= 0:
            raise ConfigError("refine: steps and cg_iters must be ≥ 1, backtracks ≥ 0, tol ≥ 0")


def first_edited_step(trajectory: Trajectory, train: Sequence[Example], edited: set[str]) -> tuple[list, int]:
    """(the recorded schedule on `train`, the first step whose batch holds an edited example)."""
    steps = trajectory.schedule(train)
    k = first_step_seeing(train, steps, edited)
    if k is None:  # every example is in every epoch: only an empty request sees no step
        raise RequestError("no recorded step saw the request's examples")
    return steps, k


def path_update(ctx, theta_hat: torch.Tensor, theta: torch.Tensor, name: str, report: dict, seconds: float,
                residual: float = float("nan")):
    """The `eraser.Update` of a method that computed the new θ itself (rewind, path, refine), its report under
    `name`. `ctx`: the request's `updates.RequestContext`."""
    from llmeraser.eraser import Update

    request, train = ctx.request, ctx.train
    delta = theta - theta_hat
    if not torch.isfinite(theta).all():
        raise SolverError(f"the {name} update produced non-finite parameters")
    solve = SolveResult(x=delta, solver=name, residual=residual, converged=True, iterations=0, hvps=0.0,
                        seconds=seconds)
    full = {"request_sha256": request.hash, "ops": request.counts(), "method": name, "solver": name,
            "n_train": len(train), "n_effective": len(train) - request.counts()["remove"], "n_params": delta.numel(),
            "train_sha256": ctx.train_sha256, "solve": solve.diagnostics(), "converged": True,
            "delta_norm": float(delta.norm()), "theta_norm": float(theta_hat.norm()),
            "seconds": {"total": seconds}, name: report}
    return Update(delta=delta, request=request, solve=solve, report=full, theta=theta)


# ------------------------------------------------------------------------------------------------ verification
# A step's gradient recomputed from the recorded state must match the recorded one to this relative error. The same
# batch at the same θ differs only by rounding (float32, 30 layers: ≤ 2.1e-3 in bench/trl_rewind.py; bf16 bases and
# another padding more); a recording whose schedule (seed, batches), max length, rendering or data differ from the
# run's computes the gradient of other tokens, O(1) away.
SPOT_TOL = 0.1


def verify_recording(model: torch.nn.Module, task: Task, train: Sequence[Example], trajectory: Trajectory, *,
                     dropout: float | None = None) -> dict:
    """Check, before a replay trusts it, that `trajectory` (loaded, its checksums verified, `check`ed against the
    adapter) is the recording of the run that trained the model on `train`: the recipe matches the task's
    (`Trajectory.check_recipe`); replaying its gradients with its optimiser ends at the adapter
    (`Trajectory.replay_check`: the header's learning rates, betas, ε, l2, decay, clipping); and the gradients of its
    first and last steps, recomputed from their replayed states on the recorded batches, equal the recorded ones
    (the seed and batches, and the data and rendering, are the ones the gradients came from). Costs two batch
    gradients and an elementwise replay. Returns what was verified, for the report.

    Raises:
        AdapterError: naming what does not match (`auto` then falls back to the one-step update, saying why).
    """
    from llmeraser.finetune import step_gradient

    out = {"recipe": trajectory.check_recipe(task) or "max length, rendering, tokenizer and chat template as "
                                                       "recorded"}
    if trajectory.grads is None:
        out["path"] = "checkpoints only: verified by their checksums, not replayed"
        return out
    view = ParamView(model)
    theta_hat = view.vector()
    steps = trajectory.schedule(train)
    spots = sorted({0, len(steps) - 1}) if steps else []
    states = trajectory.replay_check(theta_hat, spots)
    out["path"] = trajectory.replay_claim()
    if dropout:
        out["gradients"] = f"not recomputed: the run trained with dropout {dropout:g}, so its gradients are random"
        return out
    try:
        for k in spots:
            view.set_vector(states[k].to(view.device))
            g, _ = step_gradient(model, task, train, steps[k], view)
            recorded = trajectory.grads[k].to(g.device, g.dtype)
            err = float((g - recorded).norm()) / max(float(recorded.norm()), 1e-30)
            if not err <= SPOT_TOL:
                raise AdapterError(f"step {k}'s gradient recomputed on its recorded batch differs from the recorded "
                                   f"one by {err:.3g} of its norm (rounding stays below {SPOT_TOL:g}): the "
                                   f"recording's schedule, seed or batches, or the data or rendering, are not the "
                                   f"run's")
    finally:
        view.set_vector(theta_hat)
    out["gradients"] = f"steps {', '.join(map(str, spots))} recomputed from their states: as recorded"
    return out


# ------------------------------------------------------------------------------------------------- path replay
class Secant:
    """A limited-memory BFGS approximation B of the curvature from secant pairs (s, y), y ≈ H s, applied through
    its compact form (Byrd, Nocedal & Schnabel 1994): B = σI − Wᵀ M⁻¹ W, W = [σS; Y], M = [[σSSᵀ, L], [Lᵀ, −D]],
    with L the strictly lower part and D the diagonal of S Yᵀ, σ = yᵀy / sᵀy of the newest pair. Pairs without
    positive curvature (sᵀy ≤ 1e-8 ‖s‖‖y‖) are skipped, so B stays positive definite; with no pair B = 0."""

    def __init__(self, history: int):
        self.history = history
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []
        self.skipped = 0
        self._compact = None

    def add(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        sy = float(s.double() @ y.double())
        if not sy > 1e-8 * float(s.norm()) * float(y.norm()):
            self.skipped += 1
            return False
        self.S.append(s.clone())
        self.Y.append(y.clone())
        if len(self.S) > self.history:
            self.S.pop(0)
            self.Y.pop(0)
        self._compact = None
        return True

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if not self.S:
            return torch.zeros_like(v)
        if self._compact is None:
            S, Y = torch.stack(self.S).double(), torch.stack(self.Y).double()
            sy = S @ Y.T
            sigma = float(Y[-1] @ Y[-1]) / float(sy[-1, -1])
            low = torch.tril(sy, -1)
            M = torch.cat([torch.cat([sigma * (S @ S.T), low], 1), torch.cat([low.T, -torch.diag(torch.diag(sy))], 1)])
            self._compact = (sigma, torch.cat([sigma * S, Y]), torch.linalg.inv(M))
        sigma, W, Minv = self._compact
        v64 = v.double()
        return (sigma * v64 - W.T @ (Minv @ (W @ v64))).to(v.dtype)


KEPT_CHECK = 64  # kept examples whose loss is compared before and after a path replay
KEPT_BATCH = 8  # their forward batch (`finetune.objective`'s default, so the losses are its own)
KEPT_RISE_WARNING = 1.2  # warn when their mean loss rises above this multiple of the original's


def kept_loss_check(model, task, effective, edits, theta_hat, theta, view) -> dict:
    """Evidence against an approximate replay gone wrong: the mean loss of up to KEPT_CHECK kept examples (evenly
    spaced, never edited) at θ̂ and at the result. Retraining leaves examples it still trains on about where they
    were; a large rise means the predicted steps drifted (then: more exact steps, or --method rewind).

    Each batch is tokenised once and evaluated at both points: the losses are `finetune.objective`'s at each, bit for
    bit (the same batches, per-example losses and float64 sums in the same order), for half its host work. The model
    is left at `theta`."""
    kept = [e for e in effective if e.id not in edits]
    sample = kept[:: max(1, len(kept) // KEPT_CHECK)][:KEPT_CHECK]
    if not sample:
        return {"examples": 0}
    points = (theta_hat, theta)
    totals = [torch.zeros(1, dtype=torch.float64, device=view.device) for _ in points]  # one transfer, at the end
    with torch.no_grad():
        for idx in distributed.batches(len(sample), KEPT_BATCH):
            batch = task.collate([sample[i] for i in idx])
            for total, point in zip(totals, points, strict=True):
                view.set_vector(point)
                total += per_example_loss(task, model, batch).sum().double()
    both = distributed.all_reduce(torch.cat(totals), "the kept examples' loss").tolist()
    losses = [t / len(sample) for t in both]
    ratio = losses[1] / max(losses[0], 1e-12)
    if ratio > KEPT_RISE_WARNING:
        logger.warning("path replay: the kept examples' loss rose %.2f× (%.4g → %.4g on %d of them); retraining "
                       "keeps them about where they were, so the predicted steps may have drifted: consider more "
                       "exact steps (--path-exact-tail) or --method rewind", ratio, losses[0], losses[1], len(sample))
    return {"examples": len(sample), "original": losses[0], "result": losses[1], "ratio": ratio}
