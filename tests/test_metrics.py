"""Metrics: ROC-AUC against a brute-force pair count and known values; P(Yes) against a manual softmax on a tiny
float64 Llama; evaluate() against per-example losses."""

from __future__ import annotations

import random

import pytest
import torch
from fixtures.tiny import fact_examples, tiny_llama, tiny_tokenizer

from llmeraser.data import Example
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.metrics import accuracy, evaluate, roc_auc, yes_no_probabilities
from llmeraser.task import CausalLMTask, per_example_loss


def brute_force_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pair_count_with_ties(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 60)
    scores = [rng.randint(0, 4) / 4 for _ in range(n)]  # 5 distinct values: many ties
    labels = [rng.randint(0, 1) for _ in range(n)]
    labels[0], labels[1] = 0, 1
    assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(brute_force_auc(scores, labels))


def test_roc_auc_known_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # the scikit-learn documentation example
    assert roc_auc([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert roc_auc([0.3, 0.2, 0.1], [0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert roc_auc([0.2, 0.5, 0.5], [0, 0, 1]) == 0.75  # one win, one tie


def test_roc_auc_errors():
    with pytest.raises(UserInputError, match="both classes; found 3 positive and 0 negative"):
        roc_auc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(UserInputError, match="3 scores but 2 labels"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(UserInputError, match="0/1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(UserInputError, match="finite"):
        roc_auc([float("nan"), 0.2], [0, 1])


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(torch.tensor([True, False]), [1, 0]) == 1.0
    with pytest.raises(UserInputError, match="2 predictions but 1 labels"):
        accuracy([1, 0], [1])


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), hidden=16, layers=1, seed=0, init_std=0.5)  # large init: P(Yes) far from 0.5
    return model, CausalLMTask(tok, max_length=64), fact_examples(7, seed=3)


def manual_p_yes(model, tok, prompt: str) -> float:
    ids = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    y, n = tok.encode(" Yes", add_special_tokens=False)[0], tok.encode(" No", add_special_tokens=False)[0]
    return (probs[y] / (probs[y] + probs[n])).item()


def test_yes_no_probabilities_match_manual_softmax(setup):
    model, task, examples = setup
    expected = [manual_p_yes(model, task.tokenizer, e.prompt) for e in examples]
    assert len(set(round(p, 6) for p in expected)) > 1  # the model separates the prompts: the test can fail
    for batch_size in (1, 3, 8):  # right padding must not change the prompt-end logits
        got = yes_no_probabilities(model, task, examples, batch_size=batch_size)
        assert got.dtype == torch.float64 and got.shape == (len(examples),)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-10)


def test_yes_no_probabilities_errors_and_mode(setup):
    model, task, examples = setup
    with pytest.raises(ConfigError, match="share their first token"):
        yes_no_probabilities(model, task, examples, yes=" Yes", no=" Yes")
    model.train()
    try:
        yes_no_probabilities(model, task, examples[:2])
        assert model.training  # restored
    finally:
        model.eval()


def near_ties(p: list[float], labels: list[int], tol: float) -> tuple[int, int]:
    """(positive-negative pairs whose scores are within 2·tol, scores within tol of 0.5): if every score moves by at
    most tol, only these pairs can change order and only these examples can cross the 0.5 threshold."""
    pairs = sum(abs(a - b) <= 2 * tol for a, ya in zip(p, labels, strict=True) for b, yb in zip(p, labels, strict=True)
                if ya and not yb)
    return pairs, sum(abs(a - 0.5) <= tol for a in p)


def test_evaluate(setup):
    model, task, examples = setup
    out = evaluate(model, task, examples, batch_size=3)
    with torch.no_grad():
        losses = per_example_loss(task, model, task.collate(examples))
    assert out["n"] == len(examples)
    # float64, other batches and padding: losses of ~10 agree to ~3e-15 (measured); 1e-12 leaves 300x
    assert out["losses"] == pytest.approx({e.id: v for e, v in zip(examples, losses.tolist(), strict=True)},
                                          abs=1e-12)
    assert out["loss"] == pytest.approx(losses.mean().item(), abs=1e-12)
    labels = [int(e.response == " Yes") for e in examples]
    assert 0 < sum(labels) < len(labels)
    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    # AUC and accuracy are discrete in the scores: compare them with those of the very probabilities evaluate
    # returned (same inputs, same function: exact) ...
    mine = list(out["p_yes"].values())
    assert out["auc"] == roc_auc(mine, labels)
    assert out["accuracy"] == accuracy([int(v >= 0.5) for v in mine], labels)
    assert out["yes_ratio"] == sum(labels) / len(labels)
    # ... and those probabilities with an independent computation (other batches: evaluate sorts by length, so the
    # padding differs) to a tolerance: float64 forward passes of the same prompts agree to ~4e-16 (measured)
    tol = 1e-12
    p = yes_no_probabilities(model, task, examples, batch_size=3)
    assert mine == pytest.approx(p.tolist(), abs=tol)
    # Scores within tol of each other order either way (ex4 and ex6 share a prompt: an exact tie that rounding
    # breaks by 1 ulp, differently per CPU), so the independent AUC / accuracy may differ by the near-tied pairs /
    # near-threshold examples only; everything else must agree.
    pairs, at_half = near_ties(p.tolist(), labels, tol)
    assert pairs == 1 and at_half == 0  # the one tie (ex4, ex6): the bound below is not vacuous
    assert abs(out["auc"] - roc_auc(p, labels)) <= pairs / (n_pos * n_neg) + 1e-12
    assert abs(out["accuracy"] - accuracy((p >= 0.5).int(), labels)) <= at_half / len(labels) + 1e-12
    # " Yes" and " No" are single tokens here, so a response loss is −log softmax(z)[answer] and
    # P(Yes)/(P(Yes)+P(No)) = σ(loss(No) − loss(Yes)): ties the probabilities to the losses of the same prompt
    assert len(task.tokenizer.encode(" Yes", add_special_tokens=False)) == 1
    assert len(task.tokenizer.encode(" No", add_special_tokens=False)) == 1
    both = evaluate(model, task, [Example("y", examples[0].prompt, " Yes"), Example("n", examples[0].prompt, " No")])
    margin = torch.tensor(both["losses"]["n"] - both["losses"]["y"], dtype=torch.float64)
    assert torch.sigmoid(margin).item() == pytest.approx(p[0].item(), abs=1e-10)


def test_evaluate_non_binary_and_one_class(setup):
    model, task, examples = setup
    out = evaluate(model, task, [Example("a", "Does the cat like red?", " cat"), *examples[:2]])
    assert "auc" not in out and "accuracy" not in out and len(out["losses"]) == 3
    yes_only = [Example(f"y{i}", e.prompt, " Yes") for i, e in enumerate(examples)]
    out = evaluate(model, task, yes_only)
    assert out["auc"] is None and out["yes_ratio"] == 1.0
    with pytest.raises(ConfigError, match="at least one example"):
        evaluate(model, task, [])


def test_binary_kl():
    import math

    from llmeraser.metrics import binary_kl

    assert binary_kl([0.3, 0.9], [0.3, 0.9]) == 0.0
    by_hand = 0.5 * (0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5))  # second pair identical
    # torch's vectorised log (≤ 1 ulp, kernel chosen per CPU) vs math.log: a few ulps of ~0.4 apart; 1e-14 ≫ that
    assert binary_kl([0.2, 0.7], [0.5, 0.7]) == pytest.approx(by_hand, abs=1e-14)
    assert binary_kl([0.2], [0.5]) != binary_kl([0.5], [0.2])  # not symmetric
    assert math.isfinite(binary_kl([0.0, 1.0], [1.0, 0.0]))  # clipped, not infinite
    with pytest.raises(ConfigError):
        binary_kl([0.1], [0.1, 0.2])
