"""CausalLMTask: the batched response NLL (logits computed only where a response token is predicted) equals the
textbook definition computed from each example alone with every position's logits. Float64, so 1e-12."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny import tiny_llama, tiny_lora, tiny_tokenizer

from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.task import IGNORE_INDEX, CausalLMTask, per_example_loss

EXAMPLES = [  # responses of 1 to many tokens, prompts of different lengths, so rows pad differently
    Example("a", "The capital of France is", " Paris"),
    Example("b", "Q: 2+2?", " A: it is four, of course."),
    Example("c", "A much longer prompt that goes on and on about the weather and more", " Yes"),
]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    return tok, CausalLMTask(tok, max_length=40), tiny_lora(tiny_llama(len(tok), seed=1, init_std=0.3), seed=1)


def reference_loss(model, task: CausalLMTask, example: Example) -> torch.Tensor:
    ids, labels = task.encode(example)
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)  # every position
    terms = [-logp[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    return torch.stack(terms).mean()


class NoLogitsToKeep(torch.nn.Module):
    """A model whose forward has no `logits_to_keep` argument: the task falls back to slicing full logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "fallback"])
def test_batched_loss_and_gradient_match_the_definition(setup, wrap) -> None:
    _, task, model = setup
    net = NoLogitsToKeep(model) if wrap else model
    batch = task.collate(EXAMPLES)
    longest = max(len(task.encode(e)[1]) - task.encode(e)[1].count(IGNORE_INDEX) for e in EXAMPLES)
    assert batch["positions"].shape[1] == longest < batch["input_ids"].shape[1]  # logits only where needed
    losses = per_example_loss(task, net, batch)
    expected = torch.stack([reference_loss(model, task, e) for e in EXAMPLES])
    assert torch.allclose(losses, expected, rtol=0, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(losses.sum(), params)
    want = torch.autograd.grad(expected.sum(), params)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=0, atol=1e-12)


def test_long_prompt_is_cut_from_the_left_and_keeps_the_response(setup) -> None:
    tok, _, _ = setup
    task = CausalLMTask(tok, max_length=8)
    ids, labels = task.encode(EXAMPLES[2])
    assert len(ids) == 8 and ids[-1] == tok.encode(" Yes", add_special_tokens=False)[-1]
    assert labels[0] == IGNORE_INDEX and labels[-1] != IGNORE_INDEX


def test_empty_response_and_tiny_max_length_refused(setup) -> None:
    tok, task, _ = setup
    with pytest.raises(ConfigError, match="no tokens"):
        task.encode(Example("x", "prompt", ""))
    with pytest.raises(ConfigError, match="max_length"):
        CausalLMTask(tok, max_length=1)
