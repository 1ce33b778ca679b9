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

`check_holdout` refuses a holdout the test cannot use: another format than the training data, ids (or contents) that
are in the training set, or fewer examples than `min_holdout`: the smallest holdout for which the test can reach
p < α / (number of scores) at all, i.e. when the sets are perfectly separated, where both the exact Mann–Whitney and
the exact KS p-value are 2 / C(m + n, m). `holdout_size` gives the holdout a chosen resolution needs.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from statistics import NormalDist

import torch

from llmeraser.data import Example
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.task import IGNORE_INDEX, CausalLMTask

MIN_K = 0.2  # Min-K%++'s fraction of lowest token scores (Zhang et al.'s default)
ALPHA = 0.05
SCORES = ("loss", "min_k_pp")
SIGN = {"loss": -1.0, "min_k_pp": 1.0}  # the orientation that makes higher = more familiar
LIKE = "looks like the holdout"
MORE = "more familiar than the holdout (not forgotten)"
LESS = "less familiar than the holdout (over-forgotten)"
EXACT_MW = 2_000_000  # min(m, n)·m·n up to which the Mann–Whitney null is counted exactly (≈ 1 s in Python)
EXACT_KS = 250_000  # m·n up to which the KS p-value counts lattice paths exactly
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
        p = logp.exp()
        m = (p * logp).sum(-1)
        var.append((p * (logp - m[..., None]).square()).sum(-1).double())
        tok.append(logp.gather(-1, targets[:, s : s + step].clamp(min=0)[..., None]).squeeze(-1).double())
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
