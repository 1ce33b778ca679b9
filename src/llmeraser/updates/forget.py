"""Unlearners that need no recording: descent on the adapter's parameters with an objective on the forget set (the
request's old versions of its edited examples) and a retain term, stopped by evidence instead of a fixed learning
rate and epoch count (docs/forget.md). Registered as update methods (`updates.base`):

- `gradient-difference`: −ℓ(z) on the forget set (ascent on the training loss) + the retain term;
- `npo` (Zhang et al., 2024): (2/β) log(1 + (π_θ(y|x)/π_ref(y|x))^β) on the forget set, π_ref the adapter as given,
  log π the response's summed token log-likelihood: at θ = θ_ref it is (2/β) log 2 with gradient −∇ log π (gradient
  ascent on the summed NLL), and its weight 2σ(β log π_θ/π_ref) fades as an example is forgotten;
- `simnpo` (Fan et al., 2024): −(2/β) log σ(−(β/|y|) log π_θ(y|x) − γ), reference-free and length-normalised.

The retain term (weight `retain_weight`): the NLL of kept examples (default), or (`retain="kl"`) the KL from the
original adapter's next-token distribution to the current one at their response positions (0 with zero gradient at
θ̂; computed by setting θ to θ̂ and back on each retain batch, so no vocabulary-sized tensor is kept), plus the NLL of
the corrected versions of `correct_response` / `modify_query` edits; kept examples sharing rare response tokens with
the forgotten ones first (`retain_order`). The stop rule (`updates.stop.HoldoutStop`) ends the
run once the forget set is as familiar as the holdout (calibrated loss AUC ≤ 0.5, the test saying neither side), and
never past it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmeraser.data import Example
from llmeraser.eraser import Update
from llmeraser.errors import SolverError
from llmeraser.params import ParamView
from llmeraser.replay import KEPT_CHECK, KEPT_RISE_WARNING, path_update
from llmeraser.task import IGNORE_INDEX, per_example_loss
from llmeraser.trajectory import Adam, AdamConfig
from llmeraser.updates.base import RequestContext, UnlearnOptions, register
from llmeraser.updates.stop import TARGET, ForgetArguments, HoldoutStop, StopRule, token_floor, token_nll

logger = logging.getLogger(__name__)

OBJECTIVES = ("gradient-difference", "npo", "simnpo")
DEFAULT = "simnpo"  # auto's pick without a recording, as measured (docs/forget.md#measured-the-people-benchmark-and-
#                     the-trl-chat-removal): at the defaults SimNPO kept more utility than NPO on people forget01/05/10
#                     (0.598/0.602/0.600 against 0.590/0.582/0.563) and the evidence closer to the retrain's on the TRL
#                     chat removal (gap 0.02 against 0.08), at the same forget quality; its weight fades as an example
#                     is forgotten, which gradient difference's (equal on the people) does not
KEPT_PER_FORGOTTEN = 1  # the kept-loss check's sample: this many kept examples per forgotten one (at least a batch,
#                        at most KEPT_CHECK): two passes over it cost what two over the forget set do, a small share of
#                        a run that takes a few steps (a fixed 64 is 128 forward passes, against 3 × 85 forward-and-
#                        backward ones for bench/trl_rewind.py --no-recording's retrain; 2 per forgotten took 7.4 of the
#                        unlearner's 41.6 s there). The check compares the same examples at θ̂ and at the result, so
#                        the sample's spread of difficulty cancels from its ratio
MAX_STEPS_FACTOR = 10  # the default cap: this many times the fine-tune's passes over the forget set (see defaults)


@register("gradient-difference", order=6, needs=("holdout",),
          help="no recording needed: ascent on the forgotten examples' loss with a retain term (the kept examples' "
               "loss), stopped when they look like the holdout")
def _gradient_difference(ctx: RequestContext, options: UnlearnOptions) -> Update:
    return forget(ctx, options, "gradient-difference")


@register("npo", order=7, needs=("holdout",),
          help="no recording needed: negative preference optimisation (Zhang et al. 2024) on the forgotten examples "
               "with a retain term, stopped when they look like the holdout")
def _npo(ctx: RequestContext, options: UnlearnOptions) -> Update:
    return forget(ctx, options, "npo")


@register("simnpo", order=8, needs=("holdout",),
          help="no recording needed: SimNPO (Fan et al. 2024; reference-free, length-normalised) with a retain term, "
               "stopped when the forgotten examples look like the holdout")
def _simnpo(ctx: RequestContext, options: UnlearnOptions) -> Update:
    return forget(ctx, options, "simnpo")


def forget_loss(objective: str, loss: torch.Tensor, mean: torch.Tensor, total: torch.Tensor,
                reference: torch.Tensor | None, beta: float, gamma: float) -> torch.Tensor:
    """Per-example forget objective. `loss`: the task's ℓ; `mean`: the mean token NLL (−log π / |y|); `total`: the
    summed NLL (−log π); `reference`: the summed NLL at θ_ref (NPO)."""
    if objective == "gradient-difference":
        return -loss
    if objective == "npo":  # (2/β) log(1 + exp(β (log π − log π_ref)))
        return 2 / beta * F.softplus(beta * (reference - total))
    if objective == "simnpo":  # −(2/β) log σ(β·mean − γ) = (2/β) softplus(γ − β·mean)
        return 2 / beta * F.softplus(gamma - beta * mean)
    raise ValueError(f"unknown forget objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")


def retain_kl(reference: torch.Tensor, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per example: the mean over its response positions of KL(p_ref ‖ p_θ), `reference` the log-softmax of the
    original logits and `outputs` the current ones ((batch, k, vocab)); positions without a target do not count (a
    task without `targets` counts every position)."""
    logq = F.log_softmax(_wide(outputs), dim=-1)
    kl = (reference.exp() * (reference - logq)).sum(-1)  # (batch, k)
    targets = batch.get("targets")
    if targets is None:
        return kl.mean(1)
    valid = (targets != IGNORE_INDEX).to(device=kl.device, dtype=kl.dtype)
    return (kl * valid).sum(1) / valid.sum(1).clamp(min=1)


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32: a half-precision softmax's rounding would swamp a KL that starts at 0."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@dataclasses.dataclass
class Knobs:
    """The resolved settings of one run and where each default came from (for the report)."""

    lr: float
    max_steps: int
    batch_size: int
    check_every: int
    source: dict


def resolve_defaults(ctx: RequestContext, args: ForgetArguments, n_forget: int, n_check: int) -> Knobs:
    """Fill the arguments left None from the adapter's training record (`ctx.report['task']['optimizer']`, which a
    Trainer run's callback records), else from llmeraser finetune's own defaults (its record has no optimiser block,
    and those are what it trained with unless told otherwise).

    - lr: the fine-tune's. Adam's step is about lr per coordinate whatever the gradient's scale, so at the rate that
      wrote the forgotten examples into θ a run takes them out in about as many steps as fine-tuning took to put
      them in; a fixed constant would be 10× off for one adapter or another (LoRA runs use 1e-5 to 1e-3).
    - max_steps: MAX_STEPS_FACTOR × epochs × ⌈n_forget / batch⌉ — the fine-tune's steps on the forget set, with a
      margin: a cap, not a target (the stop rule ends the run), past which the report says it was not met.
    - batch_size: the fine-tune's per-device batch.
    - check_every: a check is a forward pass over the forgotten, holdout and corrected examples (`n_check`), a step
      a forward and backward pass (≈ 3 forwards) over a forget batch and its corrections and two forwards and one
      backward (≈ 4) over a retain batch: checking every ⌈n_check / that⌉ steps spends about as much on the
      evidence as on the steps, so a check comes at least every other step's worth of work.
    """
    from llmeraser.finetune import FinetuneArguments

    recorded = (ctx.report.get("task") or {}).get("optimizer") or {}
    ours, source = FinetuneArguments(), {}

    def pick(name: str, given, key: str, fallback):
        if given is not None:
            source[name] = "given"
            return given
        if isinstance(recorded.get(key), int | float) and recorded[key] > 0:
            source[name] = "the training record"
            return recorded[key]
        source[name] = "llmeraser finetune's default (the training record has none)"
        return fallback

    lr = float(pick("lr", args.lr, "lr", ours.lr))
    batch = int(pick("batch_size", args.batch_size, "batch_size", ours.batch_size))
    epochs = math.ceil(pick("epochs", None, "epochs", ours.epochs))
    if args.max_steps is None:
        max_steps = MAX_STEPS_FACTOR * epochs * math.ceil(n_forget / batch)
        source["max_steps"] = f"{MAX_STEPS_FACTOR} × {epochs} epochs × {math.ceil(n_forget / batch)} forget batches"
    else:
        max_steps, source["max_steps"] = args.max_steps, "given"
    step_cost = 3 * min(batch, n_forget) * 2 + 4 * batch  # a forget batch and its corrections (at most as many)
    check_every = args.check_every or max(1, math.ceil(n_check / step_cost))
    return Knobs(lr=lr, max_steps=max_steps, batch_size=batch, check_every=check_every, source=source)


def forget(ctx: RequestContext, options: UnlearnOptions, objective: str) -> Update:
    """The new θ by `objective` on the request's forget set with the retain term, stopped by the holdout test; θ is
    left at θ̂. Raises UserInputError when there is no holdout, or one too small for the test to say anything."""
    t0 = time.perf_counter()
    args = options.forget
    members = [old for old, _ in ctx.pairs]
    corrected = [new for _, new in ctx.pairs if new is not None]
    kept = [e for e in ctx.effective if e.id not in ctx.edits]
    holdout = ctx.holdout or []
    knobs = resolve_defaults(ctx, args, len(members), len(members) + len(holdout) + len(corrected))
    rule = _Timed(HoldoutStop(ctx.task, members, holdout, corrected, alpha=args.alpha, batch_size=knobs.batch_size,
                             train=ctx.train, probe=ctx.probe))
    view = ParamView(ctx.model)
    theta_hat = view.vector()
    ctx.model.eval()
    try:
        run = _Run(ctx, args, knobs, objective, view, members, kept)
        theta, report = run.loop(rule)
        report["token_floor"] = ("the base model's NLL of each token" if run.floored else
                                 "none" if args.floor == "none" else "none (the model has no adapter to disable)")
        t_kept = time.perf_counter()
        kept_check = kept_losses(ctx, kept, theta_hat, theta, view, knobs.batch_size,
                                 size=max(knobs.batch_size, KEPT_PER_FORGOTTEN * len(members)))
        t_kept = time.perf_counter() - t_kept
    finally:
        view.set_vector(theta_hat)
    total = time.perf_counter() - t0
    report["seconds"] = {"total": total, "checks": rule.seconds, "kept_loss_check": t_kept,
                         "steps_and_setup": total - rule.seconds - t_kept}  # checks: the base reference included
    report |= {"objective": objective, "kept_loss_check": kept_check, "forget_examples": len(members),
               "corrected_examples": len(corrected), "holdout_examples": len(holdout), "kept_examples": len(kept),
               "lr": knobs.lr, "max_steps": knobs.max_steps, "batch_size": knobs.batch_size,
               "check_every": knobs.check_every, "defaults_from": knobs.source,
               "arguments": dataclasses.asdict(args)}
    if kept_check.get("ratio", 1.0) > KEPT_RISE_WARNING:
        k = kept_check
        report["kept_warning"] = (f"the kept examples' loss rose {k['ratio']:.2f}× ({k['original']:.4g} → "
                                  f"{k['result']:.4g} on {k['examples']} of them): a heavier retain term "
                                  f"(retain_weight), a larger beta (the forget weight fades sooner) or a lower lr "
                                  f"trade steps for less drift (docs/forget.md#measured-tiny-memorised-case)")
        logger.warning("%s: %s", objective, report["kept_warning"])
    logger.info("%s: %s at step %s (%s)", objective, "stopped" if report["stop"]["met"] else "gave up",
                report["returned_step"], report["stop"]["why"])
    update = path_update(ctx, theta_hat, theta, objective, report, total)
    update.report |= ctx.report
    return update


class _Timed:
    """A stop rule whose checks' wall time is summed (`seconds`; each check ends in a transfer to the host, so the
    time is the device's too): where a run's time goes, for the report."""

    def __init__(self, rule: StopRule):
        self.rule, self.seconds = rule, 0.0

    def check(self, model: torch.nn.Module) -> tuple[bool, dict]:
        start = time.perf_counter()
        try:
            return self.rule.check(model)
        finally:
            self.seconds += time.perf_counter() - start

    def distance(self, stats: dict) -> float:
        return self.rule.distance(stats)

    def overshot(self, stats: dict) -> bool:
        return self.rule.overshot(stats)


def retain_order(task, members: Sequence[Example], kept: Sequence[Example], how: str, seed: int) -> list[Example]:
    """The kept examples in the order the retain term takes them (host, once): a random order (`seed`), then with
    `how` = "overlap" sorted (stably: ties stay random) by what each one's response tokens share with the forgotten
    examples' — Σ over the shared token ids of log((n + 1) / (df + 1)), df the number of the n kept responses holding
    the token, so a rare shared token (a value a kept fact has in common with a forgotten one) counts and one every
    response has (the template) does not. Those are the facts a step against the forgotten responses moves most
    (docs/forget.md#the-retain-term). A task without `encode` keeps the random order."""
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    ranked = [kept[i] for i in order]
    if how == "random" or not hasattr(task, "encode") or not members:
        return ranked

    def tokens(e: Example) -> set[int]:
        return {t for t in task.encode(e)[1] if t != IGNORE_INDEX}

    forgotten = set().union(*(tokens(e) for e in members))
    shared = [tokens(e) & forgotten for e in ranked]
    df = Counter(t for s in shared for t in s)
    weight = {t: math.log((len(ranked) + 1) / (df[t] + 1)) for t in df}
    score = [sum(weight[t] for t in s) for s in shared]
    return [ranked[j] for j in sorted(range(len(ranked)), key=lambda j: -score[j])]


class _Run:
    """One run's batches, reference values and step: everything on the model's device, nothing read back to the host
    between checks."""

    def __init__(self, ctx: RequestContext, args: ForgetArguments, knobs: Knobs, objective: str, view: ParamView,
                 members: Sequence[Example], kept: Sequence[Example]):
        self.ctx, self.args, self.knobs, self.objective, self.view = ctx, args, knobs, objective, view
        self.theta_hat = view.vector()
        task, b, new = ctx.task, knobs.batch_size, ctx.edits
        # (forget batch, its NPO reference −log π_ref, its token floor (the base model's NLLs), its corrections' batch)
        self.forget = []
        for i in range(0, len(members), b):
            chunk = members[i:i + b]
            batch = task.collate(chunk)
            floor = token_floor(task, ctx.model, batch) if args.floor == "base" else None
            with torch.no_grad():
                reference = token_nll(task, ctx.model, batch, floor)[2] if objective == "npo" else None
            fixes = [new[e.id] for e in chunk if new[e.id] is not None]
            self.forget.append((batch, reference, floor, task.collate(fixes) if fixes else None))
        self.floored = all(f[2] is not None for f in self.forget)
        self.kept = retain_order(task, members, kept, args.retain_order, args.seed)

    def retain_batch(self, k: int) -> dict | None:
        if not self.kept:
            return None
        n = len(self.kept)
        b = min(self.knobs.batch_size, n)
        return self.ctx.task.collate([self.kept[(k * b + i) % n] for i in range(b)])

    def gradient(self, theta: torch.Tensor, k: int) -> torch.Tensor:
        """∇ of step k's objective at θ: the forget batch's mean objective, plus retain_weight × (the retain
        batch's mean KL to θ̂ (or NLL), and the corrected versions' mean loss)."""
        model, task, args, view = self.ctx.model, self.ctx.task, self.args, self.view
        batch, reference, floor, fixes = self.forget[k % len(self.forget)]
        retain = self.retain_batch(k) if args.retain_weight else None
        ref_logp = None
        if retain is not None and args.retain == "kl":
            view.set_vector(self.theta_hat)  # the original adapter's distribution, not kept past this step
            with torch.no_grad():
                ref_logp = F.log_softmax(_wide(task.forward(model, retain)), dim=-1)
        view.set_vector(theta)
        loss, mean, total = token_nll(task, model, batch, floor)[:3]
        objective = forget_loss(self.objective, loss, mean, total, reference, args.beta, args.gamma).mean()
        if fixes is not None:
            objective = objective + args.retain_weight * task.loss(task.forward(model, fixes), fixes).mean()
        if retain is not None:
            outputs = task.forward(model, retain)
            term = retain_kl(ref_logp, outputs, retain) if ref_logp is not None else task.loss(outputs, retain)
            objective = objective + args.retain_weight * term.mean()
        grads = torch.autograd.grad(objective, view.params, allow_unused=True)
        return view.flatten(list(grads))

    def loop(self, rule: StopRule) -> tuple[torch.Tensor, dict]:
        """Adam steps from θ̂ until `rule` says stop, checking every `check_every` steps (and at θ̂ first); on an
        overshoot, the point on the segment back to the previous check that the rule accepts, or the one closest to
        its target (`_bisect`); at the cap, the checked point closest to the target, reported as not met."""
        view, knobs, model = self.view, self.knobs, self.ctx.model
        theta = self.theta_hat.clone()
        stop, stats = rule.check(model)
        history = [{"step": 0, **stats}]
        if stop and not self.args.min_steps:
            return theta, _outcome(history, 0, True, "the forgotten examples are already as familiar as the holdout at "
                                                     "θ̂")
        adam = Adam(AdamConfig(lr=knobs.lr), theta)
        bad = torch.zeros((), dtype=torch.bool, device=view.device)
        prev, best = (0, theta, stats), (rule.distance(stats), 0, theta)
        for k in range(1, knobs.max_steps + 1):
            theta = adam.step(theta, self.gradient(theta, k - 1))
            view.set_vector(theta)
            bad |= ~torch.isfinite(theta).all()
            if k % knobs.check_every and k != knobs.max_steps:
                continue
            if bool(bad):  # read back at a check only
                raise SolverError(f"the {self.objective} run diverged by step {k} (non-finite parameters); lower "
                                  f"the forget learning rate")
            stop, stats = rule.check(model)
            history.append({"step": k, **stats})
            if stop and k >= self.args.min_steps:
                return self._refine(rule, prev, (k, theta, stats), history)
            if rule.overshot(stats):
                return self._bisect(rule, prev, (k, theta, stats), history)
            if rule.distance(stats) < best[0]:
                best = (rule.distance(stats), k, theta)
            prev = (k, theta, stats)
        _, step, theta = best
        return theta, _outcome(history, step, False, f"{knobs.max_steps} steps (max_steps) without the forgotten "
                                                      f"examples looking like the holdout; returned the checked "
                                                      f"point closest to it")

    def _refine(self, rule: StopRule, before: tuple, after: tuple, history: list) -> tuple[torch.Tensor, dict]:
        """The check `after` met the rule, `before` (the previous check) had the loss AUC above the target: up to
        `refine` evaluations on the segment between them where the loss AUC crosses 0.5 by linear interpolation
        (regula falsi, kept inside the bracket's middle 90%), returning the earliest point the rule accepts — the
        check itself when none is earlier. A check interval can carry the AUC well past 0.5 (to 0.41–0.43 on people
        forget05, docs/forget.md#the-stop-rule); the point where it crosses is where the rule aims."""
        (k0, a, sa), (k1, b, sb) = before, after
        best, lo, hi = (1.0, b, sb), (0.0, sa["auc"]), (1.0, sb["auc"])
        for _ in range(self.args.refine if lo[1] > TARGET else 0):
            t = lo[0] + (lo[1] - TARGET) / (lo[1] - hi[1]) * (hi[0] - lo[0])
            t = min(max(t, lo[0] + 0.05 * (hi[0] - lo[0])), hi[0] - 0.05 * (hi[0] - lo[0]))
            theta = a + t * (b - a)
            self.view.set_vector(theta)
            stop, stats = rule.check(self.ctx.model)
            history.append({"step": k0 + t * (k1 - k0), **stats})
            if stop:
                best, hi = (t, theta, stats), (t, stats["auc"])
            elif stats["auc"] > TARGET:
                lo = (t, stats["auc"])
            else:  # past 0.5 but a score says either side: the accepted crossing, if any, is earlier still
                hi = (t, stats["auc"])
        t, theta, stats = best
        return theta, _outcome(history, k0 + t * (k1 - k0), True,
                               f"the forgotten examples are as familiar as the holdout ({_says(stats)})")

    def _bisect(self, rule: StopRule, before: tuple, after: tuple, history: list) -> tuple[torch.Tensor, dict]:
        """The last step went past the target (from `before`, still more familiar, to `after`, less familiar):
        bisect the segment between them (`bisect` evaluations) for a point the rule accepts; else return the
        closest evaluated point. Never the overshooting side unless it is the closest."""
        (k0, a, sa), (k1, b, sb) = before, after
        candidates = [(rule.distance(sa), 0.0, a, sa), (rule.distance(sb), 1.0, b, sb)]
        lo, hi = 0.0, 1.0
        for _ in range(self.args.bisect):
            t = (lo + hi) / 2
            theta = a + t * (b - a)
            self.view.set_vector(theta)
            stop, stats = rule.check(self.ctx.model)
            history.append({"step": k0 + t * (k1 - k0), **stats})
            if stop:
                return theta, _outcome(history, k0 + t * (k1 - k0), True,
                                       f"a step overshot; bisected back to a point that looks like the holdout "
                                       f"({_says(stats)})")
            candidates.append((rule.distance(stats), t, theta, stats))
            lo, hi = (lo, t) if rule.overshot(stats) else (t, hi)
        _, t, theta, stats = min(candidates, key=lambda c: c[0])
        return theta, _outcome(history, k0 + t * (k1 - k0), False,
                               f"a step overshot and no point between the last two checks passed the test; returned "
                               f"the closest ({_says(stats)})")


def kept_losses(ctx: RequestContext, kept: Sequence[Example], theta_hat: torch.Tensor, theta: torch.Tensor,
                view: ParamView, batch_size: int, size: int = KEPT_CHECK) -> dict:
    """The mean loss of up to min(size, KEPT_CHECK) kept examples (evenly spaced) at θ̂ and at the result: what the
    retain term was for (retraining leaves the examples it keeps about where they were). One transfer, at the end."""
    size = min(size, KEPT_CHECK)
    sample = list(kept[:: max(1, len(kept) // size)][:size])
    if not sample:
        return {"examples": 0}
    totals = torch.zeros(2, dtype=torch.float64, device=view.device)
    with torch.no_grad():
        for i in range(0, len(sample), batch_size):
            batch = ctx.task.collate(sample[i:i + batch_size])
            for j, point in enumerate((theta_hat, theta)):
                view.set_vector(point)
                totals[j] += per_example_loss(ctx.task, ctx.model, batch).sum().double()
    before, after = (totals / len(sample)).tolist()
    return {"examples": len(sample), "original": before, "result": after, "ratio": after / max(before, 1e-12)}


def _says(stats: dict) -> str:
    return (f"loss AUC {stats['auc']:.3f} (p {stats['p']:.2g}), min-k%++ AUC {stats['auc_min_k_pp']:.3f} "
            f"(p {stats['p_min_k_pp']:.2g}): {stats['verdict']}")


def _outcome(history: list[dict], step: float, met: bool, why: str) -> dict:
    return {"stop": {"met": met, "why": why, "rule": "membership AUC of the forgotten examples against the holdout "
                                                     "by response loss, calibrated by the base model; stop at the "
                                                     "first check with AUC ≤ 0.5 that the test calls 'looks like the "
                                                     "holdout'",
                     "checks": history},
            "returned_step": step, "steps_taken": max(h["step"] for h in history)}
