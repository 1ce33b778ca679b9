"""Evidence that examples were forgotten: a membership test of the edited examples against a holdout (docs/evidence.md).

After a good erasure the forgotten examples look to the model like examples it never saw (MUSE's PrivLeak): neither
more familiar (not forgotten) nor less (over-forgotten, a signature of its own). The API, in the order a report uses it:

    scores = membership_scores(model, task, examples)        # per example: response loss, min-k%++ (`Scores`)
    check_holdout(holdout, train=train, members=examples)     # same format, unseen, big enough; else HoldoutError
    test = membership_test(scores, membership_scores(model, task, holdout))     # `MembershipTest`
    print(test.table()); json.dump(test.to_dict(), f)        # MembershipTest.from_dict(d) reads it back
    record = Comparison(before=test_on_original, after=test_on_unlearned)      # `.to_dict()` for a report

Scores (`membership_scores`, batched, all on the model's device, one transfer to the host at the end):
- `loss`: the mean NLL of the tokens the task's loss is taken on (its Rendering's masks), averaged per example
  whatever the rendering's normalization (Σ NLL / t̄ would rank long examples as less familiar). Lower = familiar.
- `min_k_pp` (Min-K%++, Zhang et al. 2024): per loss token t, z_t = (log p(x_t|x<t) − μ_t)/σ_t with μ_t, σ_t the mean
  and standard deviation of log p(z|x<t) for z ~ p(·|x<t) over the vocabulary; the mean of the lowest max(1, ⌊k·n⌋)
  of an example's n values (k = 0.2). Higher = familiar (a trained token sits near a mode of its distribution).

The test (`membership_test`), for each score oriented so that higher = more familiar:
- AUC = P(an example is more familiar than a holdout example) (ties ½): 0.5 indistinguishable, > 0.5 the examples look
  more familiar than the holdout, < 0.5 less. With DeLong's 95% interval (its nonparametric standard error).
- p_auc: the two-sided p-value of AUC = 0.5, the Mann–Whitney test (whose statistic is the AUC): exact (the null
  distribution of U counted by the Gaussian binomial coefficient) when there are no ties and the sets are small,
  else normal with the tie-corrected variance and continuity correction (scipy's `mannwhitneyu` defaults).
- ks_p: the two-sample Kolmogorov–Smirnov p-value of the two score distributions (TOFU's forget quality takes it
  against a retrain; here against the holdout): exact path counting for small samples, Kolmogorov's limit beyond.
- verdict (`LIKE`, `MORE`, `LESS`): p_auc < α / (number of scores) decides, by AUC's side of 0.5 (Bonferroni over the
  scores, so the verdict's false-alarm rate stays ≤ α). The null test decides rather than DeLong's interval: the
  interval's standard error vanishes at perfect separation, so it would call 2 against 2 separated examples
  significant, where the exact p is 1/3. The overall verdict is MORE when a score says so (a score that still
  recognises the examples is evidence they are not forgotten), else LESS when one says so, else LIKE.
- resolution: the |AUC − 0.5| the test can tell from noise at these sizes (the normal null band's half-width), so
  "looks like the holdout" is read as "within ±resolution".

Calibration (difficulty calibration, Watson et al., ICLR 2022): two groups of examples no model saw still differ — some
facts are easier to guess than others — and a retrain, which never saw the forgotten examples, keeps that difference: on
the people benchmark it finds two forgotten people at loss AUC 0.36 against four held-out ones, where the base model
alone finds 0.35 (docs/evidence.md#calibration-each-example-against-itself-under-the-base-model). So the test is taken
on each example's score *minus its score under the base model* (the adapter disabled: `references`), which measures what
the fine-tune did to the example; there unseen examples sit at AUC 0.5 whatever their difficulty (the retrain above:
0.53). `evidence` calibrates whenever the model has an adapter to disable; the uncalibrated AUCs stay (`raw_auc`).

`check_holdout` refuses a holdout the test cannot use: another format than the training data, ids (or contents) that
are in the training set, or fewer examples than `min_holdout`: the smallest holdout for which the test can reach
p < α / (number of scores) at all, i.e. when the sets are perfectly separated, where both the exact Mann–Whitney and
the exact KS p-value are 2 / C(m + n, m). `holdout_size` gives the holdout a chosen resolution needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist

import torch

from llmeraser.data import Example
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.task import IGNORE_INDEX, CausalLMTask
from llmeraser.twosample import auc_delong, ks_2samp, mann_whitney_p

MIN_K = 0.2  # Min-K%++'s fraction of lowest token scores (Zhang et al.'s default)
ALPHA = 0.05
SCORES = ("loss", "min_k_pp")
SIGN = {"loss": -1.0, "min_k_pp": 1.0}  # the orientation that makes higher = more familiar
LIKE = "looks like the holdout"
MORE = "more familiar than the holdout (not forgotten)"
LESS = "less familiar than the holdout (over-forgotten)"
CALIBRATED = "calibrated by the base model"
UNCALIBRATED = "uncalibrated"
CHUNK = 1 << 24  # logits elements per slice of the vocabulary statistics (bounds the temporaries)


class HoldoutError(UserInputError):
    """A holdout the membership test cannot use (format, overlap with the training set, size)."""


# ------------------------------------------------------------------------------------------------------ scores
@dataclass(frozen=True)
class Scores:
    """Per-example membership scores (`membership_scores`), in the examples' order."""

    ids: tuple[str, ...]
    loss: tuple[float, ...]
    min_k_pp: tuple[float, ...]
    k: float = MIN_K

    def familiarity(self, score: str) -> list[float]:
        """The score oriented so that higher = more familiar."""
        return [SIGN[score] * v for v in getattr(self, score)]

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "loss": list(self.loss), "min_k_pp": list(self.min_k_pp), "k": self.k}

    @classmethod
    def from_dict(cls, d: dict) -> Scores:
        return cls(tuple(d["ids"]), tuple(d["loss"]), tuple(d["min_k_pp"]), d.get("k", MIN_K))

    def calibrated(self, reference: Scores) -> Scores:
        """Each score minus the same example's score under a reference model that saw none of them (the base model):
        what the fine-tune did to the example, without how hard the example is in itself (difficulty calibration)."""
        if reference.ids != self.ids or reference.k != self.k:
            raise ConfigError("a reference's scores must be of the same examples, in the same order, with the same k")
        return Scores(self.ids, *(tuple(a - b for a, b in zip(getattr(self, s), getattr(reference, s), strict=True))
                                  for s in SCORES), self.k)


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(log p(target), μ, σ) at each position, each (batch, k), in float64 from logits promoted to at least float32.

    Computed over slices of positions so that the temporaries (log p, p, centred log p) never exceed CHUNK elements.
    σ is set to +inf where it is within the rounding of the centred log-probabilities (16 ε (1 + |μ|)), so z = 0
    there: a uniform distribution has σ = 0, and log p − μ would be rounding noise divided by rounding noise."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    step = max(1, CHUNK // max(1, logits.shape[0] * logits.shape[2]))
    tok, mu, var = [], [], []
    for s in range(0, logits.shape[1], step):
        logp = torch.log_softmax(logits[:, s : s + step].to(dtype), dim=-1)
        tok.append(logp.gather(-1, targets[:, s : s + step].clamp(min=0)[..., None]).squeeze(-1).double())
        p, logp = logp.exp(), logp.nan_to_num(neginf=0.0)  # a token masked to −inf has p = 0 and adds nothing
        m = (p * logp).sum(-1)
        var.append((p * (logp - m[..., None]).square()).sum(-1).double())
        mu.append(m.double())
    mu_all = torch.cat(mu, 1)
    sigma = torch.cat(var, 1).sqrt()  # var ≥ 0: a sum of squares
    sigma = torch.where(sigma > 16 * torch.finfo(dtype).eps * (1 + mu_all.abs()), sigma, math.inf)
    return torch.cat(tok, 1), mu_all, sigma


def _batch_scores(logits: torch.Tensor, targets: torch.Tensor, k: float) -> torch.Tensor:
    """(3, batch) float64 on the logits' device: mean loss-token NLL, Min-K%++, number of loss tokens (NaN scores
    for an example without one)."""
    valid = targets != IGNORE_INDEX
    tok, mu, sigma = token_statistics(logits, targets)
    n = valid.sum(1).double()
    loss = -torch.where(valid, tok, torch.zeros_like(tok)).sum(1) / n  # 0/0 = NaN without loss tokens
    z = torch.where(valid, (tok - mu) / sigma, torch.full_like(tok, math.inf))
    lowest = z.sort(1).values
    m = (n * k).floor().clamp(min=1)  # max(1, ⌊k·n⌋), the same float64 product as Python's int(k * n)
    take = torch.arange(z.shape[1], device=z.device)[None] < m[:, None]
    mink = torch.where(take, lowest, torch.zeros_like(lowest)).sum(1) / m
    mink = torch.where(n > 0, mink, torch.full_like(mink, math.nan))
    return torch.stack([loss, mink, n])


def membership_scores(model: torch.nn.Module, task: CausalLMTask, examples: Sequence[Example], *, k: float = MIN_K,
                      batch_size: int = 8) -> Scores:
    """The response loss and Min-K%++ of each example under `model` (eval mode, no grad; its mode is restored).

    Batches of similar length (less padding); every result stays on the model's device until one transfer at the end.
    Raises ConfigError for no examples, k outside (0, 1], batch_size < 1, or an example whose loss covers no token."""
    if not examples:
        raise ConfigError("membership scores need at least one example")
    if not 0 < k <= 1:
        raise ConfigError(f"k (the fraction of lowest token scores Min-K%++ averages) must be in (0, 1], got {k}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    device = next(model.parameters()).device
    out = torch.zeros((3, len(examples)), dtype=torch.float64, device=device)
    order = sorted(range(len(examples)), key=lambda i: len(task.encode(examples[i])[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                batch = task.collate([examples[i] for i in idx])
                logits = task.forward(model, batch)
                out[:, torch.tensor(idx, device=device)] = _batch_scores(logits, batch["targets"].to(device), k)
    finally:
        model.train(was_training)
    loss, mink, n = out.cpu().tolist()  # host: the one transfer
    empty = [e.id for e, c in zip(examples, n, strict=True) if c == 0]
    if empty:
        raise ConfigError(f"{len(empty)} example(s) have no token the loss is taken on (cut by max_length?), e.g. "
                          f"{', '.join(map(repr, empty[:3]))}: no membership score")
    return Scores(tuple(e.id for e in examples), tuple(loss), tuple(mink), k)


def reference_scores(model: torch.nn.Module, task: CausalLMTask, examples: Sequence[Example], *, k: float = MIN_K,
                     batch_size: int = 8) -> Scores | None:
    """`membership_scores` under the base model — `model` with its adapters disabled (peft's `disable_adapter()`,
    which every PEFT kind and a sharded folder's every shard honour) — or None for a model without adapters to
    disable: the reference that calibrates the test (`membership_test(..., reference=)`)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        return None
    with disable():
        return membership_scores(model, task, examples, k=k, batch_size=batch_size)


def min_holdout(n_members: int, alpha: float = ALPHA, n_scores: int = len(SCORES)) -> int:
    """The smallest holdout for which the test can say anything: the least n with 2 / C(m + n, m) < α / n_scores, the
    exact two-sided p-value (Mann–Whitney's and KS's alike) of m examples perfectly separated from n."""
    if n_members < 1:
        raise HoldoutError("the membership test needs at least one example to test")
    n, level = 1, alpha / n_scores
    while 2 / math.comb(n_members + n, n_members) >= level:
        n += 1
    return n


def holdout_size(n_members: int, resolution: float, alpha: float = ALPHA, n_scores: int = len(SCORES)) -> int | None:
    """The smallest holdout with which the test tells |AUC − 0.5| ≥ `resolution` from noise: z·√((m+n+1)/(12mn)) ≤
    resolution, z the normal quantile of 1 − α/(2·n_scores); None when no holdout suffices (too few examples: the band
    stays above z/√(12m) however large the holdout)."""
    c = (resolution / NormalDist().inv_cdf(1 - alpha / (2 * n_scores))) ** 2
    if 12 * n_members * c <= 1:
        return None
    return max(min_holdout(n_members, alpha, n_scores), math.ceil((n_members + 1) / (12 * n_members * c - 1)))


@dataclass(frozen=True)
class ScoreTest:
    """One score's comparison of the examples (members) with the holdout; AUC oriented: > 0.5 = more familiar."""

    score: str
    mean_members: float
    mean_holdout: float
    auc: float
    ci: tuple[float, float] | None  # DeLong's 95% interval, clipped to [0, 1]; None with a sample of one
    p_auc: float
    ks: float
    ks_p: float
    verdict: str


@dataclass(frozen=True)
class MembershipTest:
    """The membership test of `n_members` examples against `n_holdout` holdout examples (`membership_test`)."""

    n_members: int
    n_holdout: int
    alpha: float
    resolution: float
    tests: tuple[ScoreTest, ...]
    verdict: str
    k: float = MIN_K
    calibration: str = UNCALIBRATED  # CALIBRATED: the scores are each example's change from the base model's
    raw_auc: dict | None = None  # with calibration: each score's AUC before it (for the record)

    def to_dict(self) -> dict:
        return {"n_members": self.n_members, "n_holdout": self.n_holdout, "alpha": self.alpha, "k": self.k,
                "resolution": self.resolution, "verdict": self.verdict, "calibration": self.calibration,
                "raw_auc": self.raw_auc,
                "scores": {t.score: {**asdict(t), "ci": list(t.ci) if t.ci else None} for t in self.tests}}

    @classmethod
    def from_dict(cls, d: dict) -> MembershipTest:
        tests = tuple(ScoreTest(**{**t, "ci": tuple(t["ci"]) if t.get("ci") else None}) for t in d["scores"].values())
        return cls(d["n_members"], d["n_holdout"], d["alpha"], d["resolution"], tests, d["verdict"], d.get("k", MIN_K),
                   d.get("calibration", UNCALIBRATED), d.get("raw_auc"))

    def score(self, name: str) -> ScoreTest:
        return next(t for t in self.tests if t.score == name)

    def table(self) -> str:
        """The test as a text table, with how to read it."""
        head = (f"membership test: {self.n_members} examples against a holdout of {self.n_holdout} "
                f"(α = {self.alpha:g}, {self.alpha / len(self.tests):g} per score; {self.calibration})")
        mean = "mean change" if self.calibration == CALIBRATED else "mean"
        rows = [("score", f"examples {mean}", f"holdout {mean}", "AUC", "95% CI", "p(AUC=0.5)", "KS p", "verdict")]
        for t in self.tests:
            ci = f"[{t.ci[0]:.2f}, {t.ci[1]:.2f}]" if t.ci else "-"
            name = "loss" if t.score == "loss" else f"min-{self.k:.0%}++"
            rows.append((name, f"{t.mean_members:.4g}", f"{t.mean_holdout:.4g}", f"{t.auc:.3f}", ci,
                         f"{t.p_auc:.2g}", f"{t.ks_p:.2g}", t.verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join([head, *lines, f"verdict: {self.verdict}",
                          f"(AUC: the chance an example looks more familiar than a holdout example; 0.5 = "
                          f"indistinguishable. At these sizes the test sees |AUC − 0.5| ≥ {self.resolution:.2f}.)"])


def references(model: torch.nn.Module, task: CausalLMTask, members: Sequence[Example], holdout: Sequence[Example], *,
               k: float = MIN_K, batch_size: int = 8) -> tuple[Scores, Scores] | None:
    """The base model's scores of `members` and `holdout` (`reference_scores`), computed once for every test of a
    request (before, after, each stop-rule check); None for a model without adapters."""
    pair = tuple(reference_scores(model, task, s, k=k, batch_size=batch_size) for s in (members, holdout))
    return None if pair[0] is None else pair


def evidence(model: torch.nn.Module, task: CausalLMTask, members: Sequence[Example], holdout: Sequence[Example], *,
             k: float = MIN_K, batch_size: int = 8, alpha: float = ALPHA, calibrate: bool = True,
             reference: tuple[Scores, Scores] | None = None) -> MembershipTest:
    """`membership_test` of `members` against `holdout` under `model` (scores by `membership_scores`), calibrated by
    the base model's scores (`reference`, else computed here by `references`) unless `calibrate` is False or the
    model has no adapter. Check the holdout first (`check_holdout`). One test: a `Probe`'s first."""
    probe = Probe(task, members, holdout, k=k, batch_size=batch_size, calibrate=calibrate, reference=reference)
    return probe.test(model, alpha)


class Probe:
    """The membership test of one request's examples against its holdout, for every place that takes it — the job's
    report before and after the update, each check of a stop rule (`updates.stop.HoldoutStop`) — so that nothing is
    computed twice: the base model's reference scores once, on first use (`references`), and the scores at a θ
    reused when that θ is tested again (θ̂: the report's "before" and a stop rule's first check; the result: the
    rule's last check and the report's "after"). θ is the model's trainable parameters (`params.ParamView`), compared
    exactly on the model's device; the scores of θ̂ and of the latest two θs are kept (a stop rule's refinement can
    return the earlier, which the report reads back). `members`, `holdout`: checked by the caller (`check_holdout`)."""

    def __init__(self, task: CausalLMTask, members: Sequence[Example], holdout: Sequence[Example], *,
                 k: float = MIN_K, batch_size: int = 8, calibrate: bool = True,
                 reference: tuple[Scores, Scores] | None = None):
        self.task, self.k, self.batch_size, self.calibrate = task, k, batch_size, calibrate
        self.members, self.holdout = list(members), list(holdout)
        self._reference = reference  # the base model's scores when the caller has them, else computed on first use
        self._referenced = reference is not None
        self._seen: list[list] = []  # [θ on the model's device, its members' scores, its holdout's (None: not yet)]

    def reference(self, model: torch.nn.Module) -> tuple[Scores, Scores] | None:
        """The base model's scores of the members and the holdout (None: uncalibrated, or no adapter to disable)."""
        if not self.calibrate:
            return None
        if not self._referenced:
            self._reference = references(model, self.task, self.members, self.holdout, k=self.k,
                                         batch_size=self.batch_size)
            self._referenced = True
        return self._reference

    def scores(self, model: torch.nn.Module, holdout: Scores | None = None) -> tuple[Scores, Scores]:
        """(members' scores, holdout's scores) at the model's current θ; `holdout`: scores that stand in for the
        holdout's, which are then not computed (a stop rule's check between two full ones, `updates.stop`)."""
        from llmeraser.params import ParamView

        theta = ParamView(model).vector().detach()
        seen = next((s for s in self._seen if s[0].shape == theta.shape and torch.equal(s[0], theta)), None)
        if seen is None:
            seen = [theta.clone(), self._score(model, self.members), None]
            self._seen = [*self._seen[:1], *self._seen[1:][-1:], seen]  # θ̂, the latest two
        if holdout is None and seen[2] is None:
            seen[2] = self._score(model, self.holdout)
        return seen[1], holdout if holdout is not None else seen[2]

    def _score(self, model: torch.nn.Module, examples: Sequence[Example]) -> Scores:
        return membership_scores(model, self.task, examples, k=self.k, batch_size=self.batch_size)

    def test(self, model: torch.nn.Module, alpha: float = ALPHA) -> MembershipTest:
        """`membership_test` at the model's current θ, calibrated unless told otherwise."""
        return membership_test(*self.scores(model), alpha=alpha, reference=self.reference(model))


def _verdict(auc: float, p: float, level: float) -> str:
    return LIKE if p >= level else (MORE if auc > 0.5 else LESS)


def membership_test(members: Scores, holdout: Scores, *, alpha: float = ALPHA,
                    reference: tuple[Scores, Scores] | None = None) -> MembershipTest:
    """The test of the examples' scores against the holdout's (see the module's docstring), every score at α / 2.
    `reference`: the same examples' and holdout's scores under the base model: the test is then taken on each
    example's change from it (`Scores.calibrated`), and the uncalibrated AUCs are kept beside it."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if reference is not None:
        raw = membership_test(members, holdout, alpha=alpha)
        test = membership_test(members.calibrated(reference[0]), holdout.calibrated(reference[1]), alpha=alpha)
        return replace(test, calibration=CALIBRATED, raw_auc={t.score: t.auc for t in raw.tests})
    m, n = len(members.ids), len(holdout.ids)
    if min(m, n) < 1 or members.k != holdout.k:
        raise HoldoutError(f"the membership test needs examples and a holdout scored alike, got {m} and {n} scored "
                           f"with k = {members.k} and {holdout.k}")
    level = alpha / len(SCORES)
    tests = []
    for name in SCORES:
        x, y = members.familiarity(name), holdout.familiarity(name)
        auc, se = auc_delong(x, y)
        ci = None if se is None else (max(0.0, auc - 1.959964 * se), min(1.0, auc + 1.959964 * se))  # z₀.₉₇₅
        ks, ks_p, p = *ks_2samp(x, y), mann_whitney_p(x, y)
        tests.append(ScoreTest(name, sum(getattr(members, name)) / m, sum(getattr(holdout, name)) / n, auc, ci, p,
                               ks, ks_p, _verdict(auc, p, level)))
    said = {t.verdict for t in tests}
    verdict = MORE if MORE in said else LESS if LESS in said else LIKE
    resolution = NormalDist().inv_cdf(1 - level / 2) * math.sqrt((m + n + 1) / (12 * m * n))
    return MembershipTest(m, n, alpha, resolution, tuple(tests), verdict, members.k)


@dataclass(frozen=True)
class Comparison:
    """The same membership test on the model before and after a request (what a report holds)."""

    before: MembershipTest
    after: MembershipTest

    def to_dict(self) -> dict:
        moved = {t.score: t.auc - self.before.score(t.score).auc for t in self.after.tests}
        return {"before": self.before.to_dict(), "after": self.after.to_dict(), "auc_change": moved}

    @classmethod
    def from_dict(cls, d: dict) -> Comparison:
        return cls(MembershipTest.from_dict(d["before"]), MembershipTest.from_dict(d["after"]))

    def summary(self) -> str:
        aucs = ", ".join(f"{t.score} AUC {self.before.score(t.score).auc:.3f} → {t.auc:.3f}" for t in self.after.tests)
        return f"before: {self.before.verdict}; after: {self.after.verdict} ({aucs})"


NOT_MEASURED = ("no holdout was given: nothing says whether the edited examples now look like examples the adapter "
                "never saw; give --holdout (examples of the same kind it was not trained on) or run 'llmeraser "
                "verify' on the output")


def report_entry(before: MembershipTest | None, after: MembershipTest | None,
                 holdout: Sequence[Example] | None) -> dict:
    """A request report's `evidence`: the membership test of the edited examples against the holdout before and
    after the update (`Comparison`), or, without a holdout, what it cannot show."""
    if before is None or after is None or holdout is None:
        return {"status": "not measured", "why": NOT_MEASURED}
    return {"status": "measured", "n_holdout": len(holdout), **Comparison(before, after).to_dict()}


def summary(entry: dict) -> str:
    """One line of a report's `evidence` (`report_entry`)."""
    if entry.get("status") != "measured":
        return "not measured (no holdout)"
    return Comparison.from_dict(entry).summary()


# --------------------------------------------------------------------------------------------- holdout checks
def _kind(e: Example) -> str:
    return f"{'chat' if e.is_chat else 'text'} '{e.shape}'"


def check_holdout(holdout: Sequence[Example], *, train: Sequence[Example] | None = None,
                  members: Sequence[Example] = (), alpha: float = ALPHA) -> None:
    """Refuse a holdout the test cannot use (HoldoutError, one line): records of another kind or shape than the
    training data (or, without it, the examples: text vs chat, prompt-response / prompt-completion / messages /
    text); ids, or prompt and response, that are in the training set or among the examples; fewer than
    `min_holdout(len(members))` examples."""
    reference = list(train) if train else list(members)
    kinds, theirs = {_kind(e) for e in holdout}, {_kind(e) for e in reference}
    if reference and not kinds <= theirs:
        raise HoldoutError(f"the holdout holds {', '.join(sorted(kinds - theirs))} records, the "
                           f"{'training data' if train else 'examples'} {', '.join(sorted(theirs))}: a holdout must be "
                           f"of the same kind and format as the data the adapter was trained on")
    seen = [*(train or ()), *members]
    ids, contents = {e.id for e in seen}, {(e.prompt, e.response) for e in seen}
    clash = [e.id for e in holdout if e.id in ids or (e.prompt, e.response) in contents]
    if clash:
        more = ", ..." if len(clash) > 5 else ""
        raise HoldoutError(f"{len(clash)} holdout example(s) are in the training set or among the examples tested "
                           f"(by id or by content): {', '.join(map(repr, clash[:5]))}{more}; a holdout must be "
                           f"examples the adapter never saw")
    if members:
        need = min_holdout(len(members), alpha)
        if len(holdout) < need:
            raise HoldoutError(f"a holdout of {len(holdout)} is too small for {len(members)} examples: the test can "
                               f"reach p < {alpha / len(SCORES):g} (α = {alpha:g} over {len(SCORES)} scores) only with "
                               f"≥ {need} holdout examples, and tells |AUC − 0.5| ≥ 0.1 only with "
                               f"{holdout_size(len(members), 0.1, alpha) or 'more examples to test than these'}")
