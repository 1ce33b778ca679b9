"""CausalLMTask: the batched response NLL (logits computed only where a response token is predicted) equals the
textbook definition computed from each example alone with every position's logits. Float64, so 1e-12."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers.modeling_utils
from fixtures.tiny import tiny_llama, tiny_lora, tiny_tokenizer

from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.logits import keeps_rows
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


# ----------------------------------------------------------------------------------- untrusted text, bounded work
def test_max_length_below_two_is_refused_not_unlimited(setup) -> None:
    tok, _, _ = setup
    for n in (0, 1, -5):
        with pytest.raises(ConfigError, match="max_length must be ≥ 2"):
            CausalLMTask(tok, max_length=n)


def _texts(n: int, seed: int) -> list[str]:
    """Texts of a little more than n characters: sentences, one unbroken word, and non-ASCII runs."""
    import random

    from llmeraser.testing import ANIMALS, COLORS

    rng = random.Random(seed)
    words = [*ANIMALS, *COLORS, "likes", "The", "Does", "?", ".", "é", "日本", "🙂", "\n"]
    out = []
    for extra in (1, 7, 60):
        sentence = ""
        while len(sentence) < n + extra:
            sentence += rng.choice(words) + rng.choice([" ", " ", "", ", "])
        out.append(sentence[: n + extra])
    out.append(("redbluegold" * (n // 11 + 2))[: n + 3])  # one pre-token, BPE across the cut
    out.append(("é日🙂" * n)[: n + 2])
    return out


def _chat_tok():
    from llmeraser.testing import chat_records

    return tiny_tokenizer([m["content"] for r in chat_records(40) for m in r["messages"]], vocab_size=400, chat=True)


def _examples(n: int, seed: int) -> list[Example]:
    """Text and chat examples in every shape, with parts just over n characters of content."""
    from llmeraser.data import Message

    long, short = _texts(n, seed), "Does the cat like red?"
    out = []
    for i, text in enumerate(long):
        out += [Example(f"p{i}", text, " Yes"), Example(f"r{i}", short, text), Example(f"b{i}", text, text[::-1]),
                Example(f"c{i}", text, text, shape="prompt-completion"), Example(f"d{i}", "", text, shape="text")]
        system, user, answer = Message("system", "Answer briefly."), Message("user", short), Message("assistant", "No")
        half = Message("user", text[: n // 2])
        out += [Example(f"m{i}", (system, Message("user", text)), (answer,), shape="messages"),
                Example(f"n{i}", (system, user), (Message("assistant", text),), shape="messages"),
                Example(f"o{i}", (Message("system", text), user, answer, half), (Message("assistant", text),),
                        shape="messages"),
                Example(f"q{i}", (half, answer, half), (Message("assistant", text[: n // 2]), user), shape="messages"),
                Example(f"s{i}", (Message("user", text),), (Message("assistant", text),), shape="prompt-completion")]
    return out


@pytest.mark.parametrize("rendering", [
    {}, {"format": "trl"}, {"format": "trl", "truncation": "keep_end"}, {"format": "trl", "assistant_only": True},
    {"format": "trl", "truncation": "keep_end", "completion_only": False}])
def test_cutting_long_text_before_tokenising_keeps_the_same_tokens(rendering) -> None:
    """Texts a little longer than `max_chars` are cut before they are tokenised; the ids and labels are the ones
    the whole text gives."""
    from llmeraser.task import Rendering

    for tok in (tiny_tokenizer(), _chat_tok()):
        for max_length in (3, 24):
            cut = CausalLMTask(tok, max_length=max_length, rendering=Rendering(**rendering))
            whole = CausalLMTask(tok, max_length=max_length, rendering=Rendering(**rendering))
            whole.max_chars = None
            if tok.chat_template is None:
                cut.rendering = whole.rendering = Rendering(**rendering, chat_template=_chat_tok().chat_template)
            for ex in _examples(cut.max_chars, seed=max_length):
                if rendering.get("assistant_only") and not ex.is_chat:
                    continue
                assert cut.encode(ex) == whole.encode(ex), (ex.id, tok.vocab_size, max_length)


class _Spy:
    """Wraps a tokenizer's `_encode_plus` (what `encode`, `__call__` and `apply_chat_template` tokenise through),
    recording the length of every text it is given."""

    def __init__(self, tok):
        seen = self.seen = []

        class Spy(type(tok)):
            def _encode_plus(self, text, *args, **kwargs):
                seen.append(len(text))
                return super()._encode_plus(text, *args, **kwargs)

        tok.__class__ = Spy


def test_megabytes_of_text_are_cut_before_they_are_tokenised() -> None:
    import time

    from llmeraser.data import Message
    from llmeraser.task import Rendering

    big = "The cat likes red. " * 1_100_000  # 20 MB
    chat = (Message("system", big), Message("user", big)), (Message("assistant", big), Message("user", big))
    for rendering in (Rendering(), Rendering(format="trl"), Rendering(format="trl", truncation="keep_end")):
        task = CausalLMTask(_chat_tok(), max_length=32, rendering=rendering)
        spy = _Spy(task.tokenizer)
        start = time.perf_counter()
        for ex in (Example("t", big, big), Example("c", big, big, shape="prompt-completion"),
                   Example("d", "", big, shape="text"), Example("m", *chat, shape="messages")):
            assert len(task.encode(ex)[0]) == 32
        assert time.perf_counter() - start < 10  # in full: ~30 s and gigabytes each
        assert spy.seen and max(spy.seen) <= 2 * task.max_chars + 200, (max(spy.seen), task.max_chars)


def test_a_chat_template_that_never_ends_or_floods_is_stopped(monkeypatch) -> None:
    """A template from a training record is untrusted code: one that loops for hours is stopped at the deadline,
    on the main thread by a timer and elsewhere when it next writes; one that writes gigabytes at the size limit."""
    import threading
    import time

    import llmeraser.task as task_module
    from llmeraser.data import Message
    from llmeraser.task import Rendering

    monkeypatch.setattr(task_module, "TEMPLATE_SECONDS", 0.5)
    ex = Example("c", (Message("user", "hi"),), (Message("assistant", "yes"),), shape="messages")
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{{ inner }}{% endfor %}{% endfor %}"
    errors = []

    def encode(template):
        task = CausalLMTask(_chat_tok(), max_length=32, rendering=Rendering(chat_template=template))
        start = time.perf_counter()
        try:
            task.encode(ex)
        except ConfigError as e:
            errors.append((str(e), time.perf_counter() - start))

    encode(loops.replace("{{ inner }}", ""))  # writes nothing: the timer stops it
    worker = threading.Thread(target=encode, args=(loops.replace("inner", "''"),))
    worker.start()
    worker.join(timeout=30)
    encode("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}")
    assert not worker.is_alive() and len(errors) == 3
    for (message, seconds), what in zip(errors, ["took longer than 0.5 s", "took longer than 0.5 s",
                                                 "rendered more than 1,000,002 characters"], strict=True):
        assert what in message and "training record's rendering.chat_template" in message and seconds < 5
    # an ordinary template is unaffected, and the signal handler is restored
    assert CausalLMTask(_chat_tok(), max_length=32).encode(ex)[0]
    import signal

    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


# ------------------------------------------------------------------ logits_to_keep on every transformers version
class OldIndexing(torch.nn.Module):
    """transformers < 5.21's causal LM head: `lm_head(hidden[:, logits_to_keep, :])`, so a (batch, k) tensor indexes
    one dimension and gives 4-D logits (batch, batch, k, vocab). Records what it was asked for."""

    def __init__(self, model, ignore: bool = False):
        super().__init__()
        self.model, self.ignore, self.asked = model, ignore, []

    def forward(self, input_ids, attention_mask, logits_to_keep=0):
        self.asked.append(logits_to_keep)
        base = self.model.get_base_model()  # the LoRA layers sit inside it
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return SimpleNamespace(logits=base.lm_head(hidden if self.ignore else hidden[:, keep, :]))


@pytest.mark.parametrize("ignore", [False, True], ids=["old-indexing", "ignores-it"])
def test_old_logits_to_keep_indexing_gives_the_definition(setup, ignore) -> None:
    """The old head gets the batch's positions as one sorted 1-D tensor (a 2-D one gives it 4-D logits, which is
    what broke transformers 4.56-5.20), or every position when it ignores `logits_to_keep`; either way each row's
    losses and their gradient equal the definition from each example alone with every position's logits. Float64;
    the two differ only in rounding (the vocabulary projection of other rows, padded attention whose masked weights
    are exactly 0), a few ulps of sums of O(10) terms of magnitude O(10): 1e-12 bounds it, as above."""
    _, task, model = setup
    net = OldIndexing(model, ignore=ignore)
    batch = task.collate(EXAMPLES)
    broken = net(batch["input_ids"], batch["attention_mask"], batch["positions"]).logits  # today's call, old head
    assert broken.ndim == (3 if ignore else 4)
    net.asked.clear()
    losses = per_example_loss(task, net, batch)
    (asked,) = net.asked
    assert asked.ndim == 1 and torch.equal(asked, torch.unique(batch["positions"]))
    expected = torch.stack([reference_loss(model, task, e) for e in EXAMPLES])
    assert torch.allclose(losses, expected, rtol=0, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(losses.sum(), params), torch.autograd.grad(expected.sum(), params),
                    strict=True):
        assert torch.allclose(g, w, rtol=0, atol=1e-12)


def test_rows_kept_per_row_where_transformers_can_else_the_union(setup) -> None:
    """Where the installed transformers slices a 2-D logits_to_keep per row (`slice_logits_to_keep`), the task hands
    the model its (batch, k) positions unchanged, bit for bit today's path; older versions, and models of other
    modules, get the union (`OldIndexing` above)."""
    _, task, model = setup
    per_row = callable(getattr(transformers.modeling_utils, "slice_logits_to_keep", None))
    assert keeps_rows(model) == keeps_rows(model.get_base_model()) == per_row
    assert not keeps_rows(OldIndexing(model))
    batch = task.collate(EXAMPLES)
    if per_row:
        with torch.no_grad():
            direct = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=batch["positions"]).logits
            assert torch.equal(task.forward(model, batch), direct)


def test_logits_of_an_unexpected_shape_are_an_error(setup) -> None:
    _, task, model = setup

    class Truncating(OldIndexing):
        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            return SimpleNamespace(logits=super().forward(input_ids, attention_mask, logits_to_keep).logits[:, :1])

    with pytest.raises(ConfigError, match=r"logits of shape \(3, 1, "):
        task.forward(Truncating(model), task.collate(EXAMPLES))


def test_the_token_count_of_an_older_trainer_includes_a_labelled_first_position(setup) -> None:
    """transformers' Trainer before 5.10.1 divides a token-weighted step by every label of the batch, position 0's
    included (which predicts nothing); `counts_first_label` (set by LLMEraserCallback there) counts it too, so the
    step scale is the Trainer's. A document (`text`, the loss on every token) has a labelled position 0; a
    prompt-completion example (the loss on the completion) does not. Integer counts: exact."""
    from llmeraser.task import Rendering

    tok, _, _ = setup
    doc, pair = Example("d", "", "one two three four", shape="text"), Example("p", "Q: two?", " two")
    counts = {}
    for flag in (None, True):
        task = CausalLMTask(tok, max_length=40, rendering=Rendering(format="trl", normalization="token",
                                                                    counts_first_label=flag))
        labels = {e.id: task.encode(e)[1] for e in (doc, pair)}
        assert labels["d"][0] != IGNORE_INDEX and labels["p"][0] == IGNORE_INDEX
        counts[flag] = [task.loss_tokens(doc), task.loss_tokens(pair)]
        task.calibrate([doc, pair])
        assert task.step_scale([doc, pair]) == task.token_scale / sum(counts[flag])
    assert counts[True] == [counts[None][0] + 1, counts[None][1]]
    assert "counts_first_label" not in Rendering().to_dict()  # records written before it are unchanged
    assert Rendering.from_dict(Rendering(counts_first_label=True).to_dict()).counts_first_label
