"""Updates that use fine-tuning's recorded path, and the iterated refinement (docs/path.md).

On memorised examples θ̂ is already close to a minimiser of the *edited* objective (their gradients are ~0), so an
update computed from θ̂ alone — one step, Newton, any curvature there — barely moves, while retraining lands
elsewhere because its *path* differs. Three updates, each returning an `eraser.Update` whose report says what it
did and what it cost:

- `rewind` (exact): rebuild the state just before the first step that saw an edited example (`Trajectory.state`)
  and run fine-tuning's own loop (`finetune.run_steps`) over the edited set from there. The steps before are the
  same in retraining (the id-hash order is stable under edits), so the result IS retraining, bit for bit, at the
  cost of the replayed suffix. Its output carries its own exact trajectory, so the next request can rewind too.
- `path_replay` (approximate, after DeltaGrad — Wu, Dobriban & Davidson, ICML 2020): run the edited trajectory w_k
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

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from llmeraser.curvature import CurvatureOperator, gradient, objective_gradient
from llmeraser.data import Example, examples_hash
from llmeraser.errors import AdapterError, ConfigError, RequestError, SolverError
from llmeraser.params import ParamView
from llmeraser.request import Request, apply_request, resolve
from llmeraser.solvers.base import SolveResult
from llmeraser.task import Task
from llmeraser.trajectory import Recorder, Trajectory, first_step_seeing

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

    def cost(self, steps: Sequence[Sequence[int]], first: int, train: Sequence[Example],
             edits: dict[str, Example | None], batch_size: int) -> float:
        """A forecast, before running, of the gradients `path_replay` takes relative to retraining's, counted step by
        step as it counts them: each exact step's batch, and the edited examples' own gradients (at θ_k, and for
        corrected versions at w_k). On MovieLens RC-40 the corrections' gradients alone were 0.8 of retraining's
        (docs/path.md), so they decide whether path replay is cheaper than a rewind."""
        tail = self.tail_start(len(steps))
        units, next_exact = 0, first
        for k in range(first, len(steps)):
            here = [train[i].id for i in steps[k] if train[i].id in edits]
            kept, new = len(steps[k]) - len(here), sum(edits[i] is not None for i in here)
            if kept + new == 0:
                continue
            units += (len(here) if kept else 0) + new
            if kept and (k - first < self.burn_in or k >= next_exact or k >= tail):
                units += batch_size
                if k >= next_exact:
                    next_exact = k + self.exact_every
        return units / (len(steps) * batch_size)


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


def _edits(request: Request, train: Sequence[Example]) -> tuple[list[Example], dict[str, Example | None]]:
    """(the edited set, id → the new version of each edited example or None for a removal)."""
    pairs = resolve(request, train)
    effective = apply_request(train, request)
    if not effective:
        raise RequestError("the request removes every training example; there is nothing left to fit")
    return effective, {old.id: new for old, new in pairs}


def first_edited_step(trajectory: Trajectory, train: Sequence[Example], edited: set[str]) -> tuple[list, int]:
    """(the recorded schedule on `train`, the first step whose batch holds an edited example)."""
    steps = trajectory.schedule(train)
    k = first_step_seeing(train, steps, edited)
    if k is None:  # every example is in every epoch: only an empty request sees no step
        raise RequestError("no recorded step saw the request's examples")
    return steps, k


def _update(request: Request, train: Sequence[Example], theta_hat: torch.Tensor, theta: torch.Tensor, name: str,
            report: dict, seconds: float, residual: float = float("nan")):
    from llmeraser.eraser import Update

    delta = theta - theta_hat
    if not torch.isfinite(theta).all():
        raise SolverError(f"the {name} update produced non-finite parameters")
    solve = SolveResult(x=delta, solver=name, residual=residual, converged=True, iterations=0, hvps=0.0,
                        seconds=seconds)
    full = {"request_sha256": request.hash, "ops": request.counts(), "method": name, "solver": name,
            "n_train": len(train), "n_effective": len(train) - request.counts()["remove"], "n_params": delta.numel(),
            "train_sha256": examples_hash(train), "solve": solve.diagnostics(), "converged": True,
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
    out["path"] = "the recorded gradients, replayed with the recorded optimiser, end at the adapter"
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


# ------------------------------------------------------------------------------------------------------ rewind
def rewind(model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request, trajectory: Trajectory,
           *, progress: bool = False):
    """Exact unlearning: retraining on the edited set, replayed from the recorded state before the first step that
    saw an edited example. θ is left at θ̂; the Update's `theta` is the retrained θ and its `trajectory` the new
    recording."""
    from llmeraser.finetune import run_steps

    start_time = time.perf_counter()
    effective, edits = _edits(request, train)
    steps, first = first_edited_step(trajectory, train, set(edits))
    start = trajectory.start_before(first)
    new_steps = trajectory.schedule(effective)
    # the steps before `first` hold no edited example, so the edited set's schedule has the very same batches
    if [[effective[i].id for i in b] for b in new_steps[:first]] != [[train[i].id for i in b] for b in steps[:first]]:
        raise ConfigError("the recorded schedule is not stable under this edit (not an id-hash order?)")
    view = ParamView(model)
    theta_hat = view.vector()
    theta, adam = trajectory.state(start)
    recorder = Recorder.resume(trajectory, start, len(new_steps), examples=effective)
    model.eval()
    try:
        view.set_vector(theta)
        losses = run_steps(model, task, effective, new_steps, view, adam.to(view.device), start=start,
                           recorder=recorder, progress=progress, desc="rewind", lrs=trajectory.lrs(effective))
        theta_new = view.vector()
    finally:
        view.set_vector(theta_hat)
    seconds = time.perf_counter() - start_time
    report = {"first_edited_step": first, "rewound_to": start, "steps": len(new_steps),
              "replayed_steps": len(new_steps) - start,
              "replayed_fraction": (len(new_steps) - start) / max(1, len(new_steps)),
              "last_loss": losses[-1] if losses else None,
              "exact": "equal to retraining on the edited set with the recorded recipe, bit for bit"
              if "batches" not in trajectory.meta else
              "the recorded Trainer run replayed over its recorded batches without the edited examples (with the "
              "corrected versions in place), by llmeraser's AdamW: equal to that retraining up to float rounding"}
    logger.info("rewind: replayed %d of %d steps from step %d", len(new_steps) - start, len(new_steps), start)
    update = _update(request, train, theta_hat, theta_new, "rewind", report, seconds)
    update.trajectory = recorder.finish(start + len(losses), theta_new)
    return update


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


def path_replay(model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request,
                trajectory: Trajectory, args: PathArguments | None = None, *, progress: bool = False):
    """The edited trajectory over the recorded steps, kept gradients predicted between exact steps (module
    docstring). θ is left at θ̂; the Update's `theta` is the end of the edited trajectory."""
    from llmeraser.finetune import step_gradient

    args = args or PathArguments()
    start_time = time.perf_counter()
    effective, edits = _edits(request, train)
    steps, first = first_edited_step(trajectory, train, set(edits))
    view = ParamView(model)
    theta_hat, dev = view.vector(), view.device
    secant = Secant(args.history) if args.history else None
    n = {"exact": 0, "predicted": 0, "skipped": 0, "edited": 0}
    errors: list[float] = []
    tail = args.tail_start(len(steps))
    next_exact = first
    w = adam = None
    lrs = trajectory.meta.get("lrs")  # a Trainer run's recorded rate of each step (else Adam's own)
    scale = getattr(task, "step_scale", lambda _: None)

    def weight(examples: Sequence[Example]) -> float:
        """The step gradient is (Σ ∇ℓ) / weight: the batch size, or under the Trainer's token-weighted step loss
        the batch's tokens / t̄ (`CausalLMTask.step_scale`)."""
        c = scale(examples)
        return len(examples) if c is None else 1.0 / c

    model.eval()
    bar = tqdm(total=len(steps) - first, desc="path replay", disable=not progress)
    try:
        for k, theta_k, adam_k in trajectory.states(stop=len(steps) - 1):
            if k < first:
                continue
            theta_k = theta_k.to(dev)
            if w is None:  # before the first edited step the edited trajectory is the recorded one
                w, adam = theta_k.clone(), adam_k.copy().to(dev)
            batch = steps[k]
            here = [train[i] for i in batch if train[i].id in edits]
            new = [edits[e.id] for e in here if edits[e.id] is not None]
            kept = len(batch) - len(here)
            n_new = kept + len(new)
            bar.update(1)
            if n_new == 0:  # the whole batch was removed: retraining over these batches has no such step
                n["skipped"] += 1
                continue
            # the step's batch in the edited set, in its recorded order (a corrected example in its old place)
            new_batch = [e for e in (edits.get(train[i].id, train[i]) for i in batch) if e is not None]
            # the kept examples' mean gradient at θ_k: the recorded batch gradient less the edited examples' own
            g_k = trajectory.grads[k].to(dev)
            old_weight = weight([train[i] for i in batch])
            if here and kept:
                view.set_vector(theta_k)
                g_k = (old_weight * g_k - gradient(model, task, here, batch_size=len(here))) / kept
                n["edited"] += len(here)
            elif kept and old_weight != len(batch):  # token-weighted steps: the recorded gradient is not the kept mean
                g_k = old_weight * g_k / kept
            new_weight = weight(new_batch)
            s = w - theta_k
            view.set_vector(w)
            news = gradient(model, task, new, batch_size=len(new)) if new else torch.zeros_like(w)  # exact at w_k
            n["edited"] += len(new)
            if kept and (k - first < args.burn_in or k >= next_exact or k >= tail):
                # fine-tuning's own step gradient on the edited batch: with every step exact this is, bit for bit,
                # retraining over the recorded batches
                g_w, _ = step_gradient(model, task, new_batch, range(len(new_batch)), view)
                change = (new_weight * g_w - news) / kept - g_k  # the kept part's change: "no change" is off by this
                predicted = secant.matvec(s) if secant is not None else torch.zeros_like(s)
                errors.append(float((predicted - change).norm()) / max(float(change.norm()), 1e-30))
                if secant is not None:
                    secant.add(s, change)
                if k >= next_exact:
                    next_exact = k + args.exact_every
                n["exact"] += 1
            else:
                g_kept = g_k + secant.matvec(s) if secant is not None and kept else g_k
                g_w = (kept * g_kept + news) / new_weight if kept else news / new_weight
                n["predicted"] += 1
            w = adam.step(w, g_w, None if lrs is None else lrs[k])
            if not torch.isfinite(w).all():
                raise SolverError(f"path replay diverged at step {k} (non-finite parameters)")
        kept_check = _kept_loss_check(model, task, effective, edits, theta_hat, w, view)
    finally:
        bar.close()
        view.set_vector(theta_hat)
    batch_size = trajectory.meta["batch_size"]
    cost = (n["exact"] * batch_size + n["edited"]) / (len(steps) * batch_size)
    report = {"first_edited_step": first, "steps": len(steps), "replayed_steps": len(steps) - first,
              "exact_steps": n["exact"], "predicted_steps": n["predicted"], "skipped_empty_steps": n["skipped"],
              "edited_gradients": n["edited"], "secant_pairs": len(secant.S) if secant else 0,
              "secant_skipped": secant.skipped if secant else 0, "exact_from_step": tail,
              # ‖predicted − exact change of the kept gradient‖ / ‖exact change‖ on the exact steps (1 = no
              # better than predicting no change, which is what history = 0 does)
              "prediction_error": {"mean": sum(errors) / len(errors) if errors else None,
                                   "max": max(errors) if errors else None, "checks": len(errors)},
              "gradient_cost_vs_retraining": cost, "drift_norm": float((w - theta_hat).norm()),
              "kept_loss_check": kept_check, "arguments": dataclasses.asdict(args),
              "target": "retraining over the recorded mini-batches without the removed examples (with the corrected "
                        "versions in place of the old)"}
    logger.info("path replay: %d exact / %d predicted steps from step %d, ~%.2f of retraining's gradients",
                n["exact"], n["predicted"], first, cost)
    return _update(request, train, theta_hat, w, "path", report, time.perf_counter() - start_time)


KEPT_CHECK = 64  # kept examples whose loss is compared before and after a path replay
KEPT_RISE_WARNING = 1.2  # warn when their mean loss rises above this multiple of the original's


def _kept_loss_check(model, task, effective, edits, theta_hat, theta, view) -> dict:
    """Evidence against an approximate replay gone wrong: the mean loss of up to KEPT_CHECK kept examples (evenly
    spaced, never edited) at θ̂ and at the result. Retraining leaves examples it still trains on about where they
    were; a large rise means the predicted steps drifted (then: more exact steps, or --method rewind)."""
    from llmeraser.finetune import objective

    kept = [e for e in effective if e.id not in edits]
    sample = kept[:: max(1, len(kept) // KEPT_CHECK)][:KEPT_CHECK]
    if not sample:
        return {"examples": 0}
    losses = []
    for point in (theta_hat, theta):
        view.set_vector(point)
        losses.append(objective(model, task, sample))
    ratio = losses[1] / max(losses[0], 1e-12)
    if ratio > KEPT_RISE_WARNING:
        logger.warning("path replay: the kept examples' loss rose %.2f× (%.4g → %.4g on %d of them); retraining "
                       "keeps them about where they were, so the predicted steps may have drifted: consider more "
                       "exact steps (--path-exact-tail) or --method rewind", ratio, losses[0], losses[1], len(sample))
    return {"examples": len(sample), "original": losses[0], "result": losses[1], "ratio": ratio}


# ------------------------------------------------------------------------------------------------------ refine
def refine(model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request, start: torch.Tensor,
           args: RefineArguments | None = None, *, l2: float = 0.0, damping: float | None = None,
           curvature_samples: int = 0, batch_size: int = 8, seed: int = 0, progress: bool = False):
    """Damped Newton-CG on R′ from θ̂ + `start` (module docstring). θ is left at θ̂."""
    from llmeraser.solvers.api import get_solver, solver_arguments

    args = args or RefineArguments()
    t0 = time.perf_counter()
    effective, _ = _edits(request, train)
    view = ParamView(model)
    theta_hat = view.vector()

    def objective(theta: torch.Tensor) -> float:
        from llmeraser.finetune import objective as r

        view.set_vector(theta)
        return r(model, task, effective, l2=l2, batch_size=batch_size)

    def grad(theta: torch.Tensor) -> torch.Tensor:
        view.set_vector(theta)
        return objective_gradient(model, task, effective, l2=l2, batch_size=batch_size)

    residual0 = float(grad(theta_hat).norm())
    theta = theta_hat + start
    g = grad(theta)
    history = [{"step": 0, "residual": float(g.norm()), "objective": objective(theta)}]
    best = (history[0]["residual"], 0, theta)  # the iterate with the smallest ‖∇R′‖ is returned
    sample = list(effective)
    if 0 < curvature_samples < len(sample):
        gen = torch.Generator().manual_seed(seed)
        sample = [sample[i] for i in sorted(torch.randperm(len(sample), generator=gen)[:curvature_samples].tolist())]
    for it in tqdm(range(1, args.steps + 1), desc="refine", disable=not progress):
        if history[-1]["residual"] <= args.tol * residual0:
            break
        view.set_vector(theta)
        op = CurvatureOperator(model, task, sample, l2=l2, batch_size=batch_size)
        lam = damping if damping is not None else 0.02 * float(op.matvec(g / g.norm()) @ (g / g.norm()))
        solved = get_solver("cg")(op, g, lam, solver_arguments("cg", max_iters=args.cg_iters, tol=1e-3))
        direction = -solved.x
        slope = float(g @ direction)
        if not slope < 0:  # not a descent direction (cannot happen for a PSD operator; a guard for rounding)
            direction, slope = -g, -float(g @ g)
        r0, t = history[-1]["objective"], 1.0
        for _ in range(args.backtracks + 1):  # Armijo: R′(θ + t d) ≤ R′(θ) + 1e-4 t ∇R′ᵀd
            trial = objective(theta + t * direction)
            if math.isfinite(trial) and trial <= r0 + 1e-4 * t * slope:
                break
            t /= 2
        else:
            break  # no decrease along the Newton direction: stop where we are
        theta = theta + t * direction
        g = grad(theta)
        history.append({"step": it, "residual": float(g.norm()), "objective": trial, "step_size": t,
                        "damping": lam, "cg_residual": solved.residual})
        if history[-1]["residual"] < best[0]:
            best = (history[-1]["residual"], it, theta)
    view.set_vector(theta_hat)
    residual, chosen, theta = best
    report = {"residual_at_original": residual0, "residual_at_start": history[0]["residual"],
              "residual_final": residual, "relative_residual": residual / max(residual0, 1e-30),
              "returned_step": chosen,
              "history": history, "arguments": dataclasses.asdict(args),
              "curvature_examples": len(sample),
              "certificate": "‖∇R′(θ)‖ over the whole edited set at the returned θ (0 at a stationary point)"}
    return _update(request, train, theta_hat, theta, "refine", report, time.perf_counter() - t0,
                   residual=residual / max(residual0, 1e-30))
