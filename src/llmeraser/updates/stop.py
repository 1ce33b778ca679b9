"""What the unlearners without a recording (`updates.forget`) are told, and when they stop: `ForgetArguments`, and the
stop rule taken from evidence — a membership test of the forgotten examples against a holdout (examples of the same
kind the adapter never saw) — instead of a fixed learning rate and epoch count (docs/forget.md).

The stop rule is one small piece on purpose: `StopRule.check(model) → (stop, stats)`. `HoldoutStop` scores the
forgotten examples and the holdout by their response loss and compares them by `membership_test` (the AUC of
members against the holdout with its Hanley–McNeil interval); `llmeraser.evidence` (membership scores, min-k%++, the
KS p-value, the verdict) plugs in by replacing `membership_test` and `HoldoutStop.scores`, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmeraser.data import Example
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.metrics import roc_auc
from llmeraser.task import IGNORE_INDEX, Task

LOOKS_LIKE = "looks like the holdout"
MORE = "more familiar"
LESS = "less familiar"


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
        "help": "forget: weight of the retain term (KL to the original adapter on kept examples, plus the "
                "corrected versions' loss)"})
    retain: str = field(default="kl", metadata={
        "help": "forget: the retain term on kept examples: kl (to the original adapter's next-token distribution) "
                "or nll (their loss)"})
    check_every: int | None = field(default=None, metadata={
        "help": "forget: steps between two checks of the stop rule; default such that the checks cost about as "
                "much as the steps between them"})
    z: float = field(default=1.96, metadata={
        "help": "forget: the stop rule's interval is AUC ± z·SE (1.96: 95%); the unlearner stops as soon as it holds "
                "0.5"})
    bisect: int = field(default=6, metadata={
        "help": "forget: when a step overshoots (the forgotten examples look less familiar than the holdout), "
                "evaluations on the segment back to the previous check to find the point that looks like it"})
    seed: int = field(default=0, metadata={"help": "forget: seed of the kept examples' order in the retain term"})

    def __post_init__(self) -> None:
        for name in ("lr", "beta", "z"):
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
        if self.retain not in ("kl", "nll"):
            raise ConfigError(f"forget retain must be 'kl' or 'nll', got {self.retain!r}")
        if self.bisect < 0:
            raise ConfigError(f"forget bisect must be ≥ 0, got {self.bisect}")


def hanley_mcneil_se(auc: float, n1: int, n2: int) -> float:
    """The standard error of an AUC of n1 positives against n2 negatives (Hanley & McNeil, 1982), from the AUC itself:
    Q1 = A/(2−A), Q2 = 2A²/(1+A), SE² = (A(1−A) + (n1−1)(Q1−A²) + (n2−1)(Q2−A²)) / (n1 n2). 0 at A ∈ {0, 1}."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n2 - 1) * (q2 - auc * auc)) / (n1 * n2)
    return math.sqrt(max(var, 0.0))


def membership_test(members: Sequence[float], holdout: Sequence[float], z: float = 1.96) -> dict:
    """The forgotten examples' losses (`members`) against the holdout's: AUC = P(a member's loss < a holdout
    example's) (ties ½; 1: every member more familiar than every holdout example, 0.5: alike), its Hanley–McNeil
    interval AUC ± z·SE, and the verdict: `looks like the holdout` when the interval holds 0.5, else `more familiar`
    (AUC above) or `less familiar` (below: over-forgotten, a signature of its own)."""
    auc = roc_auc([-x for x in members] + [-x for x in holdout], [1] * len(members) + [0] * len(holdout))
    se = hanley_mcneil_se(auc, len(members), len(holdout))
    lo, hi = auc - z * se, auc + z * se
    verdict = LOOKS_LIKE if lo <= 0.5 <= hi else MORE if auc > 0.5 else LESS
    return {"auc": auc, "se": se, "lo": lo, "hi": hi, "verdict": verdict, "members": len(members),
            "holdout": len(holdout)}


def holdout_needed(n_members: int, z: float = 1.96, most: int = 100_000) -> int | None:
    """The fewest holdout examples for which the test can tell a memorised forget set from the holdout at all: its
    interval at chance, 0.5 ± z·SE(0.5), must exclude AUC 1 (every member more familiar). SE(0.5)² =
    (1/4 + (n1 + n2 − 2)/12) / (n1 n2) ≥ 1/(12 n1) as n2 grows, so with a single member (SE ≥ 0.289) no holdout is
    enough: None."""
    if n_members < 1 or z * hanley_mcneil_se(0.5, n_members, most) >= 0.5:
        return None
    n2 = 1
    while z * hanley_mcneil_se(0.5, n_members, n2) >= 0.5:
        n2 += 1
    return n2


def check_holdout(n_members: int, holdout: Sequence[Example] | None, z: float = 1.96) -> str | None:
    """Why the stop rule cannot run on this request's `n_members` forgotten examples and this holdout (None: it
    can)."""
    if not holdout:
        return ("no holdout was given (unlearn --holdout FILE: examples of the same kind and format the adapter never "
                "saw)")
    need = holdout_needed(n_members, z)
    if need is None:
        return (f"the membership test needs at least 2 edited examples to tell forgotten from familiar at z = {z:g} "
                f"(the request edits {n_members})")
    if len(holdout) < need:
        return (f"the holdout has {len(holdout)} examples; with {n_members} edited examples the membership test "
                f"needs at least {need} to tell a memorised set from the holdout at z = {z:g}")
    return None


class StopRule(Protocol):
    """When an unlearner stops: `check(model)` at the model's current θ → (stop now, the statistics for the
    report). `distance(stats)`: how far from the target a checked point is (the unlearner returns the closest one
    when it never stops or overshoots); `overshot(stats)`: the point went past the target."""

    def check(self, model: torch.nn.Module) -> tuple[bool, dict]: ...

    def distance(self, stats: dict) -> float: ...

    def overshot(self, stats: dict) -> bool: ...


class HoldoutStop:
    """Stop as soon as the forgotten examples look like the holdout by `membership_test`; with corrections, also
    only once the corrected versions' mean loss is below where it started (they are being learned).

    Each check is a forward pass over the forgotten examples, the holdout and the corrected versions, batched as
    the task does; their per-example scores stay on the model's device until one transfer at the end of the check.
    The batches are tokenised once, here."""

    def __init__(self, task: Task, members: Sequence[Example], holdout: Sequence[Example],
                 corrected: Sequence[Example] = (), *, z: float = 1.96, batch_size: int = 8):
        why = check_holdout(len(members), holdout, z)
        if why is not None:
            raise UserInputError(f"the forget stop rule cannot run: {why}")
        self.task, self.z = task, z
        sizes = (len(members), len(holdout), len(corrected))
        every = [*members, *holdout, *corrected]
        self.batches = [task.collate(every[i:i + batch_size]) for i in range(0, len(every), batch_size)]
        self.cuts = (sizes[0], sizes[0] + sizes[1])
        self.corrected_start: float | None = None

    def scores(self, model: torch.nn.Module) -> torch.Tensor:
        """Each example's response loss, the mean token NLL (length-normalised, whatever the task's averaging), on
        the model's device."""
        with torch.no_grad():
            return torch.cat([token_nll(self.task, model, b)[1] for b in self.batches])

    def check(self, model: torch.nn.Module) -> tuple[bool, dict]:
        losses = self.scores(model).double().cpu().tolist()  # the one transfer of a check
        a, b = self.cuts
        stats = membership_test(losses[:a], losses[a:b], self.z)
        stats |= {"forget_loss": sum(losses[:a]) / a, "holdout_loss": sum(losses[a:b]) / (b - a)}
        learned = True
        if len(losses) > b:
            corrected = sum(losses[b:]) / (len(losses) - b)
            if self.corrected_start is None:
                self.corrected_start = corrected
            learned = corrected < self.corrected_start
            stats |= {"corrected_loss": corrected}
        return stats["verdict"] == LOOKS_LIKE and learned, stats

    def distance(self, stats: dict) -> float:
        return abs(stats["auc"] - 0.5)

    def overshot(self, stats: dict) -> bool:
        return stats["verdict"] == LESS


def token_nll(task: Task, model: torch.nn.Module,
              batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the task's loss ℓ, the mean token NLL, the summed NLL = −log π(y|x), the model's outputs) per example of a
    collated batch, with the graph. ℓ is the mean token NLL (example average) or Σ NLL / t̄ (token-weighted,
    `CausalLMTask`); both NLLs are recovered from ℓ and the loss tokens (`targets`). A task without `targets` is
    taken to score one token an example (ℓ serves as all three)."""
    outputs = task.forward(model, batch)
    loss = task.loss(outputs, batch)
    targets = batch.get("targets")
    if targets is None:
        return loss, loss, loss, outputs
    tokens = (targets != IGNORE_INDEX).sum(1).to(device=loss.device, dtype=loss.dtype).clamp(min=1)
    rendering = getattr(task, "rendering", None)
    if rendering is not None and rendering.normalization == "token":
        total = loss * task.token_scale
        return loss, total / tokens, total, outputs
    return loss, loss, loss * tokens, outputs
