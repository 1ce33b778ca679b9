"""Tasks: how a model scores a batch of examples, one loss per example.

A task splits the per-example loss into `forward` (model → outputs) and `loss` (outputs → losses) so that curvature
code can form Gauss-Newton products J'ᵀ H_out J' (H_out the loss's Hessian in the outputs). Any torch model plugs in by
implementing `Task`'s three methods; the trainable parameters are whatever has requires_grad.

The default, `CausalLMTask`, is the response negative log-likelihood of docs/math.md#the-objective:
ℓ(z; θ) = −(1/|r|) Σ_{t ∈ response} log p_θ(z_t | z_<t), prompt masked (-100); `token_nll` / `reduce` split it
per token. How an example becomes tokens, which carry the loss and how they are averaged is its `Rendering`
(llmeraser's own, or TRL's `SFTTrainer`'s: chat templates, completion-only masks, the token mean; docs/data.md).
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from llmeraser.data import Example, Message
from llmeraser.errors import ConfigError
from llmeraser.logits import logits_at

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100
FORMATS = ("llmeraser", "trl")
NORMALIZATIONS = ("example", "token")
TRUNCATIONS = ("keep_start", "keep_end")
TEMPLATE_SECONDS = 5.0  # the longest a chat template may take to render one example
TEMPLATE_MARKUP = 1_000_000  # characters a chat template may add to the messages' contents when rendering them


@dataclass(frozen=True)
class Rendering:
    """How examples become token ids and labels, and how per-token losses are averaged (a training record's part).

    - format `llmeraser` (what `llmeraser finetune` trains): text is BOS + prompt + response, no EOS; a chat is
      rendered with the chat template, the prompt with the generation prompt; the loss is on the response (the final
      assistant message); when too long, the prompt is cut from the left.
    - format `trl` (what TRL's SFTTrainer trains): text records are tokenised as `tokenizer(prompt + completion +
      EOS)`, chats with the chat template; prompt-completion records carry the loss on the completion when
      `completion_only` (TRL's default), `messages` records on every token unless `assistant_only` (the template's
      `{% generation %}` marks), a `text` record (a document) on every token; sequences are cut to max_length by
      `truncation`.
    - normalization `example`: each example's loss is its mean token NLL, and R averages examples; `token` (TRL,
      transformers' Trainer): R = Σ token NLL / Σ tokens, i.e. ℓ(z) = Σ_t NLL / t̄, with t̄ the mean number of loss
      tokens per example of the training set (`CausalLMTask.calibrate`), kept fixed when examples are edited.
    - counts_first_label: the token count of `token` includes position 0 when it carries a label (no loss is taken
      there): transformers' Trainer before 5.10.1 counts every label (`LLMEraserCallback` sets it), later ones the
      shifted labels the loss sums.
    """

    format: str = "llmeraser"
    completion_only: bool = True
    assistant_only: bool = False
    normalization: str = "example"
    truncation: str = "keep_start"
    chat_template: str | None = None
    eos_token: str | None = None
    counts_first_label: bool | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("format", FORMATS), ("normalization", NORMALIZATIONS), ("truncation", TRUNCATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> Rendering:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share (where a completion starts: a chat template may render the prompt
    alone differently from the prompt followed by a completion)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
    #     draws from generators[i] (one per example, on the outputs' device, so the draws do not depend on the
    #     batching)."""


def per_example_loss(task: Task, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """ℓ(zᵢ; θ) for each example of the batch, shape (batch,)."""
    return task.loss(task.forward(model, batch), batch)


class CausalLMTask:
    """Response NLL of a causal LM, examples rendered as `rendering` says (default: llmeraser's own).

    llmeraser's text is `prompt + response`, each encoded without special tokens (a BOS token is prepended when the
    tokenizer has one and `add_bos` is set). When too long, the prompt is cut from the left so the response and
    the end of the prompt survive; a response longer than `max_length - 1` tokens is cut at the right. Text beyond
    `max_chars` characters is cut before it is tokenised, and chat templates render under a time and a size limit
    (`TEMPLATE_SECONDS`, `TEMPLATE_MARKUP`): examples, requests and training records are untrusted input.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: maximum tokens per example.
        add_bos: prepend tokenizer.bos_token_id when there is one (llmeraser text).
        rendering: how examples become tokens and how losses are averaged (`Rendering`).
    """

    def __init__(self, tokenizer: Any, max_length: int = 64, add_bos: bool = True,
                 rendering: Rendering | None = None):
        if max_length < 2:
            raise ConfigError(f"max_length must be ≥ 2 (one prompt and one response token), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.rendering = rendering or Rendering()
        self.bos = tokenizer.bos_token_id if add_bos else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else pad
        self.token_scale: float | None = None  # t̄ of the token-weighted mean (`calibrate`)
        self._tokens: dict[Example, int] = {}  # loss tokens per example, counted once (every step needs them)

    @functools.cached_property
    def max_chars(self) -> int | None:
        """How many characters of a text can matter: twice the vocabulary's longest token (in characters) times
        max_length, plus a margin. A text longer than this is cut, at the end whose tokens are not kept, before it is
        tokenised (untrusted text can be megabytes, and tokenising it whole costs seconds and gigabytes to keep a few
        tokens). A token covers at most `longest` characters, so what is left holds at least 2 · max_length tokens
        and the cut lies at least max_length tokens beyond any token kept: those come out the same as without it.
        None (no cut) when the tokenizer lists no vocabulary."""
        try:
            longest = max(map(len, self.tokenizer.get_vocab()), default=1)
        except (AttributeError, NotImplementedError, TypeError):
            return None
        return 2 * longest * self.max_length + 1024

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one example; labels are -100 where no loss is taken."""
        if self.rendering.format == "trl":
            return self._encode_trl(example)
        n = self.max_chars  # the prompt keeps its end, the response its start
        if example.is_chat:
            before = _cut_messages(example.prompt, n, keep_end=True)
            prompt_ids = self._chat(before, add_generation_prompt=True)["input_ids"] if before else []
            ids = self._chat((*before, *_cut_messages(example.response, n, keep_end=False)))["input_ids"]
            k = common_prefix(prompt_ids, ids)
            prompt, response = ids[:k], ids[k:]
        else:
            prompt = list(self.tokenizer.encode(_tail(example.prompt, n), add_special_tokens=False))
            if self.bos is not None:
                prompt = [self.bos, *prompt]
            response = list(self.tokenizer.encode(_head(example.response, n), add_special_tokens=False))
        if not response:
            raise ConfigError(f"example {example.id!r}: the response encodes to no tokens; nothing to learn")
        response = response[: self.max_length - 1]
        prompt = prompt[-(self.max_length - len(response)) :] if prompt else prompt
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response

    def _chat(self, messages: Sequence[Message], **kwargs) -> dict:
        """The chat template applied to messages, tokenised (TRL's call: no extra special tokens). A template can come
        from a training record, so it is rendered first on its own under a time limit and a size limit
        (`_render_checked`), then by the tokenizer under the same time limit."""
        template = self.rendering.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ConfigError("chat examples need a chat template, and the tokenizer has none (set "
                              "tokenizer.chat_template, or give the template in the training record)")
        source = ("the training record's rendering.chat_template" if self.rendering.chat_template
                  else "the tokenizer's chat template")
        chat = [m.to_dict() for m in messages]
        limit = TEMPLATE_MARKUP + sum(len(m.content) for m in messages)
        variables = {**getattr(self.tokenizer, "special_tokens_map", {}),  # what apply_chat_template passes
                     "add_generation_prompt": bool(kwargs.get("add_generation_prompt"))}
        from transformers.utils.chat_template_utils import _compile_jinja_template  # its sandbox, compiled once

        try:
            with _deadline(TEMPLATE_SECONDS) as end:
                _render_checked(_compile_jinja_template(template), chat, limit, end, source, **variables)
                out = self.tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                                         chat_template=template, **kwargs)
        except _Timeout:
            raise ConfigError(f"the chat template took longer than {TEMPLATE_SECONDS:g} s to render one example "
                              f"({source}); does it loop without end?") from None
        except ConfigError:
            raise
        except Exception as e:  # jinja2 raises its own errors on a template that does not fit the messages
            raise ConfigError(f"the chat template failed on these messages: {str(e).splitlines()[0]}") from e
        ids = out["input_ids"]
        return {**out, "input_ids": list(ids[0] if ids and isinstance(ids[0], list) else ids)}

    def _encode_trl(self, example: Example) -> tuple[list[int], list[int]]:
        """TRL SFTTrainer's tokenisation and masking (trl 1.16 `SFTTrainer._prepare_dataset`). Texts are cut to
        `max_chars` at the end `truncation` drops."""
        r = self.rendering
        keep_end = r.truncation == "keep_end"
        cut = functools.partial(_tail if keep_end else _head, n=self.max_chars)
        if example.is_chat:
            chat = _cut_messages((*example.prompt, *example.response), self.max_chars, keep_end=keep_end)
            before = chat[: len(example.prompt)]
            out = self._chat(chat, return_assistant_tokens_mask=r.assistant_only)
            ids = out["input_ids"]
            keep = [1] * len(ids)
            if r.assistant_only:
                keep = list(out.get("assistant_masks") or [])
                if 1 not in keep:
                    raise ConfigError(f"example {example.id!r}: assistant_only loss, but the chat template marks no "
                                      f"assistant tokens (it needs {{% generation %}} blocks)")
            if example.shape != "messages" and r.completion_only:
                prompt = self._chat(before, add_generation_prompt=True)["input_ids"] if before else []
                k = common_prefix(prompt, ids)
                keep = [0] * k + keep[k:]
        elif example.shape == "text":  # language modelling: the document and EOS, the loss on every token
            eos = r.eos_token if r.eos_token is not None else (self.tokenizer.eos_token or "")
            text = example.response if example.response.endswith(eos) else example.response + eos
            ids = list(self.tokenizer(text=cut(text))["input_ids"])
            keep = [1] * len(ids)
        else:
            eos = r.eos_token if r.eos_token is not None else (self.tokenizer.eos_token or "")
            completion = cut(example.response if example.response.endswith(eos) else example.response + eos)
            prompt_text = cut(example.prompt)
            prompt = list(self.tokenizer(text=prompt_text)["input_ids"])
            ids = list(self.tokenizer(text=prompt_text + completion)["input_ids"])
            k = common_prefix(prompt, ids) if r.completion_only else 0
            keep = [0] * k + [1] * (len(ids) - k)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, keep, strict=True)]
        kept = slice(-self.max_length, None) if keep_end else slice(None, self.max_length)
        return ids[kept], labels[kept]

    def mean_tokens(self, examples: Sequence[Example], sample: int = 64) -> float:
        """The mean number of tokens of an example, over up to `sample` examples spread through `examples` (what a
        forward pass costs, for `eraser.choose_solver`'s estimate)."""
        picked = list(examples[:: max(len(examples) // sample, 1)])[:sample]
        return sum(len(self.encode(e)[0]) for e in picked) / max(len(picked), 1)

    def calibrate(self, examples: Sequence[Example]) -> float:
        """Set t̄, the mean number of loss tokens per example of `examples` (the training set), for the
        token-weighted mean; returns it. A no-op under normalization 'example' (returns 1)."""
        if self.rendering.normalization != "token":
            return 1.0
        counts = [self.loss_tokens(e) for e in examples]
        self.token_scale = max(sum(counts) / max(len(counts), 1), 1e-12)
        return self.token_scale

    def loss_tokens(self, example: Example) -> int:
        """How many of the example's tokens carry the loss (the targets `collate` keeps), tokenised once; position 0's
        label too where the Trainer counts it (`Rendering.counts_first_label`)."""
        if example not in self._tokens:
            first = 0 if self.rendering.counts_first_label else 1
            self._tokens[example] = sum(t != IGNORE_INDEX for t in self.encode(example)[1][first:])
        return self._tokens[example]

    def step_scale(self, examples: Sequence[Example]) -> float | None:
        """The factor c of a training step's gradient c · Σᵢ ∇ℓᵢ over its examples under the token-weighted mean:
        t̄ / (the batch's loss tokens), so the step's loss is Σ token NLL / Σ tokens as the Trainer forms it; None under
        the example mean (the batch mean, 1/|B|)."""
        if self.rendering.normalization != "token":
            return None
        if self.token_scale is None:
            raise ConfigError("a token-normalised task needs calibrate(training set) before it computes losses")
        return self.token_scale / max(sum(self.loss_tokens(e) for e in examples), 1)

    def _divisor(self, valid: torch.Tensor) -> torch.Tensor:
        """Per example: its number of loss tokens (example mean) or t̄ (token-weighted mean)."""
        if self.rendering.normalization == "example":
            return valid.sum(1).clamp(min=1)
        if self.token_scale is None:
            raise ConfigError("a token-normalised task needs calibrate(training set) before it computes losses")
        return torch.full((valid.shape[0],), self.token_scale, dtype=torch.float64, device=valid.device)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """The batch, built on the host from token lists (small integer tensors; `forward` moves it to the model's
        device once, with the positions the vocabulary projection needs worked out here, so the device never waits)."""
        encoded = [self.encode(e) for e in examples]
        width = max(len(ids) for ids, _ in encoded)
        # host: the batch is built here and moved once by forward (every factory below)
        input_ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)  # (batch, seq), right-padded
        # host: as above
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)  # host: as above
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)  # host: as above
            labels[i, : len(lab)] = torch.tensor(lab)  # host: as above
            mask[i, : len(ids)] = 1
        # Only positions that predict a response token need logits: the vocabulary projection is ~20% of a small
        # LM's work, so `forward` asks the model for these alone. Row i keeps its k_i positions t (t predicts token
        # t+1) in order, padded to k = max k_i with position 0 and target -100.
        wanted = [torch.nonzero(row[1:] != IGNORE_INDEX).flatten() for row in labels]
        k = max(len(w) for w in wanted)
        positions = torch.zeros((len(encoded), k), dtype=torch.long)  # host: as above
        targets = torch.full((len(encoded), k), IGNORE_INDEX, dtype=torch.long)  # host: as above
        for i, w in enumerate(wanted):
            positions[i, : len(w)] = w
            targets[i, : len(w)] = labels[i, w + 1]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "positions": positions,
                "targets": targets}

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Logits (batch, k, vocab) at `batch["positions"]`, the positions that predict response tokens."""
        device = next(model.parameters()).device  # a GPU rank's model (the batch is built on the CPU)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        return logits_at(model, inputs, batch["positions"], _virtual_tokens(model))  # per row on any transformers

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.reduce(self.token_nll(outputs, batch), batch)  # (batch,)

    def token_nll(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(batch, k) the NLL of each response token at `outputs` (`forward`'s logits), 0 where `targets` has none."""
        targets = batch["targets"].to(outputs.device)  # (batch, k): the token each kept position predicts, or -100
        return F.cross_entropy(outputs.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")

    def reduce(self, nll: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(batch,) the loss from `token_nll`'s NLLs: Σₜ NLLₜ / the example's loss tokens, or / t̄ ('token')."""
        return nll.sum(1) / self._divisor(batch["targets"].to(nll.device) != IGNORE_INDEX).to(nll.dtype)

    def fisher_loss(self, outputs: torch.Tensor, batch: Batch, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """(1/√k) Σₜ CE(oₜ, ỹₜ) per example, with ỹₜ ~ softmax(oₜ) at each of its k response positions, drawn from
        the example's own generator (`generators[i]` for row i, on the outputs' device: `sample_targets`).

        Its gradient sₜ = (p − e_ỹₜ)/√k in the logits has E[sₜ sₜᵀ] = (diag p − p pᵀ)/k, the output Hessian of the
        mean response NLL, and E[sₜ sᵤᵀ] = 0 for t ≠ u (independent draws, each of mean zero): so the Fisher built
        from these gradients is the Gauss-Newton matrix in expectation (the "true" Fisher, not the empirical one).
        """
        targets = batch["targets"].to(outputs.device)
        if len(generators) != targets.shape[0]:
            raise ConfigError(f"fisher_loss: {targets.shape[0]} examples but {len(generators)} generators")
        valid = targets != IGNORE_INDEX
        draws = sample_targets(outputs.detach(), generators, max(self.max_length, targets.shape[1]))
        sampled = torch.where(valid, draws, torch.full_like(targets, IGNORE_INDEX))
        nll = F.cross_entropy(outputs.transpose(1, 2), sampled, ignore_index=IGNORE_INDEX, reduction="none")
        return nll.sum(1) / self._divisor(valid).to(nll.dtype).sqrt()


def sample_targets(logits: torch.Tensor, generators: Sequence[torch.Generator], width: int) -> torch.Tensor:
    """(batch, k) token ids, row i's position t drawn from softmax(logits[i, t]) with the uniform u_{i,t}, on the
    logits' device (no transfer to the host).

    Each row draws `width` uniforms from its own generator — a fixed count, never the batch's k, so that row i's
    u_{i,t} depend only on its generator (a device generator's values for a call depend on the call's size) — and the
    draw is the inverse CDF, the first token whose cumulative probability exceeds u·(total), one vectorised
    searchsorted over the batch in float64. P(draw = j) = p_j exactly up to float64 rounding of the cumulative sums.
    One small kernel a row draws the uniforms (the generators are per example, so that an example's targets do not
    depend on its batch, rank or the other examples); the sampling itself is batched."""
    b, k, vocab = logits.shape
    u = torch.stack([torch.rand(width, generator=g, device=logits.device, dtype=torch.float64)
                     for g in generators])[:, :k]
    cdf = torch.softmax(logits.double(), dim=-1).cumsum_(-1)  # (batch, k, vocab)
    draws = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return draws.clamp_(max=vocab - 1)


def _head(text: str, n: int | None) -> str:
    """The first n characters of text (all of it when n is None)."""
    return text if n is None or len(text) <= n else text[:n]


def _tail(text: str, n: int | None) -> str:
    """The last n characters of text (all of it when n is None)."""
    return text if n is None or len(text) <= n else text[len(text) - n :]


def _cut_messages(messages: Sequence[Message], n: int | None, *, keep_end: bool) -> tuple[Message, ...]:
    """The messages with at most n characters of content in all, kept from the end (`keep_end`) or the start: the
    messages there whole, the one that crosses n cut, those beyond it empty. Every message keeps its role and other
    keys, so the template renders the same turns."""
    if n is None or sum(len(m.content) for m in messages) <= n:
        return tuple(messages)
    out, left = [], n
    for m in reversed(messages) if keep_end else messages:
        text = _tail(m.content, left) if keep_end else _head(m.content, left)
        left -= len(text)
        out.append(m if len(text) == len(m.content) else dataclasses.replace(m, content=text))
    return tuple(reversed(out)) if keep_end else tuple(out)


class _Timeout(BaseException):
    """Raised into a chat template's rendering at its deadline (a BaseException, so that no `except Exception` in
    jinja2 or transformers turns it into another error)."""


@contextmanager
def _deadline(seconds: float) -> Iterator[float]:
    """Yield the time (`time.monotonic`) by which the block must end. On the main thread a SIGALRM timer interrupts
    the block then with `_Timeout` (the previous handler, and a timer already running, are restored after); signals
    reach only the main thread, so elsewhere the block's own checks of the time are all there is."""
    start = time.monotonic()
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getsignal(signal.SIGALRM) is None):  # None: a handler set outside Python, not restorable
        yield start + seconds
        return

    def fire(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, fire)
    left, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield start + seconds
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if left:
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - start), 1e-3), interval)


def _render_checked(template: Any, chat: list[dict], limit: int, end: float, source: str, **variables) -> None:
    """Render the compiled `template` (transformers' sandboxed jinja2 template) on `chat` piece by piece: refused
    (ConfigError) once it has produced more than `limit` characters, stopped (`_Timeout`) when a piece comes after
    `end`. Nothing is kept: this bounds what the tokenizer's own rendering will do."""
    size = 0
    for piece in template.generate(messages=chat, tools=None, documents=None, **variables):
        size += len(piece)
        if size > limit:
            raise ConfigError(f"the chat template rendered more than {limit:,} characters for one example ({source}; "
                              f"at most {TEMPLATE_MARKUP:,} beyond the messages' contents, their other keys such as "
                              f"tool calls included)")
        if time.monotonic() > end:
            raise _Timeout


def _virtual_tokens(model: torch.nn.Module) -> int:
    """The virtual tokens prompt tuning / p-tuning put before the input (the logits shift by as many); 0 else."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return 0 if str(config.peft_type).endswith(("PREFIX_TUNING", "CARTRIDGE")) else config.num_virtual_tokens
