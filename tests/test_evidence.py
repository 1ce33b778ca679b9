"""Evidence (llmeraser.evidence): membership scores against a token-by-token reference, the two-sample statistics
against scipy and brute force, the verdict on cases whose answer is known, the holdout checks, `llmeraser verify`."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from fixtures.tiny import tiny_lora_lm

from llmeraser import evidence as ev
from llmeraser.data import Example
from llmeraser.task import IGNORE_INDEX


def reference_scores(model, task, example: Example, k: float) -> tuple[float, float]:
    """(mean response NLL, Min-K%++) of one example, one full forward per response token on its prefix alone (no
    batch, no padding, no position selection), the vocabulary statistics summed in float64 from the definitions."""
    ids, labels = task.encode(example)
    logps, zs = [], []
    with torch.no_grad():
        for t in range(1, len(ids)):
            if labels[t] == IGNORE_INDEX:
                continue
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            logp = torch.log_softmax(logits, -1)
            p = logp.exp()
            mu = float((p * logp).sum())
            sigma = math.sqrt(float((p * (logp - mu) ** 2).sum()))
            logps.append(float(logp[ids[t]]))
            zs.append((logps[-1] - mu) / sigma)
    m = max(1, int(k * len(zs)))
    return -sum(logps) / len(logps), sum(sorted(zs)[:m]) / m


@pytest.fixture(scope="module")
def lm():
    return tiny_lora_lm(n=10, seed=3)


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_scores_match_the_token_by_token_reference(lm, k):
    """Each example's scores equal the reference to 1e-10: the model is float64 and the two differ only in summation
    order (a batched, padded forward with selected positions against one forward per prefix), so they agree to a
    few hundred ε of the values involved (|log p| < 10, the vocabulary 300)."""
    model, task, examples = lm
    examples = [*examples, Example("long", "Does the fox like red? Does the owl like", " gold? The cat likes blue.")]
    scores = ev.membership_scores(model, task, examples, k=k, batch_size=4)
    assert scores.ids == tuple(e.id for e in examples)
    for i, e in enumerate(examples):
        loss, mink = reference_scores(model, task, e, k)
        assert abs(scores.loss[i] - loss) <= 1e-10 and abs(scores.min_k_pp[i] - mink) <= 1e-10, e.id


def test_scores_do_not_depend_on_batching_or_padding(lm):
    """Batch sizes 1, 3 and all, and the examples' order, give the same scores to 1e-12 (float64: padding only adds
    masked keys, whose weights are exactly 0; the batched products sum in another order, ~ε relative)."""
    model, task, examples = lm
    examples = [*examples, Example("long", "Does the fox like red? Does the owl like", " gold? The cat likes blue.")]
    one = ev.membership_scores(model, task, examples, batch_size=1)
    for batch_size in (3, len(examples)):
        other = ev.membership_scores(model, task, examples, batch_size=batch_size)
        for a, b in ((one.loss, other.loss), (one.min_k_pp, other.min_k_pp)):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-12
    rev = ev.membership_scores(model, task, examples[::-1], batch_size=4)
    assert rev.ids == one.ids[::-1]
    assert max(abs(x - y) for x, y in zip(rev.loss[::-1], one.loss, strict=True)) <= 1e-12


def test_loss_is_the_tasks_example_mean(lm):
    """The loss score is the task's own per-example loss (example normalization), to 1e-12."""
    model, task, examples = lm
    batch = task.collate(examples)
    with torch.no_grad():
        expected = task.loss(task.forward(model, batch), batch).tolist()
    got = ev.membership_scores(model, task, examples).loss
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-12


def test_min_k_pp_floor_on_a_uniform_distribution():
    """A uniform next-token distribution has σ = 0: z is exactly 0 there (σ within rounding is taken as flat)."""
    logits = torch.zeros(1, 2, 5, dtype=torch.float64)
    tok, mu, sigma = ev.token_statistics(logits, torch.tensor([[1, 3]]))
    z = (tok - mu) / sigma
    assert (z == 0).all()


def test_scores_bad_input(lm):
    model, task, examples = lm
    for kwargs, expect in (({"k": 0}, "must be in (0, 1]"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ev.ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            ev.membership_scores(model, task, examples, **kwargs)
    with pytest.raises(ev.ConfigError, match="at least one example"):
        ev.membership_scores(model, task, [])
