"""What the unlearners without a recording (`updates.forget`) are told, and when they stop: `ForgetArguments`, and the
stop rule taken from evidence — a membership test of the forgotten examples against a holdout (examples of the same
kind the adapter never saw), calibrated by the base model — instead of a fixed learning rate and epoch count
(docs/forget.md).

The stop rule is one small piece on purpose: `StopRule.check(model) → (stop, stats)`. `HoldoutStop` is the
membership test every request's report holds (`llmeraser.evidence`: response loss and min-k%++ against the holdout,
Mann–Whitney p-values, the verdict), so the unlearner stops where the report's evidence has the forgotten examples
as familiar as the holdout, and no other statistic decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmeraser.data import Example
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.evidence import (
    ALPHA,
    LIKE,
    HoldoutError,
    MembershipTest,
    Probe,
    Scores,
    membership_scores,
    membership_test,
)
from llmeraser.evidence import LESS as EVIDENCE_LESS
from llmeraser.evidence import MORE as EVIDENCE_MORE
from llmeraser.evidence import check_holdout as evidence_check
from llmeraser.task import IGNORE_INDEX, Task

LOOKS_LIKE, MORE, LESS = LIKE, EVIDENCE_MORE, EVIDENCE_LESS  # the verdicts of `evidence.membership_test`
TARGET = 0.5  # the loss AUC (calibrated) the stop rule runs to: a forgotten example as familiar as a held-out one
STALE_MARGIN = 0.1  # a check skips the holdout while every AUC against its last scores is ≥ TARGET + this (+ the drift
#                     measured in the run): twice the most the holdout's drift moved an AUC in one check on the
#                     benchmarks (0.051 on the TRL chat removal, 0.021 on people forget05; docs/forget.md)
STALE_RUN = 3  # checks in a row that may skip the holdout: at least every fourth check is a full one


@dataclass
class ForgetArguments:
    """Options of the unlearners without a recording (`gradient-difference`, `npo`, `simnpo`); every default that
    depends on the adapter is taken from its training record (None here: `updates.forget.resolve_defaults`)."""

    lr: float | None = field(default=None, metadata={
        "help": "forget: Adam's learning rate; default the fine-tune's own (its training record's; 1e-3, llmeraser "
                "finetune's default, when the record has none)"})
    max_steps: int | None = field(default=None, metadata={
        "help": "forget: the most steps before giving up (the report then says the stop rule was not met); default "
                "10 × the fine-tune's epochs × the forget set's batches"})
    batch_size: int | None = field(default=None, metadata={
        "help": "forget: examples a step from the forget set, and from the kept set for the retain term; default the "
                "fine-tune's batch size (8 when not recorded)"})
    beta: float = field(default=0.1, metadata={"help": "forget: β of NPO and SimNPO (Zhang et al.; Fan et al.)"})
    gamma: float = field(default=0.0, metadata={"help": "forget: SimNPO's reward margin γ"})
    retain_weight: float = field(default=1.0, metadata={
        "help": "forget: weight of the retain term (the kept examples' loss, or their KL to the original adapter, "
                "plus the corrected versions' loss)"})
    retain: str = field(default="nll", metadata={
        "help": "forget: the retain term on kept examples: nll (default: their loss, as TOFU's and SimNPO's "
                "retain terms; it kept utility 0.97–1.00 of a retrain's on people forget05/10 where kl kept 0.92–0.93) "
                "or kl (to the original adapter's next-token distribution: holds the original, not the retrain)"})
    retain_order: str = field(default="overlap", metadata={
        "help": "forget: which kept examples the retain term holds first: overlap (default): those whose response "
                "tokens share the most with the forgotten examples' (each shared token weighted by its rarity among "
                "the kept responses: a value that kept and forgotten facts share, not the template they all have) — "
                "the facts a step on the forget set moves most; random: the kept set in random order"})
    check_every: int | None = field(default=None, metadata={
        "help": "forget: steps between two checks of the stop rule; default such that the checks cost about as "
                "much as the steps between them"})
    alpha: float = field(default=ALPHA, metadata={
        "help": "forget: the stop rule's level: the unlearner runs until the forgotten examples' loss AUC against "
                "the holdout (calibrated by the base model) is at most 0.5 while the report's membership test at this "
                "level says neither side; a step the test calls over-forgotten is bisected back (docs/forget.md)"})
    min_steps: int = field(default=0, metadata={
        "help": "forget: steps taken before the stop rule may end the run (bench/device_check.py sets it so that the "
                "loop runs on every device whatever the evidence)"})
    bisect: int = field(default=6, metadata={
        "help": "forget: when a step overshoots (the forgotten examples look less familiar than the holdout), "
                "evaluations on the segment back to the previous check to find the point that looks like it"})
    refine: int = field(default=1, metadata={
        "help": "forget: when a check meets the rule, evaluations back on the segment from the previous check at the "
                "point where the loss AUC crosses 0.5 by linear interpolation (regula falsi), so the run stops near "
                "the target rather than up to a whole check interval past it; 0: stop at the check"})
    floor: str = field(default="base", metadata={
        "help": "forget: base (default): each token of a forgotten example counts toward the forget objective only up "
                "to the base model's NLL of it (the adapter disabled), so the objective cannot be lowered by making a "
                "token less likely than a model that never saw the example finds it — the shortcut sequence-level "
                "objectives take otherwise (breaking a name token all of a person's facts share while the facts stay; "
                "docs/forget.md#the-token-floor); none: the papers' objectives as written"})
    seed: int = field(default=0, metadata={"help": "forget: seed of the kept examples' order in the retain term"})

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"forget alpha must be in (0, 1), got {self.alpha}")
        for name in ("lr", "beta"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"forget {name} must be a finite number > 0, got {v}")
        for name in ("gamma", "retain_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"forget {name} must be a finite number ≥ 0, got {v}")
        for name in ("max_steps", "batch_size", "check_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or v < 1):
                raise ConfigError(f"forget {name} must be ≥ 1, got {v}")
        if self.floor not in ("base", "none"):
            raise ConfigError(f"forget floor must be 'base' or 'none', got {self.floor!r}")
        if self.retain_order not in ("overlap", "random"):
            raise ConfigError(f"forget retain_order must be 'overlap' or 'random', got {self.retain_order!r}")
        if self.retain not in ("kl", "nll"):
            raise ConfigError(f"forget retain must be 'kl' or 'nll', got {self.retain!r}")
        if self.bisect < 0 or self.min_steps < 0 or self.refine < 0:
            raise ConfigError(f"forget bisect, refine and min_steps must be ≥ 0, got {self.bisect}, {self.refine} and "
                              f"{self.min_steps}")


def check_holdout(members: Sequence[Example], holdout: Sequence[Example] | None,
                  train: Sequence[Example] | None = None, alpha: float = ALPHA) -> str | None:
    """Why the stop rule cannot run on these forgotten examples and this holdout (None: it can): no holdout, or one
    `evidence.check_holdout` refuses (another format than the training data, examples it holds, too few to say
    anything — it says how many it needs)."""
    if not holdout:
        return ("no holdout was given (unlearn --holdout FILE: examples of the same kind and format the adapter never "
                "saw)")
    try:
        evidence_check(holdout, train=train, members=members, alpha=alpha)
    except HoldoutError as e:
        return str(e)
    return None


class StopRule(Protocol):
    """When an unlearner stops: `check(model)` at the model's current θ → (stop now, the statistics for the
    report). `distance(stats)`: how far from the target a checked point is (the unlearner returns the closest one
    when it never stops or overshoots); `overshot(stats)`: the point went past the target."""

    def check(self, model: torch.nn.Module) -> tuple[bool, dict]: ...

    def distance(self, stats: dict) -> float: ...

    def overshot(self, stats: dict) -> bool: ...


class HoldoutStop:
    """Stop once the forgotten examples have come as far as the holdout: the membership test the report holds
    (`evidence.membership_test`, calibrated by the base model's scores, computed once at the first check) has the
    response loss's AUC at or below 0.5 — on the point estimate, not merely "no longer significant", which at a few
    dozen examples the first step already is (docs/forget.md#the-stop-rule) — while no score says either side
    significantly (the verdict is "looks like the holdout"); with corrections, also only once the corrected versions'
    mean loss is below where it started (they are being learned). Overshot: the test says the forgotten examples are
    now less familiar than the holdout.

    A check is a forward pass over the forgotten examples, and over the holdout and the corrected versions unless the
    forgotten examples are still plainly familiar (`evidence.membership_scores`: on the model's device, one transfer
    per set at the end; through the request's `evidence.Probe` when given one (`probe`, the job's: its base-model
    reference and its scores at θ̂ are the report's, not computed again)). The holdout is scored only where it could
    decide (docs/forget.md#what-a-check-costs): the forgotten examples are tested first against the holdout's scores
    of the last full check, and while every score's AUC there is ≥ 0.5 + STALE_MARGIN + (the most the holdout's drift
    has moved an AUC per check, measured at each full check from the second on) × the checks since, for at most
    STALE_RUN checks in a row, the check says "not yet" without it; none skips before the drift is measured. A stop,
    an overshoot and the point returned are always decided on a full check: a wrong "not yet" costs steps, and refine
    or bisect take the run back to where the full test crosses."""

    def __init__(self, task: Task, members: Sequence[Example], holdout: Sequence[Example],
                 corrected: Sequence[Example] = (), *, alpha: float = ALPHA, batch_size: int = 8,
                 train: Sequence[Example] | None = None, calibrate: bool = True, probe: Probe | None = None):
        why = check_holdout(members, holdout, train, alpha)
        if why is not None:
            raise UserInputError(f"the forget stop rule cannot run: {why}")
        ids = [e.id for e in members], [e.id for e in holdout]
        if probe is None or ([e.id for e in probe.members], [e.id for e in probe.holdout]) != ids \
                or probe.calibrate != calibrate:
            probe = Probe(task, members, holdout, batch_size=batch_size, calibrate=calibrate)
        self.task, self.alpha, self.batch_size, self.probe = task, alpha, batch_size, probe
        self.corrected = list(corrected)
        self.corrected_start: float | None = None
        self.last_holdout: Scores | None = None  # the holdout's scores at the last full check
        self.stale, self.drift = 0, 0.0  # checks since it; the most its drift moved an AUC per check
        self.measured = False  # the drift has been measured (two full checks in a row): no check skips before

    def check(self, model: torch.nn.Module) -> tuple[bool, dict]:
        reference = self.probe.reference(model)
        guess = None
        if self.last_holdout is not None:
            members, _ = self.probe.scores(model, holdout=self.last_holdout)
            guess = membership_test(members, self.last_holdout, alpha=self.alpha, reference=reference)
            if self.measured and self.stale < STALE_RUN and \
                    min(t.auc for t in guess.tests) >= TARGET + STALE_MARGIN + self.drift * (self.stale + 1):
                self.stale += 1
                return False, _stats(guess) | {"holdout_scored": False}
        members, holdout = self.probe.scores(model)
        test = membership_test(members, holdout, alpha=self.alpha, reference=reference)
        stats = _stats(test) | {"holdout_scored": True}
        if guess is not None:  # how far the holdout's drift since its last scores moved the AUCs
            moved = max(abs(g.auc - t.auc) for g, t in zip(guess.tests, test.tests, strict=True))
            self.drift, self.measured = max(self.drift, moved / (self.stale + 1)), True
            stats["holdout_drift"] = moved
        self.last_holdout, self.stale = holdout, 0
        learned = True
        if self.corrected:
            scores = membership_scores(model, self.task, self.corrected, batch_size=self.batch_size)
            loss = sum(scores.loss) / len(scores.loss)
            if self.corrected_start is None:
                self.corrected_start = loss
            learned = loss < self.corrected_start
            stats |= {"corrected_loss": loss}
        return stats["auc"] <= TARGET and stats["verdict"] == LOOKS_LIKE and learned, stats

    def distance(self, stats: dict) -> float:
        """How far the forgotten examples are from the target: |loss AUC − 0.5|."""
        return abs(stats["auc"] - TARGET)

    def overshot(self, stats: dict) -> bool:
        return stats["verdict"] == LESS


def _stats(test: MembershipTest) -> dict:
    """What a check reports of its membership test (the loss AUC as `auc`, min-k%++'s as `auc_min_k_pp`)."""
    stats = {"verdict": test.verdict, "members": test.n_members, "holdout": test.n_holdout,
             "calibration": test.calibration}
    for t in test.tests:
        tag = "" if t.score == "loss" else f"_{t.score}"
        stats |= {f"auc{tag}": t.auc, f"p{tag}": t.p_auc}
    return stats | {"forget_loss": test.score("loss").mean_members, "holdout_loss": test.score("loss").mean_holdout}


def token_nll(task: Task, model: torch.nn.Module, batch: dict, floor: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the task's loss ℓ, the mean token NLL, the summed NLL = −log π(y|x), the model's outputs) per example of a
    collated batch, with the graph, from the task's per-token NLLs (`CausalLMTask.token_nll`, reduced to ℓ by its
    `reduce`: the example mean or TRL's Σ NLL / t̄). A task without per-token NLLs or `targets` is taken to score one
    token an example (ℓ serves as all three).

    `floor` (batch, k), on the outputs' device: each loss token's NLL counts only up to it (min(NLL_t, floor_t), no
    gradient past it): `token_floor`, the base model's NLL of the token, so a forget objective cannot gain by making a
    token less likely than a model that never saw the example finds it."""
    outputs = task.forward(model, batch)
    targets = batch.get("targets")
    if targets is None or not hasattr(task, "token_nll"):
        loss = task.loss(outputs, batch)
        return loss, loss, loss, outputs
    nll = task.token_nll(outputs, batch)
    if floor is not None:
        nll = torch.minimum(nll, floor)
    tokens = (targets != IGNORE_INDEX).sum(1).to(device=nll.device, dtype=nll.dtype).clamp(min=1)
    total = nll.sum(1)
    return task.reduce(nll, batch), total / tokens, total, outputs


def token_floor(task: Task, model: torch.nn.Module, batch: dict) -> torch.Tensor | None:
    """(batch, k) the base model's NLL of each loss token (the adapters disabled; 0 at positions without one), on the
    model's device, no graph; None for a model without adapters to disable or a task without `targets`."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None or batch.get("targets") is None or not hasattr(task, "token_nll"):
        return None
    with torch.no_grad(), disable():
        return task.token_nll(task.forward(model, batch), batch)
