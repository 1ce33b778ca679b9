"""Path replay's gradient calls and auto's forecast in seconds (docs/path.md, "auto" and "Overshoot").

References: the call-per-step path replay it replaced (`call_per_step_reference`, the loop as it was: a separate
gradient call for the edited examples at θ_k and for the corrections at w_k on every step, exact or not), and the
forecast computed by hand from injected costs (no timing is asserted anywhere).
"""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.tiny import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer

from llmeraser.curvature import gradient
from llmeraser.finetune import FinetuneArguments, finetune, objective, step_gradient
from llmeraser.params import ParamView
from llmeraser.replay import KEPT_CHECK, PathArguments, Secant, first_edited_step, kept_loss_check
from llmeraser.request import Request
from llmeraser.task import CausalLMTask
from llmeraser.updates import RequestContext
from llmeraser.updates.along_path import path_replay
from llmeraser.updates.choose import (
    MEMORISED,
    PATH_MARGIN,
    StepCosts,
    choose_update,
    forecast_seconds,
    measure_costs,
    memorised_share,
)

ARGS = FinetuneArguments(epochs=3, lr=1e-2, batch_size=4, final_check=False)
NOT_MEMORISED = {"before": 1.0, "after": 1.0, "share": 1.0}  # injected: the forecast alone decides
REQUESTS = {
    "remove": Request.remove("ex9", "ex14", "ex0"),
    "mixed": Request.from_dict({"edits": [{"op": "correct_response", "id": "ex5", "response": " Maybe"},
                                          {"op": "modify_query", "id": "ex11", "prompt": "Does the owl like gold?"},
                                          {"op": "remove", "id": "ex2"}]}),
}


@pytest.fixture(scope="module")
def fitted():
    """A float64 tiny LoRA Llama fine-tuned 3 epochs (18 steps) on 22 facts: (model, task, train, θ̂, trajectory)."""
    tok = tiny_tokenizer()
    model = tiny_lora(tiny_llama(len(tok), hidden=16, dtype=torch.float64, init_std=0.3), r=2)
    task, train = CausalLMTask(tok, max_length=24), fact_examples(22, seed=3)
    trajectory = finetune(model, task, train, ARGS).trajectory
    return model, task, train, ParamView(model).vector(), trajectory


def call_per_step_reference(ctx: RequestContext, trajectory, args: PathArguments) -> tuple[torch.Tensor, int]:
    """Path replay as it was before its calls were batched (removals and corrections, example-mean steps): on every
    replayed step the edited examples' gradient at θ_k and the corrections' at w_k, each its own call, then the
    exact step's batch gradient or the prediction. Returns (w at the end, gradient calls made)."""
    model, task, train, edits = ctx.model, ctx.task, ctx.train, ctx.edits
    steps, first = first_edited_step(trajectory, train, set(edits))
    view = ParamView(model)
    secant = Secant(args.history) if args.history else None
    tail, next_exact, w, adam, calls = args.tail_start(len(steps)), first, None, None, 0
    for k, theta_k, adam_k in trajectory.states(stop=len(steps) - 1):
        if k < first:
            continue
        if w is None:
            w, adam = theta_k.clone(), adam_k.copy()
        batch = steps[k]
        here = [train[i] for i in batch if train[i].id in edits]
        new = [edits[e.id] for e in here if edits[e.id] is not None]
        kept = len(batch) - len(here)
        if kept + len(new) == 0:
            continue
        new_batch = [e for e in (edits.get(train[i].id, train[i]) for i in batch) if e is not None]
        g_k = trajectory.grads[k]
        if here and kept:
            view.set_vector(theta_k)
            g_k = (len(batch) * g_k - gradient(model, task, here, batch_size=len(here))) / kept
            calls += 1
        s = w - theta_k
        view.set_vector(w)
        news = gradient(model, task, new, batch_size=len(new)) if new else torch.zeros_like(w)
        calls += bool(new)
        if kept and (k - first < args.burn_in or k >= next_exact or k >= tail):
            g_w, _ = step_gradient(model, task, new_batch, range(len(new_batch)), view)
            calls += 1
            if secant is not None:
                secant.add(s, (len(new_batch) * g_w - news) / kept - g_k)
            if k >= next_exact:
                next_exact = k + args.exact_every
        else:
            g_kept = g_k + secant.matvec(s) if secant is not None and kept else g_k
            g_w = (kept * g_kept + news) / len(new_batch) if kept else news / len(new_batch)
        w = adam.step(w, g_w)
    view.set_vector(trajectory.final())
    return w, calls


@pytest.mark.parametrize("request_", list(REQUESTS.values()), ids=list(REQUESTS))
@pytest.mark.parametrize("args", [PathArguments(), PathArguments(exact_every=3, exact_tail=0.25),
                                  PathArguments(exact_every=3, history=3)], ids=["default", "short", "secant"])
def test_path_replay_with_fewer_calls_is_the_call_per_step_replay(fitted, request_, args):
    model, task, train, theta, trajectory = fitted
    ParamView(model).set_vector(theta)
    ctx = RequestContext.build(model, task, train, request_)
    update = path_replay(ctx, trajectory, args)
    reference, calls = call_per_step_reference(ctx, trajectory, args)
    # Bit for bit, not to a tolerance: the calls dropped (the edited examples' and corrections' gradients on exact
    # steps without a secant model) fed nothing but the report's prediction error, which is 1 by definition when the
    # prediction is "no change"; every call kept is the same call, on the same examples, at the same point, in the
    # same order, and the predicted gradient the same expression (adding an exact 0 where no correction is)
    assert torch.equal(update.theta, reference)
    r = update.report["path"]
    assert r["gradient_calls"] <= calls
    if not args.history:
        assert r["gradient_calls"] < calls and r["prediction_error"]["checks"] == 0
    # the forecast of the gradients counts the calls as the run makes them
    edits = ctx.edits
    plan = args.plan(trajectory.schedule(train), r["first_edited_step"], train, edits)
    assert sum(len(s.gradients(args.history > 0)) for s in plan) == r["gradient_calls"]
    assert args.cost(trajectory.schedule(train), r["first_edited_step"], train, edits, 4) == \
        pytest.approx(r["gradient_cost_vs_retraining"], rel=1e-12)


def test_forecast_in_seconds_is_the_calls_and_steps_each_replay_makes(fitted):
    model, task, train, theta, trajectory = fitted
    request_ = REQUESTS["remove"]
    ctx = RequestContext.build(model, task, train, request_)
    steps, first = first_edited_step(trajectory, train, set(ctx.edits))
    args = PathArguments()
    plan = args.plan(steps, first, train, ctx.edits)
    costs = StepCosts(call=3.0, example=0.5, update=0.25, replay=0.125, forward=2.0, collate=1.5)
    new_sizes = [len(b) for b in trajectory.schedule(ctx.effective)]
    got = forecast_seconds(costs, plan, len(steps), new_sizes, first, False, 19)
    # by hand: a rewind rebuilds its start on the host, then replays from `first` one training step (a call over its
    # batch, an Adam step) per step; path replay rebuilds every recorded state on the device, and its kept-loss
    # check tokenises each batch of 8 once and runs it at two points
    rewind = first * 0.125 + sum(3.0 + 0.5 * n + 0.25 for n in new_sizes[first:])
    path = (len(steps) - 1) * 0.25 + math.ceil(19 / 8) * (1.5 + 2 * 2.0)
    for s in plan:
        if s.kind == "exact":
            path += 3.0 + 0.5 * (s.kept + s.new) + 0.25
        elif s.kind == "predicted":
            path += (3.0 + 0.5 * s.here if s.here and s.kept else 0) + 0.25
    assert got == pytest.approx({"rewind": rewind, "path": path}, rel=1e-12)


def test_auto_rewinds_where_calls_cost_more_than_their_examples(fitted):
    """The tiny memorised case's signature: a call's fixed part dominates, so path replay's small calls cost about
    as much as a training step; counting gradients said path, the forecast in seconds must say rewind."""
    model, task, train, theta, trajectory = fitted
    # an example from each of the first three batches: every epoch, three predicted steps hold one, each a call
    three = Request.remove(*(train[b[0]].id for b in trajectory.schedule(train)[:3]))
    ctx = RequestContext.build(model, task, train, three)
    args = PathArguments()
    assert args.cost(*first_edited_step(trajectory, train, set(ctx.edits)), train, ctx.edits, 4) < PATH_MARGIN
    cheap_examples = StepCosts(call=0.0, example=1.0, update=0.0, replay=0.0, forward=0.0)
    name, why = choose_update(trajectory, "", ctx, args, cheap_examples, NOT_MEMORISED)
    f = ctx.report["update_forecast"]
    assert name == "path" and f["seconds"]["path"] <= PATH_MARGIN * f["seconds"]["rewind"]
    assert "auto chose path: forecast" in why and f["measured"] == vars(cheap_examples)
    costly_calls = StepCosts(call=1.0, example=0.01, update=0.0, replay=0.0, forward=0.0)
    name, why = choose_update(trajectory, "", ctx, args, costly_calls, NOT_MEMORISED)
    f = ctx.report["update_forecast"]
    assert name == "rewind" and f["seconds"]["path"] > PATH_MARGIN * f["seconds"]["rewind"]
    assert why.startswith("auto chose rewind: forecast") and "margin" in why


def test_measured_costs_are_positive_and_leave_the_model_at_theta_hat(fitted):
    model, task, train, theta, trajectory = fitted
    ParamView(model).set_vector(theta)
    ctx = RequestContext.build(model, task, train, REQUESTS["remove"])
    costs = measure_costs(ctx, trajectory, trajectory.schedule(train)[0])
    assert torch.equal(ParamView(model).vector(), theta)
    assert all(math.isfinite(v) and v >= 0 for v in vars(costs).values())
    assert costs.call + costs.example > 0 and costs.forward > 0  # a gradient call and a forward pass take time


def test_memorised_share_is_the_edited_examples_loss_at_theta_hat_over_before_they_were_seen(fitted):
    model, task, train, theta, trajectory = fitted
    ParamView(model).set_vector(theta)
    ctx = RequestContext.build(model, task, train, REQUESTS["mixed"])
    first = first_edited_step(trajectory, train, set(ctx.edits))[1]
    got = memorised_share(ctx, trajectory, first)
    assert torch.equal(ParamView(model).vector(), theta)
    old = [e for e in train if e.id in ctx.edits]
    before_state, _ = trajectory.state(first)
    after = objective(model, task, old)
    ParamView(model).set_vector(before_state)
    before = objective(model, task, old)
    ParamView(model).set_vector(theta)
    # the same forward passes on the same examples at the same points: equal, not close
    assert (got["before"], got["after"]) == (before, after) and got["share"] == after / before
    # memorised (injected): auto rewinds before measuring anything, and says why
    ctx.report.clear()
    name, why = choose_update(trajectory, "", ctx, PathArguments(), None, {**got, "share": MEMORISED / 10})
    assert name == "rewind" and "memorised" in why and "update_forecast" not in ctx.report


def test_the_kept_loss_check_tokenises_once_and_is_the_objective_at_both_points(fitted):
    """The check evaluates each batch at θ̂ and at the result from one tokenising: the same batches, per-example
    losses and float64 sums in the same order as `finetune.objective` at each point, so equal, not close."""
    model, task, train, theta, trajectory = fitted
    view = ParamView(model)
    ctx = RequestContext.build(model, task, train, REQUESTS["mixed"])
    other = trajectory.state(5)[0]
    calls = []
    collate = task.collate
    task.collate = lambda examples: calls.append(len(examples)) or collate(examples)
    try:
        got = kept_loss_check(model, task, ctx.effective, ctx.edits, theta, other, view)
    finally:
        del task.collate
    kept = [e for e in ctx.effective if e.id not in ctx.edits]
    assert got["examples"] == len(kept) < KEPT_CHECK  # fewer than the sample's size: every kept example
    assert calls == [8, 8, len(kept) - 16]  # each batch tokenised once
    view.set_vector(theta)
    before = objective(model, task, kept)
    view.set_vector(other)
    after = objective(model, task, kept)
    assert (got["original"], got["result"], got["ratio"]) == (before, after, after / before)
    view.set_vector(theta)


def test_a_step_gradient_without_its_loss_is_the_same_gradient(fitted):
    """Path replay's exact steps ask for no loss (nothing read back to the host): the same backward of the same
    batch, so the gradient is equal, not close, and the loss is None."""
    model, task, train, theta, trajectory = fitted
    view = ParamView(model)
    view.set_vector(theta)
    batch = trajectory.schedule(train)[3]
    g, loss = step_gradient(model, task, train, batch, view)
    g2, none = step_gradient(model, task, train, batch, view, loss=False)
    assert torch.equal(g, g2) and none is None and math.isfinite(loss)
