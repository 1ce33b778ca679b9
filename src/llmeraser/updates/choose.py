"""`auto`: the update a request gets when none is named — the one home of that choice (`choose_update`), and the
forecast in seconds it compares rewind and path replay by (`StepCosts`, `forecast_seconds`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from llmeraser.eraser import Update
from llmeraser.replay import KEPT_BATCH, KEPT_CHECK, PathArguments, PlannedStep, first_edited_step
from llmeraser.trajectory import Adam, Trajectory
from llmeraser.updates.base import RequestContext, UnlearnOptions, get_method, register

logger = logging.getLogger(__name__)

# path replay is chosen only when its forecast is at most this share of rewind's: the forecast is a linear model of
# seconds measured once, before the run; on path_study's case rewind's forecast came within 3–5% of its time and path
# replay's 23–27% low (docs/path.md), so a path forecast at 0.75 of rewind's is still no slower than a rewind
PATH_MARGIN = 0.75
CHECK_BATCH = KEPT_BATCH  # the kept-loss check's forward batch
# the request's examples count as memorised when fine-tuning took their loss below this share of their loss before
# the first step that saw them: 0.057 and 0.138 on two memorised people cases (where path replay can land outside
# retraining's spread, docs/path.md#overshoot-on-memorised-removals); data a model fits without memorising stays near 1
MEMORISED = 0.5


def would_add(has_holdout: bool) -> str:
    """What auto's first-order choice says a holdout (when none was given) and a recording would add."""
    recording = ("a recorded fine-tune (LLMEraserCallback, or llmeraser finetune) would let auto rewind, which is "
                 "retraining itself")
    if has_holdout:
        return recording
    return ("a holdout (examples of the same kind the adapter never saw) would let auto run an unlearner that stops "
            "when the forgotten examples look like it, and show whether they do; " + recording)


@register("auto", order=0, help="rewind or path when the adapter has a recorded trajectory (whichever its forecast "
                                "in seconds says is faster), else with a holdout npo stopped by its evidence, else "
                                "first-order; the report says which and why")
def _auto(ctx: RequestContext, options: UnlearnOptions) -> Update:
    trajectory, why_not = ctx.recording()
    method, why = choose_update(trajectory, why_not, ctx, options.path, alpha=options.forget.alpha)
    if method == "first-order":
        why = f"{why}; {would_add(ctx.holdout is not None)}"
    logger.info("%s", why)
    ctx.report["update_choice"] = why
    return get_method(method).run(ctx, options)


@dataclass(frozen=True)
class StepCosts:
    """Measured wall seconds of the work a replay repeats, the inputs of `forecast_seconds`.

    Attributes:
        call: a gradient call's fixed part (kernel launches, Python, the autograd graph's setup): on a tiny model or
            a GPU it dominates a call of a few examples, which is why counting gradients misjudged path replay.
        example: each example's share of a gradient call.
        update: one Adam step on the trainable vector on the model's device (the edited state's, and path replay's
            rebuilding of each recorded state, which runs there).
        replay: one Adam step on the host (a rewind rebuilding the state it starts from: `Trajectory.state`).
        forward: a forward pass without gradients over CHECK_BATCH examples, already tokenised (path replay's
            kept-loss check evaluates each batch at two points).
        collate: tokenising and batching CHECK_BATCH examples (the check does it once a batch).
    """

    call: float
    example: float
    update: float
    replay: float
    forward: float
    collate: float = 0.0

    def gradient(self, n: int) -> float:
        """Seconds of one gradient call over n examples."""
        return self.call + self.example * n if n else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """The fastest of `repeats` runs of fn (the first may pay one-off costs both replays share)."""
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_costs(ctx: RequestContext, trajectory: Trajectory, batch: Sequence[int]) -> StepCosts:
    """Time, at θ̂, the calls both replays repeat: a training step's gradient over the recorded batch `batch` (the
    first edited step's) and a gradient of one of its examples — the two give the fixed and per-example parts —,
    tokenising CHECK_BATCH examples and a forward pass over them, and an Adam step on the device and on the host,
    each the fastest of three; the model is left at θ̂."""
    from llmeraser.curvature import gradient
    from llmeraser.finetune import step_gradient
    from llmeraser.params import ParamView
    from llmeraser.task import per_example_loss

    model, task, train = ctx.model, ctx.task, ctx.train
    view = ParamView(model)
    theta, dev = view.vector(), view.device
    model.eval()
    full = _timed(lambda: step_gradient(model, task, train, batch, view), dev)
    one = _timed(lambda: gradient(model, task, [train[batch[0]]], batch_size=1), dev)
    example = max(full - one, 0.0) / (len(batch) - 1) if len(batch) > 1 else one
    check = [train[i] for i in batch][:CHECK_BATCH]
    collate = _timed(lambda: task.collate(check), dev) * CHECK_BATCH / len(check)
    collated = task.collate(check)
    with torch.no_grad():
        forward = _timed(lambda: per_example_loss(task, model, collated).sum(), dev) * CHECK_BATCH / len(check)
    adam, g = Adam(trajectory.config, theta), torch.zeros_like(theta)
    update = _timed(lambda: adam.step(theta, g), dev, repeats=3)
    host = trajectory.theta0
    replay = _timed(lambda: Adam(trajectory.config, host).step(host, torch.zeros_like(host)), host.device, repeats=3)
    view.set_vector(theta)
    return StepCosts(call=max(one - example, 0.0), example=example, update=update, replay=replay, forward=forward,
                     collate=collate)


def forecast_seconds(costs: StepCosts, plan: Sequence[PlannedStep], n_steps: int, new_sizes: Sequence[int],
                     start: int, secant: bool, n_check: int) -> dict[str, float]:
    """The wall seconds of a rewind and of a path replay, forecast from `costs`: each one's gradient calls as it
    makes them, and its Adam steps.

    - rewind: rebuilds the state at `start` (start host steps), then one training step — a gradient call over the
      edited set's batch (`new_sizes`, its schedule's batch sizes) and a device Adam step — per replayed step;
    - path: rebuilds every recorded state (n_steps − 1 Adam steps on the device), and per replayed step the gradient
      calls of `PlannedStep.gradients` and a device Adam step; then the kept-loss check (n_check kept examples
      tokenised once, a forward pass over them at two points).
    """
    rewind = start * costs.replay + sum(costs.gradient(n) + costs.update for n in new_sizes[start:])
    path = (n_steps - 1) * costs.update
    for s in plan:
        path += sum(costs.gradient(n) for n in s.gradients(secant)) + (costs.update if s.kind != "skip" else 0.0)
    path += math.ceil(n_check / CHECK_BATCH) * (costs.collate + 2 * costs.forward)
    return {"rewind": rewind, "path": path}


def memorised_share(ctx: RequestContext, trajectory: Trajectory, first: int) -> dict[str, float]:
    """The edited examples' (old versions') mean loss at θ̂ over their mean loss at the state before the first step
    that saw one of them (rebuilt from the recording on the host): how much of their loss fine-tuning removed by
    training on them. Two forward passes over the edited examples; the model is left at θ̂."""
    from llmeraser.finetune import objective
    from llmeraser.params import ParamView

    old = [e for e in ctx.train if e.id in ctx.edits]
    view = ParamView(ctx.model)
    theta = view.vector()
    after = objective(ctx.model, ctx.task, old)
    try:
        view.set_vector(trajectory.state(trajectory.start_before(first))[0].to(view.device))
        before = objective(ctx.model, ctx.task, old)
    finally:
        view.set_vector(theta)
    return {"before": before, "after": after, "share": after / max(before, 1e-12), "threshold": MEMORISED}


def choose_update(trajectory: Trajectory | None, why_not: str, ctx: RequestContext, path: PathArguments,
                  costs: StepCosts | None = None, memorised: dict | None = None, *,
                  alpha: float = 0.05) -> tuple[str, str]:
    """The update `auto` stands for, and why:

    - no usable recorded trajectory and a holdout the membership test can use (`updates.stop.check_holdout`, at
      level `alpha`): `forget.DEFAULT` (simnpo), stopped when the forgotten examples look like the holdout — on
      memorised facts every one-step update equals doing nothing (docs/forget.md);
    - no usable recorded trajectory otherwise: first-order (the one-step influence update; the only one θ̂ alone
      allows), the reason saying why the holdout could not be used when one was given;
    - a trajectory with checkpoints only: rewind (exact);
    - rewind when path replay's exact tail would not revisit every kept example (it covers less than one epoch):
      the tail is what repairs the predicted steps, and on one-epoch MovieLens fine-tunes, where it cannot, path
      replay was worse than doing nothing (IR-1, IR-10) or slower than retraining (RC-40; docs/path.md);
    - rewind when fine-tuning memorised the request's examples (`memorised_share` ≤ MEMORISED): path replay
      overshoots retraining there, beyond retraining's own spread (docs/path.md#overshoot-on-memorised-removals);
    - else path replay only when its forecast wall time is at most PATH_MARGIN × rewind's (`forecast_seconds`
      from `costs`, measured now at θ̂ unless given — tests give them); rewind otherwise, since it is then exact at
      about the same cost. Counting gradients is not enough: a path replay's calls are smaller, and a call's fixed
      part dominates small calls (a tiny memorised case that counted 0.6 of the gradients took 1.15× retraining's
      time). The reason names both forecasts and the measured costs; `ctx.report['update_forecast']` holds them.
    """
    if trajectory is None:
        from llmeraser.updates.forget import DEFAULT
        from llmeraser.updates.stop import check_holdout

        if ctx.holdout is None:
            return "first-order", f"auto chose first-order: {why_not}"
        unusable = check_holdout([old for old, _ in ctx.pairs], ctx.holdout, ctx.train, alpha)
        if unusable is None:
            return DEFAULT, (f"auto chose {DEFAULT}: {why_not}, and a holdout of {len(ctx.holdout)} examples was "
                             f"given: {DEFAULT} on the forgotten examples with a retain term, stopped once they are as "
                             f"familiar as the holdout by the membership test (calibrated by the base model)")
        return "first-order", f"auto chose first-order: {why_not}, and the holdout cannot be used: {unusable}"
    edits, train = ctx.edits, ctx.train
    steps, first = first_edited_step(trajectory, train, set(edits))
    start = trajectory.start_before(first)
    replay = (len(steps) - start) / len(steps)
    if trajectory.grads is None:
        return "rewind", (f"auto chose rewind: the trajectory kept checkpoints only; rewinding to step {start} "
                          f"replays {replay:.0%} of fine-tuning exactly")
    per_epoch = len(steps) / trajectory.meta["epochs"]
    tail = len(steps) - path.tail_start(len(steps))
    if tail < per_epoch:
        return "rewind", (f"auto chose rewind: path replay's exact tail ({tail} steps) would not revisit every kept "
                          f"example (an epoch is {per_epoch:.0f} steps), so it could not repair its predicted steps; "
                          f"rewinding to step {start} replays {replay:.0%} of fine-tuning, exactly")
    memorised = memorised_share(ctx, trajectory, first) if memorised is None else memorised
    ctx.report["update_memorised"] = memorised
    if memorised["share"] <= MEMORISED:
        return "rewind", (f"auto chose rewind: fine-tuning memorised the request's examples (their loss fell from "
                          f"{memorised['before']:.3g} before step {first}, the first that saw one, to "
                          f"{memorised['after']:.3g}); on memorised requests path replay can forget more than "
                          f"retraining does, beyond retraining's own spread "
                          f"(docs/path.md#overshoot-on-memorised-removals), so the exact "
                          f"update: rewinding to step {start} replays {replay:.0%} of fine-tuning")
    costs = costs or measure_costs(ctx, trajectory, steps[first])
    n_kept = len(ctx.effective) - sum(new is not None for new in edits.values())
    check = min(KEPT_CHECK, n_kept)
    new_sizes = [len(b) for b in trajectory.schedule(ctx.effective)]
    seconds = forecast_seconds(costs, path.plan(steps, first, train, edits), len(steps), new_sizes, start,
                               path.history > 0, check)
    ctx.report["update_forecast"] = {"seconds": seconds, "margin": PATH_MARGIN, "measured": asdict(costs),
                                     "first_edited_step": first, "steps": len(steps)}
    said = (f"forecast {seconds['path']:.3g} s for path replay against {seconds['rewind']:.3g} s for a rewind of "
            f"{replay:.0%} of fine-tuning (an edited example was first seen at step {first} of {len(steps)}; "
            f"measured: a gradient call {costs.call * 1e3:.3g} ms + {costs.example * 1e3:.3g} ms an example, an Adam "
            f"step {costs.update * 1e3:.3g} ms)")
    if seconds["path"] <= PATH_MARGIN * seconds["rewind"]:
        return "path", f"auto chose path: {said}; path replay predicts most kept gradients"
    return "rewind", (f"auto chose rewind: {said}; path replay would not save a {1 - PATH_MARGIN:.0%} margin, so "
                      f"the exact update")
