"""What a model says about question–answer facts, and TOFU's measures of forgetting built on it (docs/people.md).

Per question (an `Example` whose `extra` has `paraphrase` and `perturbed` answers, as `llmeraser_experiments.people`
builds):

- answer probability p = exp(−ℓ), ℓ the mean token NLL of the answer given the question (the length-normalised
  probability P(a|q)^(1/|a|));
- truth ratio R = exp(ℓ_para − mean_j ℓ_pert,j): the geometric mean of the perturbed answers' length-normalised
  probabilities over the paraphrased answer's (TOFU's R_truth, with the geometric mean TOFU's code uses). R < 1: the
  model prefers the true answer;
- ROUGE-L recall of the greedy answer (its first non-empty line) against the trained answer (`rouge-score`,
  stemmed, as TOFU);
- min-k% probability (Shi et al., 2024): the mean of the k% lowest token log-probabilities of the answer.

On sets of questions: forget quality = the p-value of a two-sample Kolmogorov–Smirnov test between a model's and
the retrained model's truth ratios on the forget set (high: indistinguishable); model utility = the harmonic mean of
answer probability, ROUGE-L recall and truth score on the retain set and the general probes (TOFU: truth score
max(0, 1 − R) there; on general probes the probability is normalised over the true and perturbed answers);
membership inference = the ROC AUC of telling forget-set answers (members) from held-out people's (never seen) by
the loss or by min-k% probability (retraining sets the target, ~0.5).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import replace

import torch

from llmeraser.data import Example, Message
from llmeraser.metrics import roc_auc
from llmeraser.task import IGNORE_INDEX, CausalLMTask

MIN_K = 0.2  # the fraction of lowest-probability tokens min-k% averages (Shi et al.'s best setting)


# ------------------------------------------------------------------------------------------ per-example scores
def token_logprobs(model: torch.nn.Module, task: CausalLMTask, examples: Sequence[Example], *,
                   batch_size: int = 16) -> list[list[float]]:
    """log p(token | prefix) of every response token, per example (the task's own encoding and masking)."""
    out: list[list[float]] = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = task.collate(examples[i:i + batch_size])
            logits = task.forward(model, batch).double()
            targets = batch["targets"].to(logits.device)
            valid = targets != IGNORE_INDEX
            logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            out += [row[mask].tolist() for row, mask in zip(logp.cpu(), valid.cpu(), strict=True)]
    return out


def mean_nll(logprobs: Sequence[float]) -> float:
    return -sum(logprobs) / len(logprobs)


def min_k(logprobs: Sequence[float], k: float = MIN_K) -> float:
    """Mean of the max(1, ⌊k·n⌋) lowest token log-probabilities (higher: more likely a training member)."""
    n = max(1, int(k * len(logprobs)))
    return sum(sorted(logprobs)[:n]) / n


def truth_ratio(paraphrase_nll: float, perturbed_nll: Sequence[float]) -> float:
    """exp(ℓ_para − mean ℓ_pert): < 1 when the model prefers the paraphrased true answer."""
    return math.exp(paraphrase_nll - statistics.fmean(perturbed_nll))


def _first_line(text: str) -> str:
    """The answer in a continuation: its first non-empty line (a model may open with a newline), stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _prompt_ids(task: CausalLMTask, prompt: str | Example) -> list[int]:
    """A text prompt as the task encodes prompts; a chat question (an Example) as the tokens before its response
    (the chat template's prompt and generation header: the labels' masked prefix)."""
    if isinstance(prompt, Example):
        ids, labels = task.encode(prompt)
        return ids[:next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(ids))]
    return ([task.bos] if task.bos is not None else []) + list(task.tokenizer.encode(prompt, add_special_tokens=False))


def with_response(q: Example, text: str, suffix: str) -> Example:
    """`q` answered by `text` instead (id + suffix): a paraphrased or perturbed answer, as text or, for a chat
    question, as the assistant's message (stripped, as the chat records are written)."""
    response = (Message("assistant", text.strip()),) if q.is_chat else text
    return replace(q, id=f"{q.id}{suffix}", response=response)


def greedy_answers(model: torch.nn.Module, task: CausalLMTask, prompts: Sequence[str | Example], *,
                   max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """The greedy continuation of each prompt (encoded as the task encodes prompts; a chat question through its
    chat template, `_prompt_ids`): its first non-empty line.

    Prompts are batched by token length (least padding) and left-padded, with the attention mask and positions
    generation derives from it; a row stops once its answer line has ended."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok = task.tokenizer

    class LineEnded(StoppingCriteria):
        def __init__(self, width: int):
            self.width = width

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            texts = tok.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
            return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)

    encoded = [_prompt_ids(task, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    answers = [""] * len(prompts)
    device = next(model.parameters()).device
    with torch.no_grad():
        for j in range(0, len(order), batch_size):
            idx = order[j:j + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.tensor([[task.pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=task.pad, eos_token_id=tok.eos_token_id,
                                 stopping_criteria=StoppingCriteriaList([LineEnded(width)]))
            for i, row in zip(idx, out[:, width:].tolist(), strict=True):
                answers[i] = _first_line(tok.decode(row, skip_special_tokens=True))
    return answers


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(reference: str, prediction: str) -> float:
    """ROUGE-L recall of `prediction` against `reference` (rouge-score, Porter-stemmed, as TOFU computes it)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].recall


def score_questions(model: torch.nn.Module, task: CausalLMTask, questions: Sequence[Example], *,
                    generate: bool = True, batch_size: int = 16) -> dict[str, dict]:
    """Per question id: nll, min_k, prob (of the trained answer), and when the question has them truth_ratio,
    p_options (p / (p + Σ p_perturbed)) and, with `generate`, answer (greedy) and rouge (its ROUGE-L recall)."""
    variants: list[Example] = []
    for q in questions:
        variants.append(q)
        if "paraphrase" in q.extra:
            variants.append(with_response(q, q.extra["paraphrase"], "\x00para"))
            variants += [with_response(q, r, f"\x00pert{j}") for j, r in enumerate(q.extra["perturbed"])]
    logprobs = dict(zip((v.id for v in variants), token_logprobs(model, task, variants, batch_size=batch_size),
                        strict=True))
    out = {}
    for q in questions:
        lp = logprobs[q.id]
        row = {"nll": mean_nll(lp), "min_k": min_k(lp), "prob": math.exp(-mean_nll(lp))}
        if "paraphrase" in q.extra:
            pert = [mean_nll(logprobs[f"{q.id}\x00pert{j}"]) for j in range(len(q.extra["perturbed"]))]
            row["truth_ratio"] = truth_ratio(mean_nll(logprobs[f"{q.id}\x00para"]), pert)
            row["p_options"] = row["prob"] / (row["prob"] + sum(math.exp(-v) for v in pert))
        out[q.id] = row
    if generate:
        answers = greedy_answers(model, task, [q if q.is_chat else q.prompt for q in questions],
                                 max_new_tokens=max(len(task.tokenizer.encode(_text(q), add_special_tokens=False))
                                                    for q in questions) + 8)
        for q, a in zip(questions, answers, strict=True):
            out[q.id].update(answer=a, rouge=rouge_l_recall(_text(q), a))
    return out


def _text(q: Example) -> str:
    """The trained answer as text (a chat question's: its assistant messages' content)."""
    return " ".join(m.content for m in q.response) if q.is_chat else q.response


# --------------------------------------------------------------------------------------------- set measures
def ks_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided two-sample Kolmogorov–Smirnov p-value (scipy's `ks_2samp`, exact for small samples, as TOFU)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(list(a), list(b)).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """0 when any value is 0 (TOFU's model utility)."""
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def summarise(scores: dict[str, dict], ids: Sequence[str], *, truth: str = "retain") -> dict:
    """Means over the questions `ids`: nll, prob, rouge, truth_ratio, and the truth score TOFU uses for the set
    (`retain`/`general`: max(0, 1 − R); `forget`: min(R, 1/R))."""
    rows = [scores[i] for i in ids]
    out = {"n": len(rows), "nll": statistics.fmean(r["nll"] for r in rows),
           "prob": statistics.fmean(r["prob"] for r in rows)}
    if rows and "rouge" in rows[0]:
        out["rouge"] = statistics.fmean(r["rouge"] for r in rows)
    if rows and "truth_ratio" in rows[0]:
        ratios = [r["truth_ratio"] for r in rows]
        out["truth_ratio"] = statistics.fmean(ratios)
        out["truth_score"] = statistics.fmean(min(x, 1 / x) if truth == "forget" else max(0.0, 1 - x) for x in ratios)
        out["p_options"] = statistics.fmean(r["p_options"] for r in rows)
    return out


def model_utility(retain: dict, general: dict) -> float:
    """Harmonic mean of retain (prob, rouge, truth score) and general (option-normalised prob, rouge, truth score)."""
    return harmonic_mean([retain["prob"], retain["rouge"], retain["truth_score"],
                          general["p_options"], general["rouge"], general["truth_score"]])


def mia_auc(scores: dict[str, dict], members: Sequence[str], nonmembers: Sequence[str], key: str) -> float:
    """ROC AUC of telling `members` from `nonmembers` by `key`: "nll" (lower = member) or "min_k" (higher)."""
    sign = -1.0 if key == "nll" else 1.0
    return roc_auc([sign * scores[i][key] for i in (*members, *nonmembers)],
                   [1] * len(members) + [0] * len(nonmembers))
