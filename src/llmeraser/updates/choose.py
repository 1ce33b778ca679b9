"""`auto`: the update a request gets when none is named — the one home of that choice (`choose_update`)."""

from __future__ import annotations

import logging

from llmeraser.eraser import Update
from llmeraser.replay import PathArguments, first_edited_step
from llmeraser.trajectory import Trajectory
from llmeraser.updates.base import RequestContext, UnlearnOptions, get_method, register

logger = logging.getLogger(__name__)


@register("auto", order=0, help="rewind or path when the adapter has a recorded trajectory (whichever replays "
                                "less), else first-order; the report says which and why")
def _auto(ctx: RequestContext, options: UnlearnOptions) -> Update:
    trajectory, why_not = ctx.recording()
    method, why = choose_update(trajectory, why_not, ctx, options.path)
    logger.info("%s", why)
    ctx.report["update_choice"] = why
    return get_method(method).run(ctx, options)


def choose_update(trajectory: Trajectory | None, why_not: str, ctx: RequestContext,
                  path: PathArguments) -> tuple[str, str]:
    """The update `auto` stands for, and why:

    - no usable recorded trajectory: first-order (the one-step influence update; the only one θ̂ alone allows);
    - a trajectory with checkpoints only: rewind (exact);
    - rewind when path replay's exact tail would not revisit every kept example (it covers less than one epoch):
      the tail is what repairs the predicted steps, and on one-epoch MovieLens fine-tunes, where it cannot, path
      replay was worse than doing nothing (IR-1, IR-10) or slower than retraining (RC-40; docs/path.md);
    - else rewind when it replays no more of the run than path replay would compute gradients for (the forecast
      `PathArguments.cost`: exact steps plus the edited examples' own gradients), since it is then exact at no extra
      cost; otherwise path replay.
    """
    if trajectory is None:
        return "first-order", f"auto chose first-order: {why_not}"
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
    forecast = path.cost(steps, first, train, edits, trajectory.meta["batch_size"])
    if replay <= forecast:
        return "rewind", (f"auto chose rewind: the first step that saw an edited example is {first} of {len(steps)}, "
                          f"so retraining from there replays {replay:.0%} of fine-tuning, exactly — no more than path "
                          f"replay's gradients would cost ({forecast:.0%} of retraining's)")
    return "path", (f"auto chose path: an edited example was seen at step {first} of {len(steps)}, so an exact rewind "
                    f"would replay {replay:.0%} of fine-tuning; path replay takes about {forecast:.0%} of retraining's "
                    f"gradients and predicts the rest")
