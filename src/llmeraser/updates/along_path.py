"""The updates along fine-tuning's path — `rewind` (exact), `path` (replay, most gradients predicted) — and `refine`
(Newton-CG on the edited objective from the one-step update, with its residual certificate): what each does and
why is in `llmeraser.replay`'s docstring and docs/path.md. Registered as update methods (`updates.base`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from llmeraser.curvature import CurvatureOperator, gradient, objective_gradient
from llmeraser.data import Example
from llmeraser.eraser import RELATIVE_DAMPING, EraserArguments, Update
from llmeraser.errors import ConfigError, SolverError
from llmeraser.params import ParamView
from llmeraser.recorder import Recorder
from llmeraser.replay import PathArguments, RefineArguments, Secant, first_edited_step, kept_loss_check, path_update
from llmeraser.trajectory import Trajectory
from llmeraser.updates.base import RequestContext, UnlearnOptions, register

logger = logging.getLogger(__name__)


@register("rewind", order=5, needs=("recording",), exact=True,
          help="exact: retraining, replayed from the recorded state before the first step that saw an edited example")
def _rewind(ctx: RequestContext, options: UnlearnOptions) -> Update:
    trajectory = ctx.trajectory("rewind")
    update = rewind(ctx, trajectory)
    update.report |= ctx.report | {"trajectory": trajectory.describe()}
    return update


@register("path", order=4, needs=("recording",),
          help="replay the recorded fine-tune without the edited examples, most gradients predicted")
def _path(ctx: RequestContext, options: UnlearnOptions) -> Update:
    trajectory = ctx.trajectory("path")
    update = path_replay(ctx, trajectory, options.path)
    update.report |= ctx.report | {"trajectory": trajectory.describe()}
    return update


@register("refine", order=3, needs=("curvature",),
          help="first-order, then damped Newton-CG steps on the edited objective with a line search, reporting the "
               "gradient residual before and after")
def _refine(ctx: RequestContext, options: UnlearnOptions) -> Update:
    from llmeraser.updates.one_step import one_step

    start = one_step(ctx, options, "first-order")
    if start.report.get("decision") == "declined":
        return start
    refined = refine(ctx, start.delta, options.refine, ctx.eraser(options))
    kept = {k: start.report[k] for k in ("solver_choice", "damping_choice") if k in start.report}
    refined.report |= ctx.report | kept | {"start": {k: start.report[k] for k in ("method", "solver", "damping",
                                                                                  "delta_norm", "seconds")}}
    refined.report["seconds"]["total"] += start.report["seconds"]["total"]
    refined.factors = start.factors
    return refined


# ------------------------------------------------------------------------------------------------------ rewind
def rewind(ctx: RequestContext, trajectory: Trajectory) -> Update:
    """Exact unlearning: retraining on the edited set, replayed from the recorded state before the first step that
    saw an edited example. θ is left at θ̂; the Update's `theta` is the retrained θ and its `trajectory` the new
    recording."""
    from llmeraser.finetune import run_steps

    start_time = time.perf_counter()
    model, task, train, effective, edits = ctx.model, ctx.task, ctx.train, ctx.effective, ctx.edits
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
                           recorder=recorder, progress=ctx.progress, desc="rewind", lrs=trajectory.lrs(effective))
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
    update = path_update(ctx, theta_hat, theta_new, "rewind", report, seconds)
    update.trajectory = recorder.finish(start + len(losses), theta_new)
    return update


# ------------------------------------------------------------------------------------------------- path replay
def path_replay(ctx: RequestContext, trajectory: Trajectory, args: PathArguments | None = None) -> Update:
    """The edited trajectory over the recorded steps, kept gradients predicted between exact steps (module
    docstring). θ is left at θ̂; the Update's `theta` is the end of the edited trajectory.

    The gradient calls are few and large where they can be: an exact step is one pass over the edited batch (its
    kept examples and corrected versions together, fine-tuning's own `step_gradient`), with no separate call for the
    edited examples — those are needed there only to pair the kept part's change with w_k − θ_k for a secant model
    (`history` > 0). A predicted step needs the edited examples' gradients at θ_k and the corrections' at w_k: two
    points, so two calls, and only on steps whose batch holds an edited example. Nothing is read back to the host
    inside the loop (not even the exact steps' loss, which it does not use), so the host tokenises the next batch
    while the device computes; the recorded states are rebuilt on the device; divergence is checked there and
    raised at the end."""
    args = args or PathArguments()
    start_time = time.perf_counter()
    model, task, train, edits = ctx.model, ctx.task, ctx.train, ctx.edits
    steps, first = first_edited_step(trajectory, train, set(edits))
    plan = {s.k: s for s in args.plan(steps, first, train, edits)}
    view = ParamView(model)
    theta_hat, dev = view.vector(), view.device
    state = _ReplayState(ctx, trajectory, args, view)
    model.eval()
    bar = tqdm(total=len(steps) - first, desc="path replay", disable=not ctx.progress)
    try:
        # the recorded states are rebuilt on the model's device, each row read once (its θ_k step and, on a predicted
        # step, the kept gradient's prediction): no host Adam step or θ_k transfer a step
        for k, theta_k, adam_k, g_k in trajectory.states(stop=len(steps) - 1, device=dev, with_grads=True):
            if k < first:
                continue
            if state.w is None:  # before the first edited step the edited trajectory is the recorded one
                state.w, state.adam = theta_k.clone(), adam_k.copy()
            bar.update(1)
            state.step(plan[k], steps[k], theta_k, g_k)
        bad = int(state.first_bad)  # the one read-back of the divergence check
        if bad >= 0:
            raise SolverError(f"path replay diverged at step {bad} (non-finite parameters)")
        kept_check = kept_loss_check(model, task, ctx.effective, edits, theta_hat, state.w, view)
    finally:
        bar.close()
        view.set_vector(theta_hat)
    n, errors, secant, w = state.n, state.errors, state.secant, state.w
    batch_size = trajectory.meta["batch_size"]
    cost = n["gradients"] / (len(steps) * batch_size)
    report = {"first_edited_step": first, "steps": len(steps), "replayed_steps": len(steps) - first,
              "exact_steps": n["exact"], "predicted_steps": n["predicted"], "skipped_empty_steps": n["skipped"],
              "edited_gradients": n["edited"], "gradient_calls": n["calls"],
              "secant_pairs": len(secant.S) if secant else 0,
              "secant_skipped": secant.skipped if secant else 0, "exact_from_step": args.tail_start(len(steps)),
              # ‖predicted − exact change of the kept gradient‖ / ‖exact change‖ on the exact steps: measured with a
              # secant model only (history 0 predicts no change, so it would be 1 by definition)
              "prediction_error": {"mean": sum(errors) / len(errors) if errors else None,
                                   "max": max(errors) if errors else None, "checks": len(errors)},
              "gradient_cost_vs_retraining": cost, "drift_norm": float((w - theta_hat).norm()),
              "kept_loss_check": kept_check, "arguments": dataclasses.asdict(args),
              "target": "retraining over the recorded mini-batches without the removed examples (with the corrected "
                        "versions in place of the old)"}
    logger.info("path replay: %d exact / %d predicted steps from step %d, ~%.2f of retraining's gradients",
                n["exact"], n["predicted"], first, cost)
    return path_update(ctx, theta_hat, w, "path", report, time.perf_counter() - start_time)


class _ReplayState:
    """The edited trajectory's state (w, Adam) and counters while `path_replay` walks the recorded steps."""

    def __init__(self, ctx: RequestContext, trajectory: Trajectory, args: PathArguments, view: ParamView):
        self.ctx, self.trajectory, self.view = ctx, trajectory, view
        self.secant = Secant(args.history) if args.history else None
        self.n = {"exact": 0, "predicted": 0, "skipped": 0, "edited": 0, "gradients": 0, "calls": 0}
        self.errors: list[float] = []
        self.w: torch.Tensor | None = None
        self.adam = None
        self.lrs = trajectory.meta.get("lrs")  # a Trainer run's recorded rate of each step (else Adam's own)
        self.scale = getattr(ctx.task, "step_scale", lambda _: None)
        self.first_bad = torch.tensor(-1, device=view.device)  # the first step whose w is not finite, on the device

    def weight(self, examples: Sequence[Example]) -> float:
        """The step gradient is (Σ ∇ℓ) / weight: the batch size, or under the Trainer's token-weighted step loss
        the batch's tokens / t̄ (`CausalLMTask.step_scale`)."""
        c = self.scale(examples)
        return len(examples) if c is None else 1.0 / c

    def gradient(self, examples: Sequence[Example], at: torch.Tensor) -> torch.Tensor:
        """Σ ∇ℓ over `examples` at θ = `at`, in one call."""
        self.view.set_vector(at)
        self.n["calls"] += 1
        self.n["gradients"] += len(examples)
        return gradient(self.ctx.model, self.ctx.task, examples, batch_size=len(examples))

    def step(self, planned, batch: Sequence[int], theta_k: torch.Tensor, g_k: torch.Tensor) -> None:
        """One recorded step on the edited trajectory: its gradient (exact or predicted), then Adam's step. θ_k and
        the recorded gradient g_k are on the model's device (`Trajectory.states`)."""
        from llmeraser.finetune import step_gradient

        train, edits, k = self.ctx.train, self.ctx.edits, planned.k
        if planned.kind == "skip":  # the whole batch was removed: retraining over these batches has no such step
            self.n["skipped"] += 1
            return
        here = [train[i] for i in batch if train[i].id in edits]
        new = [edits[e.id] for e in here if edits[e.id] is not None]
        kept, w = planned.kept, self.w
        # the step's batch in the edited set, in its recorded order (a corrected example in its old place)
        new_batch = [e for e in (edits.get(train[i].id, train[i]) for i in batch) if e is not None]
        new_weight = self.weight(new_batch)
        exact, secant = planned.kind == "exact", self.secant
        if kept and (not exact or secant is not None):
            # the kept examples' mean gradient at θ_k: the recorded batch gradient less the edited examples' own
            old_weight = self.weight([train[i] for i in batch])
            if here:
                g_k = (old_weight * g_k - self.gradient(here, theta_k)) / kept
                self.n["edited"] += len(here)
            elif old_weight != len(batch):  # token-weighted steps: the recorded gradient is not the kept mean
                g_k = old_weight * g_k / kept
        news = None
        if new and (not exact or secant is not None):
            news = self.gradient(new, w)  # the corrected versions' gradients, exact at w_k
            self.n["edited"] += len(new)
        if exact:
            # fine-tuning's own step gradient on the edited batch: with every step exact this is, bit for bit,
            # retraining over the recorded batches
            self.view.set_vector(w)
            g_w, _ = step_gradient(self.ctx.model, self.ctx.task, new_batch, range(len(new_batch)), self.view,
                                   loss=False)
            self.n["calls"] += 1
            self.n["gradients"] += len(new_batch)
            if secant is not None:
                s = w - theta_k
                change = (new_weight * g_w - (news if news is not None else 0)) / kept - g_k
                self.errors.append(float((secant.matvec(s) - change).norm()) / max(float(change.norm()), 1e-30))
                secant.add(s, change)
            self.n["exact"] += 1
        else:
            g_kept = g_k + secant.matvec(w - theta_k) if secant is not None and kept else (g_k if kept else None)
            extra = news if news is not None else 0
            g_w = (kept * g_kept + extra) / new_weight if kept else extra / new_weight
            self.n["predicted"] += 1
        self.w = self.adam.step(w, g_w, None if self.lrs is None else self.lrs[k])
        finite = torch.isfinite(self.w).all()
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, k, self.first_bad)


# ------------------------------------------------------------------------------------------------------ refine
def refine(ctx: RequestContext, start: torch.Tensor, args: RefineArguments, eraser: EraserArguments, *,
           damping: float | None = None) -> Update:
    """Damped Newton-CG on R′ from θ̂ + `start` (`llmeraser.replay`'s docstring), with `eraser`'s l2, curvature
    sample, batch size and seed, at damping λ (default: RELATIVE_DAMPING × the curvature along ∇R′). θ is left at
    θ̂."""
    from llmeraser.solvers.api import get_solver, solver_arguments

    t0 = time.perf_counter()
    model, task, effective = ctx.model, ctx.task, ctx.effective
    l2, batch_size, seed, curvature_samples = eraser.l2, eraser.batch_size, eraser.seed, eraser.curvature_samples
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
        # host: which examples to sample (indices, the same on every device)
        sample = [sample[i] for i in sorted(torch.randperm(len(sample), generator=gen)[:curvature_samples].tolist())]
    for it in tqdm(range(1, args.steps + 1), desc="refine", disable=not ctx.progress):
        if history[-1]["residual"] <= args.tol * residual0:
            break
        view.set_vector(theta)
        op = CurvatureOperator(model, task, sample, l2=l2, batch_size=batch_size)
        lam = damping if damping is not None else RELATIVE_DAMPING * float(op.matvec(g / g.norm()) @ (g / g.norm()))
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
    return path_update(ctx, theta_hat, theta, "refine", report, time.perf_counter() - t0,
                       residual=residual / max(residual0, 1e-30))
