"""The one-step influence updates (`eraser.UnlearningProblem`, docs/math.md#first-order-and-newton), registered as
update methods: `first-order` (the paper's) and `newton`. Here, once: the damping `tune-damping` chose (and its
refusal to write a worse adapter), the solver `auto` stands for, and the fitted factors a fitted solver uses."""

from __future__ import annotations

import dataclasses
import logging

from llmeraser.eraser import UnlearningProblem, Update, choose_solver, declined_update, example_tokens
from llmeraser.errors import UserInputError
from llmeraser.solvers.api import is_fitted, solver_arguments
from llmeraser.updates.base import RequestContext, UnlearnOptions, register

logger = logging.getLogger(__name__)


@register("first-order", order=1, needs=("curvature",),
          help="the paper: one influence step that removes the request's own effect")
def _first_order(ctx: RequestContext, options: UnlearnOptions) -> Update:
    return one_step(ctx, options, "first-order")


@register("newton", order=2, needs=("curvature",),
          help="one Newton step on the edited objective: exact for a converged fine-tune")
def _newton(ctx: RequestContext, options: UnlearnOptions) -> Update:
    return one_step(ctx, options, "newton")


def one_step(ctx: RequestContext, options: UnlearnOptions, method: str) -> Update:
    """Δθ by one influence step `method` (first-order or newton), its report complete: the context's entries, the
    damping choice, the solver choice and the factors' source. `Update.factors`: the fit it was solved with."""
    args = dataclasses.replace(ctx.eraser(options), method=method)
    extra = dict(ctx.report)
    if options.damping == "auto":  # chosen earlier on validation data by tune-damping
        if ctx.damping_choice is None:
            raise UserInputError("damping 'auto' needs the λ 'llmeraser tune-damping' chose for this adapter, and "
                                 "this request has no factor store to read it from")
        chosen = ctx.damping_choice()
        extra["damping_choice"] = {k: chosen[k] for k in ("chosen", "declines", "scores", "trials",
                                                          "removal_size", "valid_sha256") if k in chosen}
        if chosen["declines"] and not options.force:
            best = min(r["score"] for r in chosen["scores"])
            reason = (f"tune-damping found no λ whose update beat no update on held-out removals (best score "
                      f"{best:.3g} ≥ 1): the adapter is written unchanged; pass force to write the update anyway")
            logger.warning("%s", reason)
            return declined_update(ctx.model, ctx.train, ctx.request, reason, extra)
        args = dataclasses.replace(args, damping=chosen["chosen"])
    if args.solver == "auto":
        solver, why = choose_solver(ctx.model, len(ctx.train), tokens=example_tokens(ctx.task, ctx.train))
        args = dataclasses.replace(args, solver=solver, solver_args=solver_arguments(solver,
                                                                                       **options.solver_options))
        extra["solver_choice"] = why
    factors, t_fit = ctx.fit(args) if ctx.fit is not None and is_fitted(args.solver) else (None, 0.0)
    problem = UnlearningProblem(ctx.model, ctx.task, ctx.train, ctx.request, args, factors, fit_seconds=t_fit,
                                report=extra, resolved=(ctx.pairs, ctx.effective))
    update = problem.solve()
    update.factors = problem.factors
    return update

