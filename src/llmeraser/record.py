"""An adapter's training record: what the update must know of how the adapter was fine-tuned, in one home.

The influence update differentiates the objective the adapter was trained on (docs/math.md#the-objective), so it
must know how examples were rendered and masked (`task.Rendering`), cut (max length) and averaged, the L2 term of the
objective, the optimiser (AdamW's decoupled weight decay is not a term of the loss), dropout (off in the update), the
base model and dtype, the adapter layout and the training set's hash. `llmeraser finetune` (and the demo's and
benchmark's fine-tunes) write it into the adapter's report.json (`task`); `llmeraser.callback.LLMEraserCallback`
writes it as training_record.json for an adapter trained with transformers' Trainer or TRL's SFTTrainer.
`unlearn`, `fit-curvature`, `tune-damping` and `evaluate` read it. An adapter made elsewhere has none: the defaults
below are assumed, and a one-line warning names each value assumed and the flag that sets it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmeraser.errors import ConfigError, UserInputError
from llmeraser.params import with_base_dtype
from llmeraser.schema import Fields, read_json
from llmeraser.task import Rendering

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 64
DEFAULT_L2 = 0.0
LOSS = "per-example mean NLL of the response tokens (prompt masked), averaged over examples; dropout off"
TRL_LOSS = ("token-weighted mean NLL of the unmasked tokens (Σ NLL / Σ tokens, as transformers' Trainer and TRL's "
            "SFTTrainer average); dropout off")
REPORT = "report.json"
RECORD = "training_record.json"  # what the Trainer callback writes beside the adapter
FLAGS = {"max_length": "--max-length", "l2": "--l2"}  # the values an update needs, and the flags that set them
PEFT_KINDS = ("lora", "rslora", "dora", "ia3", "loha", "lokr", "prompt", "prefix")


@dataclass(frozen=True)
class LoraSettings:
    """The adapter layout of a fine-tune: LoRA by default, or any `PEFT_KINDS` (dropout is always off: the objective
    is then exactly R(θ)). r and alpha serve LoRA, rsLoRA, DoRA, LoHa and LoKr; targets all but prompt and prefix
    tuning, which learn `virtual_tokens` token embeddings (prefix: per layer keys and values)."""

    r: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # the LoRA paper's default, and what the benchmarks measure
    kind: str = "lora"
    virtual_tokens: int = 8
    modules_to_save: tuple[str, ...] = ()  # modules trained in full beside the adapter (e.g. a head)

    def __post_init__(self) -> None:
        if self.kind not in PEFT_KINDS:
            raise UserInputError(f"unknown adapter kind {self.kind!r}; expected one of {', '.join(PEFT_KINDS)}")

    def to_peft(self) -> dict:
        """The keyword arguments of peft's LoraConfig (without dropout); LoRA only."""
        return {"r": self.r, "lora_alpha": self.alpha, "target_modules": list(self.targets)}

    def config(self):
        """The peft config of this layout."""
        import peft

        targets = list(self.targets)
        save = {"modules_to_save": list(self.modules_to_save)} if self.modules_to_save else {}
        if self.kind in ("lora", "rslora", "dora"):
            return peft.LoraConfig(lora_dropout=0.0, use_rslora=self.kind == "rslora", use_dora=self.kind == "dora",
                                   **self.to_peft(), **save)
        if self.kind == "ia3":
            return peft.IA3Config(target_modules=targets, feedforward_modules=[], **save)
        if self.kind == "loha":
            return peft.LoHaConfig(r=self.r, alpha=self.alpha, target_modules=targets, **save)
        if self.kind == "lokr":
            return peft.LoKrConfig(r=self.r, alpha=self.alpha, target_modules=targets, **save)
        if save:
            raise UserInputError(f"modules_to_save is not offered with {self.kind} tuning here")
        cls = peft.PromptTuningConfig if self.kind == "prompt" else peft.PrefixTuningConfig
        return cls(task_type="CAUSAL_LM", num_virtual_tokens=self.virtual_tokens)

    @classmethod
    def from_peft(cls, kwargs: dict) -> LoraSettings:
        """From LoraConfig keyword arguments (r, lora_alpha, target_modules)."""
        return cls(r=kwargs["r"], alpha=kwargs["lora_alpha"], targets=tuple(kwargs["target_modules"]))

    def to_dict(self) -> dict:
        out = {"r": self.r, "alpha": self.alpha, "targets": list(self.targets)}
        if self.modules_to_save:
            out["modules_to_save"] = list(self.modules_to_save)
        return out if self.kind == "lora" else {**out, "kind": self.kind, "virtual_tokens": self.virtual_tokens}


def lora_model(base: torch.nn.Module, lora: LoraSettings | None = None, *, seed: int = 0):
    """`base` wrapped in a fresh adapter (LoRA by default: A drawn with torch seed `seed`, B = 0, dropout 0): the one
    place an adapter model is built.

    Raises:
        UserInputError: a target module name the base model does not have.
    """
    from peft import get_peft_model

    lora = lora or LoraSettings()
    torch.manual_seed(seed)  # the adapter's random init
    dtype = next(base.parameters()).dtype
    try:
        model = get_peft_model(base, lora.config())
    except ValueError as e:
        raise UserInputError(f"{lora.kind} targets {','.join(lora.targets)!r}: {str(e).splitlines()[0]}") from e
    return with_base_dtype(model, dtype)


NO_LIMIT = 1 << 30  # the max length of a fine-tune that did not truncate (TRL's max_length=None)
MAX_TEMPLATE = 1 << 20  # characters of a chat template in a record


@dataclass(frozen=True)
class TrainingRecord:
    """How an adapter was fine-tuned, as far as the update needs to know. `assumed`: the fields that came from the
    defaults because neither the adapter's record nor the caller gave them.

    Attributes:
        max_length: tokens per example (None: not truncated).
        l2: the coefficient of the (l2/2)‖θ‖² term of the objective; decoupled weight decay (AdamW's
            `weight_decay`) is not one: it is recorded in `optimizer`, and the one-step updates leave it out of the
            objective (it acts on the optimiser's path, not on the loss; docs/data.md#weight-decay).
        rendering: how examples were tokenised, masked and averaged.
        optimizer: the optimiser's settings (name, lr, weight_decay, betas, schedule, clipping, batch, accumulation).
        dropout: the adapter's dropout during training (the update is always computed with dropout off).
        train_sha256: `data.examples_hash` of the training set the adapter was fine-tuned on.
        data_fields: the record fields the training data used (`data.DataFields`), the default for reading it.
        packing: whether the fine-tune packed several examples into one sequence (not supported by the update).
        source: what wrote the record.
    """

    max_length: int | None = DEFAULT_MAX_LENGTH
    l2: float = DEFAULT_L2
    base_model: str | None = None
    dtype: str | None = None
    lora: dict | None = None
    loss: str = LOSS
    rendering: Rendering = field(default_factory=Rendering)
    optimizer: dict | None = None
    dropout: float | None = None
    train_sha256: str | None = None
    data_fields: dict | None = None
    packing: bool = False
    source: str | None = None
    assumed: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        """The record as report.json's `task` block."""
        out = {"max_length": self.max_length, "l2": self.l2, "loss": self.loss}
        optional = (("base_model", self.base_model), ("dtype", self.dtype), ("lora", self.lora),
                    ("rendering", self.rendering.to_dict() if self.rendering != Rendering() else None),
                    ("optimizer", self.optimizer), ("dropout", self.dropout), ("train_sha256", self.train_sha256),
                    ("data_fields", self.data_fields), ("packing", self.packing or None), ("source", self.source))
        out |= {k: v for k, v in optional if v is not None}
        if self.assumed:
            out["assumed"] = list(self.assumed)
        return out

    @property
    def length(self) -> int:
        """The max length to build the task with."""
        return NO_LIMIT if self.max_length is None else self.max_length

    @classmethod
    def read(cls, adapter: str | os.PathLike, *, max_length: int | None = None,
             l2: float | None = None) -> TrainingRecord:
        """The record of `adapter` (training_record.json, else report.json), with `max_length` / `l2` overriding it
        when given; a value neither recorded nor given is assumed (listed in `assumed`, see `warning`)."""
        stored, lora = _stored(Path(adapter))
        stored = {k: v for k, v in stored.items() if v is not None or k == "max_length"}  # null max_length: no limit
        given = {"max_length": max_length, "l2": l2}
        if max_length is not None and not 2 <= max_length <= NO_LIMIT:
            raise ConfigError(f"--max-length must be ≥ 2 (one prompt and one response token), got {max_length}")
        if l2 is not None and not (math.isfinite(l2) and l2 >= 0):
            raise ConfigError(f"--l2 must be a finite number ≥ 0, got {l2}")
        values, assumed = {}, []
        for name, default in (("max_length", DEFAULT_MAX_LENGTH), ("l2", DEFAULT_L2)):
            values[name] = given[name] if given[name] is not None else stored.get(name, default)
            if given[name] is None and name not in stored:
                assumed.append(name)
        if "loss" not in stored and stored.get("max_length") is None:
            assumed.append("loss")  # no record at all: the loss is assumed to be ours
        if stored.get("packing"):
            raise UserInputError(f"{adapter} was fine-tuned with packing (several examples per sequence, attending to "
                                 f"each other): an example's own loss is then not defined, so it cannot be unlearned "
                                 f"on its own; fine-tune with packing=False")
        try:
            rendering = Rendering.from_dict(stored.get("rendering") or {})
        except (TypeError, UserInputError) as e:
            raise UserInputError(f"{adapter}: the training record's rendering is not understood: {e}") from None
        return cls(max_length=None if values["max_length"] is None else int(values["max_length"]),
                   l2=float(values["l2"]), base_model=stored.get("base_model"), dtype=stored.get("dtype"), lora=lora,
                   loss=stored.get("loss", LOSS), rendering=rendering, optimizer=stored.get("optimizer"),
                   dropout=stored.get("dropout"), train_sha256=stored.get("train_sha256"),
                   data_fields=stored.get("data_fields"), source=stored.get("source"), assumed=tuple(assumed))

    def warning(self, adapter: str | os.PathLike) -> str | None:
        """One line naming each assumed value and the flag that sets it, or None when nothing was assumed."""
        if not self.assumed:
            return None
        parts = [f"{name} {getattr(self, name):g} ({FLAGS[name]})" for name in self.assumed if name in FLAGS]
        if "loss" in self.assumed:
            parts.append(f"loss = {self.loss}")
        return (f"{adapter} has no training record for what the update must match (report.json as 'llmeraser "
                f"finetune' writes it, or training_record.json as llmeraser.callback.LLMEraserCallback writes it for "
                f"transformers/TRL); assuming {'; '.join(parts)}")

    def notes(self) -> list[str]:
        """What the update does differently from the fine-tune, one line each (for the log and the report)."""
        out = []
        decay = (self.optimizer or {}).get("weight_decay") or 0.0
        if decay:
            out.append(f"the fine-tune's decoupled weight decay ({decay:g}, {self.optimizer.get('name', 'AdamW')}) is "
                       f"not a term of the loss: the one-step updates use l2 = {self.l2:g} and their damping; path "
                       f"and rewind replay the optimiser")
        if self.dropout:
            out.append(f"the adapter trained with dropout {self.dropout:g}; the update uses the deterministic "
                       f"objective (dropout off)")
        return out


def _stored(adapter: Path) -> tuple[dict, dict | None]:
    """(the `task` block, the `lora` block) of the adapter's training_record.json, else of its report.json, validated
    (`_validate`); ({}, None) when neither exists or the report holds no `task` (another tool's report.json).

    Raises:
        ConfigError: the file is unreadable, not JSON, too deep, or a field is of the wrong type or out of range,
            naming the file and the field.
    """
    for name in (RECORD, REPORT):
        path = adapter / name
        if not path.exists():
            continue
        report = read_json(path, ConfigError)
        if not isinstance(report, dict) or report.get("task") is None:
            if name == RECORD:
                raise ConfigError(f"{path} must be a JSON object with a 'task' block (as LLMEraserCallback writes it)")
            return {}, None
        f = Fields(report, str(path), ConfigError)
        task, lora = f.mapping("task"), f.mapping("lora", optional=True)
        _validate(task)
        return task.data, (lora.data if lora else None)
    return {}, None


def _validate(task: Fields) -> None:
    """The training record's fields an update reads, by type and range."""
    if task.has("max_length"):
        task.number("max_length", lo=2, hi=NO_LIMIT, integer=True)
    task.number("l2", lo=0, optional=True)
    task.number("dropout", lo=0, hi=1, optional=True)
    task.string("train_sha256", sha256=True, optional=True)
    task.boolean("packing", optional=True)
    for name in ("base_model", "dtype", "loss", "source"):
        task.string(name, optional=True, max_len=4096)
    rendering = task.mapping("rendering", optional=True)
    if rendering is not None:
        from llmeraser.task import FORMATS, NORMALIZATIONS, TRUNCATIONS

        for name, choices in (("format", FORMATS), ("normalization", NORMALIZATIONS), ("truncation", TRUNCATIONS)):
            rendering.string(name, optional=True, choices=choices)
        for name in ("completion_only", "assistant_only", "counts_first_label"):
            rendering.boolean(name, optional=True)
        rendering.string("chat_template", optional=True, max_len=MAX_TEMPLATE)
        rendering.string("eos_token", optional=True, max_len=1000)
    optimizer = task.mapping("optimizer", optional=True)
    if optimizer is not None:
        optimizer.number("weight_decay", optional=True)
        optimizer.string("name", optional=True, max_len=1000)
    fields = task.mapping("data_fields", optional=True)
    if fields is not None:
        for name in fields.data:
            fields.string(name, optional=True, max_len=1000)


def finetune_record(*, max_length: int, l2: float, base_model: str | None = None, dtype: str | None = None,
                    lora: LoraSettings | None = None, train_sha256: str | None = None) -> dict:
    """The `task` block llmeraser's own fine-tune (its rendering) writes into its adapter's report.json."""
    return TrainingRecord(max_length=max_length, l2=l2, base_model=base_model, dtype=dtype,
                          lora=lora.to_dict() if lora else None, train_sha256=train_sha256,
                          source="llmeraser finetune").to_dict()


def earlier_request_hint(folder: str | os.PathLike, train_sha256: str) -> str:
    """'' unless `folder` is llmeraser's output of a request on the training set whose sha256 is `train_sha256` (its
    report.json says so: `train_sha256`, or a sharded folder's `input_train_sha256`); then a clause for a message
    about a training set that does not match: the folder stands for that set after its request, and what to pass."""
    path = Path(folder) / REPORT
    try:
        report = read_json(path) if path.is_file() else None
    except UserInputError:  # an unreadable report is refused where it matters; here it only withholds the hint
        return ""
    if not isinstance(report, dict) or train_sha256 not in (report.get("train_sha256"),
                                                            report.get("input_train_sha256")):
        return ""
    held = ", ".join(n for n in ("request.json", "requests.json") if (Path(folder) / n).is_file()) or REPORT
    return (f"; {folder} is the output of a request on this very set ({held}), so it stands for the set after "
            f"that request: pass that set (the removed examples gone, the edited ones edited), or keep requests "
            f"on record with --ledger DIR and give the original set every time (docs/ledger.md)")
