"""Tasks: how a model scores a batch of examples, one loss per example.

A task splits the per-example loss into `forward` (model → outputs) and `loss` (outputs → per-example losses)
so that curvature code can form Gauss-Newton products J'ᵀ H_out J', with H_out the Hessian of the loss in the
outputs. Any torch model with its own loss plugs in by implementing the three methods of `Task`; the
trainable parameters (LoRA, `modules_to_save`, a projector, a classifier head) are whatever has requires_grad.

The default, `CausalLMTask`, is the response negative log-likelihood of docs/math.md#the-objective:
ℓ(z; θ) = −(1/|r|) Σ_{t ∈ response} log p_θ(z_t | z_<t), prompt tokens masked with -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from llmeraser.data import Example
from llmeraser.errors import ConfigError

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100


@runtime_checkable
class Task(Protocol):
    """Per-example losses of a model. Implement these three methods for a custom model or loss."""

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Turn examples into a batch of tensors (deterministic: the same examples give the same batch)."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Model outputs for the batch, e.g. logits (batch, seq, vocab)."""

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-example losses (batch,) from the outputs; must be twice differentiable in `outputs`."""

    # Optional, for fitted curvature (`llmeraser.factors`, fisher="mc"):
    # def fisher_loss(self, outputs, batch, generators) -> torch.Tensor:
    #     """Per-example pseudo-losses (batch,) whose gradient s in the outputs has E[s sᵀ] = ∇²_out ℓ (the output
    #     Hessian of example i's loss), e.g. the loss at targets sampled from the model's own prediction; row i
    #     draws from generators[i] (one per example, so the draws do not depend on the batching)."""


def per_example_loss(task: Task, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """ℓ(zᵢ; θ) for each example of the batch, shape (batch,)."""
    return task.loss(task.forward(model, batch), batch)


class CausalLMTask:
    """Response NLL of a causal LM: the loss is the mean token NLL over the response tokens only.

    Text is `prompt + response`, each encoded without special tokens (a BOS token is prepended when the
    tokenizer has one and `add_bos` is set). When too long, the prompt is cut from the left so the response and
    the end of the prompt survive; a response longer than `max_length - 1` tokens is cut at the right.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: maximum tokens per example.
        add_bos: prepend tokenizer.bos_token_id when there is one.
    """

    def __init__(self, tokenizer: Any, max_length: int = 64, add_bos: bool = True):
        if max_length < 2:
            raise ConfigError(f"max_length must be ≥ 2 (one prompt and one response token), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos = tokenizer.bos_token_id if add_bos else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else pad

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one example; labels are -100 on the prompt."""
        prompt = list(self.tokenizer.encode(example.prompt, add_special_tokens=False))
        if self.bos is not None:
            prompt = [self.bos, *prompt]
        response = list(self.tokenizer.encode(example.response, add_special_tokens=False))
        if not response:
            raise ConfigError(f"example {example.id!r}: the response encodes to no tokens; nothing to learn")
        response = response[: self.max_length - 1]
        prompt = prompt[-(self.max_length - len(response)) :] if prompt else prompt
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response

    def collate(self, examples: Sequence[Example]) -> Batch:
        encoded = [self.encode(e) for e in examples]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)  # (batch, seq), right-padded
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        # Only positions that predict a response token need logits: the vocabulary projection is ~20% of a small
        # LM's work, so `forward` asks the model for these alone. Row i keeps its k_i positions t (t predicts token
        # t+1) in order, padded to k = max k_i with position 0 and target -100.
        wanted = [torch.nonzero(row[1:] != IGNORE_INDEX).flatten() for row in labels]
        k = max(len(w) for w in wanted)
        positions = torch.zeros((len(encoded), k), dtype=torch.long)
        targets = torch.full((len(encoded), k), IGNORE_INDEX, dtype=torch.long)
        for i, w in enumerate(wanted):
            positions[i, : len(w)] = w
            targets[i, : len(w)] = labels[i, w + 1]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "positions": positions,
                "targets": targets}

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Logits (batch, k, vocab) at `batch["positions"]`, the positions that predict response tokens."""
        device = next(model.parameters()).device  # a GPU rank's model (the batch is built on the CPU)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        positions = batch["positions"].to(device)
        try:
            return model(**inputs, logits_to_keep=positions).logits
        except TypeError:  # a model without `logits_to_keep`: project every position, keep the ones needed
            return torch.take_along_dim(model(**inputs).logits, positions[..., None], dim=1)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        targets = batch["targets"].to(outputs.device)  # (batch, k): the token each kept position predicts, or -100
        nll = F.cross_entropy(outputs.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        count = (targets != IGNORE_INDEX).sum(1).clamp(min=1)
        return nll.sum(1) / count  # (batch,)

    def fisher_loss(self, outputs: torch.Tensor, batch: Batch, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """(1/√k) Σₜ CE(oₜ, ỹₜ) per example, with ỹₜ ~ softmax(oₜ) at each of its k response positions, drawn from
        the example's own generator (`generators[i]` for row i).

        Its gradient sₜ = (p − e_ỹₜ)/√k in the logits has E[sₜ sₜᵀ] = (diag p − p pᵀ)/k, the output Hessian of the
        mean response NLL, and E[sₜ sᵤᵀ] = 0 for t ≠ u (independent draws, each of mean zero): so the Fisher built
        from these gradients is the Gauss-Newton matrix in expectation (the "true" Fisher, not the empirical one).
        """
        targets = batch["targets"].to(outputs.device)
        if len(generators) != targets.shape[0]:
            raise ConfigError(f"fisher_loss: {targets.shape[0]} examples but {len(generators)} generators")
        valid = targets != IGNORE_INDEX
        probs = torch.softmax(outputs.detach().double(), dim=-1).cpu()  # (batch, k, vocab)
        draws = torch.stack([torch.multinomial(p, 1, generator=g).squeeze(1) for p, g in zip(probs, generators,
                                                                                             strict=True)])
        draws = draws.to(targets.device)
        sampled = torch.where(valid, draws, torch.full_like(targets, IGNORE_INDEX))
        nll = F.cross_entropy(outputs.transpose(1, 2), sampled, ignore_index=IGNORE_INDEX, reduction="none")
        return nll.sum(1) / valid.sum(1).clamp(min=1).to(nll.dtype).sqrt()
