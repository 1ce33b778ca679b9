"""Evaluation metrics: response loss per example, and for yes/no tasks P(Yes), ROC-AUC and accuracy.

For a binary task the score of an example is p = P(Yes) / (P(Yes) + P(No)) = σ(z_Yes − z_No), with z the
logits at the position right after the prompt (the one that predicts the first response token), and " Yes" /
" No" represented by their first tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Sequence

import torch
from tqdm.auto import tqdm

from llmeraser.data import Example
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.task import IGNORE_INDEX, Batch, CausalLMTask

logger = logging.getLogger(__name__)

YES, NO = " Yes", " No"


def _flat(values: Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    return [float(v) for v in values]


def roc_auc(scores: Sequence[float] | torch.Tensor, labels: Sequence[int | bool] | torch.Tensor) -> float:
    """Area under the ROC curve, by the Mann-Whitney statistic with average ranks for ties.

    AUC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻) over all (positive, negative) pairs, computed as
    (R⁺ − n⁺(n⁺+1)/2) / (n⁺ n⁻) with R⁺ the sum of the positives' (average) ranks: O(n log n).

    Args:
        scores: One score per example; higher means more likely positive.
        labels: 1/True for positive, 0/False for negative.

    Returns:
        The AUC in [0, 1].

    Raises:
        UserInputError: If the lengths differ, a label is not 0/1, a score is not finite, or only one class occurs.
    """
    s, y = _flat(scores), _flat(labels)
    if len(s) != len(y):
        raise UserInputError(f"roc_auc: {len(s)} scores but {len(y)} labels")
    if any(v not in (0.0, 1.0) for v in y):
        raise UserInputError(f"roc_auc: labels must be 0/1, found {sorted(set(y) - {0.0, 1.0})[:3]}")
    if any(v != v or v in (float("inf"), float("-inf")) for v in s):
        raise UserInputError("roc_auc: scores must be finite")
    n_pos = int(sum(y))
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UserInputError(f"roc_auc needs both classes; found {n_pos} positive and {n_neg} negative labels")
    order = sorted(range(len(s)), key=s.__getitem__)
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and s[order[j + 1]] == s[order[i]]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # 1-based ranks i+1 .. j+1 share their mean
        rank_sum += avg_rank * sum(y[order[k]] for k in range(i, j + 1))
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def accuracy(pred: Sequence[int | bool] | torch.Tensor, labels: Sequence[int | bool] | torch.Tensor) -> float:
    """The fraction of positions where `pred` equals `labels`.

    Raises:
        UserInputError: If the lengths differ or there are none.
    """
    p, y = _flat(pred), _flat(labels)
    if len(p) != len(y):
        raise UserInputError(f"accuracy: {len(p)} predictions but {len(y)} labels")
    if not p:
        raise UserInputError("accuracy of no examples")
    return sum(a == b for a, b in zip(p, y, strict=True)) / len(p)


def binary_kl(p_ref: Sequence[float] | torch.Tensor, p: Sequence[float] | torch.Tensor) -> float:
    """Mean KL(Bernoulli(p_ref) ‖ Bernoulli(p)) over examples, in nats: how far a model's yes/no answers are from a
    reference model's (e.g. unlearned vs retrained). Probabilities are clipped to [1e-12, 1 − 1e-12]."""
    a = torch.as_tensor(_flat(p_ref), dtype=torch.float64).clamp(1e-12, 1 - 1e-12)  # host: reported numbers
    b = torch.as_tensor(_flat(p), dtype=torch.float64).clamp(1e-12, 1 - 1e-12)  # host: reported numbers
    if a.shape != b.shape or a.numel() == 0:
        raise ConfigError(f"binary_kl needs two equally long, non-empty lists, got {a.numel()} and {b.numel()}")
    return float((a * (a / b).log() + (1 - a) * ((1 - a) / (1 - b)).log()).mean())


def _first_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ConfigError(f"{text!r} encodes to no tokens")
    return ids[0]


def _answer_tokens(task: CausalLMTask, yes: str, no: str) -> tuple[int, int]:
    yes_id, no_id = _first_token(task.tokenizer, yes), _first_token(task.tokenizer, no)
    if yes_id == no_id:
        raise ConfigError(f"{yes!r} and {no!r} share their first token {yes_id}; P(yes) vs P(no) is undefined")
    return yes_id, no_id


def _prompt_end_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Logits (batch, vocab) at the last prompt position, which predicts the first response token.

    `logits` are the task's outputs at `batch["positions"]`, whose first column is each row's prompt end.
    """
    if bool((batch["labels"][:, 0] != IGNORE_INDEX).any()):
        raise ConfigError("an example has no prompt tokens (empty prompt and no BOS): nothing predicts its answer")
    return logits[:, 0]


def _to_device(batch: Batch, model: torch.nn.Module) -> Batch:
    param = next(model.parameters(), None)
    return batch if param is None else {k: v.to(param.device) for k, v in batch.items()}


class _EvalMode:
    """Eval mode and no grad inside; the model's previous mode is restored on exit."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def yes_no_probabilities(model: torch.nn.Module, task: CausalLMTask, examples: Sequence[Example], *,
                         yes: str = YES, no: str = NO, batch_size: int = 8) -> torch.Tensor:
    """P(yes) / (P(yes) + P(no)) after each example's prompt, comparing the first tokens of `yes` and `no`.

    The examples' responses are ignored (each is encoded with response `yes`, so the prompt is truncated exactly
    as in training on a yes/no answer).

    Args:
        model: A causal LM (run in eval mode, without grad; its mode is restored).
        task: The task whose tokenizer and encoding are used.
        examples: The examples.
        yes: The positive answer; its first token is compared.
        no: The negative answer.
        batch_size: Examples per forward pass.

    Returns:
        Float64 tensor (len(examples),) of probabilities σ(z_yes − z_no).

    Raises:
        ConfigError: If `yes` and `no` share their first token, or batch_size < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    yes_id, no_id = _answer_tokens(task, yes, no)
    probs = []
    with _EvalMode(model):
        for start in range(0, len(examples), batch_size):
            chunk = [Example(e.id, e.prompt, yes) for e in examples[start : start + batch_size]]
            batch = _to_device(task.collate(chunk), model)
            z = _prompt_end_logits(task.forward(model, batch), batch).double()  # (batch, vocab)
            probs.append(torch.sigmoid(z[:, yes_id] - z[:, no_id]))  # kept where computed: one transfer at the end
    return torch.cat(probs).cpu() if probs else torch.zeros(0, dtype=torch.float64)  # host: an empty result


def evaluate(model: torch.nn.Module, task: CausalLMTask, examples: Sequence[Example], *, batch_size: int = 8,
             yes: str = YES, no: str = NO, progress: bool = False, adapters: Sequence[Hashable] | None = None,
             activate: Callable[[Hashable], contextlib.AbstractContextManager] | None = None,
             each_batch: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None) -> dict:
    """Response loss of each example and, for a yes/no task, AUC and accuracy.

    Args:
        model: A causal LM (run in eval mode, without grad; its mode is restored).
        task: The task (loss and encoding).
        examples: The examples (at least one).
        batch_size: Examples per forward pass.
        yes: The positive answer.
        no: The negative answer.
        adapters: with a peft model holding several named adapters (a sharded adapter's shards), what answers each
            example: an adapter's name (its router's choice), made active for its examples in turn; or any setting
            `activate` puts in place for them (`serving.mixture`: the shards weighted).
        activate: setting → a context manager within which the model answers as that setting says (default: the
            named adapter made active).
        each_batch: rows → a context manager around the forward pass of each batch, `rows` the indices (into
            `examples`, on the model's device) of its rows in order: a setting per row within one batch
            (`serving.row_mixture`: each query its own shard weights).

    Returns:
        ``{"n", "loss" (mean response NLL), "losses" ({id: loss})}``; when every response is `yes` or `no`, also
        ``"p_yes"`` ({id: P(yes)}), ``"yes_ratio"``, ``"accuracy"`` (P(yes) normalised against P(no), threshold
        0.5) and ``"auc"``
        (None when only one class occurs). One forward pass per batch serves both.

    Raises:
        ConfigError: If there are no examples, batch_size < 1, or (for a yes/no task) yes and no share a first token.
    """
    if not examples:
        raise ConfigError("evaluate needs at least one example")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    binary = all(e.response in (yes, no) for e in examples)
    yes_id, no_id = _answer_tokens(task, yes, no) if binary else (0, 0)
    if adapters is not None and len(adapters) != len(examples):
        raise ConfigError(f"{len(adapters)} adapter names for {len(examples)} examples")
    groups: dict[Hashable, list[int]] = {}
    for i in range(len(examples)):
        groups.setdefault(None if adapters is None else adapters[i], []).append(i)
    device = next(model.parameters()).device  # results stay with the model until one transfer at the end
    loss = torch.zeros(len(examples), dtype=torch.float64, device=device)
    p = torch.zeros(len(examples), dtype=torch.float64, device=device)
    bar = tqdm(total=len(examples), desc="evaluate", disable=not progress, leave=False)
    with _EvalMode(model):
        for name, members in groups.items():
            with contextlib.nullcontext() if name is None else (activate or _named(model))(name):
                _evaluate_group(model, task, examples, members, batch_size, binary, (yes_id, no_id), loss, p, bar,
                                each_batch)
    bar.close()
    return summarize(examples, loss.cpu(), p.cpu() if binary else None, yes)


def summarize(examples: Sequence[Example], loss: torch.Tensor, p: torch.Tensor | None, yes: str = YES) -> dict:
    """`evaluate`'s result from each example's response loss and, for a yes/no task, its P(yes) (`p`, None
    otherwise), both (n,) on the host in the examples' order."""
    out: dict = {"n": len(examples), "loss": loss.mean().item(),
                 "losses": {e.id: v for e, v in zip(examples, loss.tolist(), strict=True)}}
    if p is not None:
        labels = [int(e.response == yes) for e in examples]
        out["p_yes"] = {e.id: v for e, v in zip(examples, p.tolist(), strict=True)}
        out["yes_ratio"] = sum(labels) / len(labels)
        out["accuracy"] = accuracy((p >= 0.5).int(), labels)
        if 0 < sum(labels) < len(labels):
            out["auc"] = roc_auc(p, labels)
        else:
            logger.warning("all %d responses are %r: AUC is undefined", len(labels), examples[0].response)
            out["auc"] = None
    return out


def _named(model: torch.nn.Module) -> Callable[[str], contextlib.AbstractContextManager]:
    """The default `activate`: the named adapter made active (left so afterwards)."""
    def activate(name: str) -> contextlib.AbstractContextManager:
        model.set_adapter(name)
        return contextlib.nullcontext()

    return activate


def _evaluate_group(model, task: CausalLMTask, examples: Sequence[Example], members: list[int], batch_size: int,
                    binary: bool, answers: tuple[int, int], loss: torch.Tensor, p: torch.Tensor, bar,
                    each_batch: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None) -> None:
    """`evaluate`'s forward passes over `members`, written into `loss` and `p` (on the model's device)."""
    device, (yes_id, no_id) = loss.device, answers
    # Batches of similar length waste less compute on padding; results go back to the examples' order.
    order = sorted(members, key=lambda i: len(task.encode(examples[i])[0]))
    for start in range(0, len(order), batch_size):
        idx = torch.tensor(order[start : start + batch_size], device=device)
        batch = _to_device(task.collate([examples[i] for i in order[start : start + batch_size]]), model)
        with contextlib.nullcontext() if each_batch is None else each_batch(idx):
            logits = task.forward(model, batch)  # (batch, k, vocab)
        loss[idx] = task.loss(logits, batch).double().to(device)
        if binary:  # the prompt ends at the same position whatever the answer
            z = _prompt_end_logits(logits, batch).double()
            p[idx] = torch.sigmoid(z[:, yes_id] - z[:, no_id]).to(device)
        bar.update(len(idx))
