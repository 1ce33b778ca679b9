"""An adapter's training record: what the update must know of how the adapter was fine-tuned, in one home.

The influence update differentiates the objective the adapter was trained on (docs/math.md#the-objective), so it
must know how examples were cut (max length), the L2 term of the objective, the base model and dtype, the LoRA
layout, and how the loss was formed. `llmeraser finetune` (and the demo's and benchmark's fine-tunes) write this
record into the adapter's report.json (`task` and `lora`); `unlearn`, `fit-curvature`, `tune-damping` and
`evaluate` read it. An adapter made elsewhere has none: the defaults below are assumed, and a one-line warning names
each value assumed and the flag that sets it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmeraser.errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 64
DEFAULT_L2 = 0.0
LOSS = "per-example mean NLL of the response tokens (prompt masked), averaged over examples; dropout off"
REPORT = "report.json"
FLAGS = {"max_length": "--max-length", "l2": "--l2"}  # the values an update needs, and the flags that set them


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA layout of a fine-tune (dropout is always off: the objective is then exactly R(θ))."""

    r: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # the LoRA paper's default, and what the benchmarks measure

    def to_peft(self) -> dict:
        """The keyword arguments of peft's LoraConfig (without dropout)."""
        return {"r": self.r, "lora_alpha": self.alpha, "target_modules": list(self.targets)}

    @classmethod
    def from_peft(cls, kwargs: dict) -> LoraSettings:
        """From LoraConfig keyword arguments (r, lora_alpha, target_modules)."""
        return cls(r=kwargs["r"], alpha=kwargs["lora_alpha"], targets=tuple(kwargs["target_modules"]))

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "targets": list(self.targets)}


def lora_model(base: torch.nn.Module, lora: LoraSettings | None = None, *, seed: int = 0):
    """`base` wrapped in a fresh LoRA adapter (A drawn with torch seed `seed`, B = 0, dropout 0): the one place a
    LoRA model is built.

    Raises:
        UserInputError: a target module name the base model does not have.
    """
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraSettings()
    torch.manual_seed(seed)  # LoRA A's random init
    try:
        return get_peft_model(base, LoraConfig(lora_dropout=0.0, **lora.to_peft()))
    except ValueError as e:
        raise UserInputError(f"LoRA targets {','.join(lora.targets)!r}: {str(e).splitlines()[0]}") from e


@dataclass(frozen=True)
class TrainingRecord:
    """How an adapter was fine-tuned, as far as the update needs to know. `assumed`: the fields that came from the
    defaults because neither the adapter's record nor the caller gave them."""

    max_length: int = DEFAULT_MAX_LENGTH
    l2: float = DEFAULT_L2
    base_model: str | None = None
    dtype: str | None = None
    lora: dict | None = None
    loss: str = LOSS
    assumed: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        """The record as report.json's `task` block."""
        out = {"max_length": self.max_length, "l2": self.l2, "loss": self.loss}
        out |= {k: v for k, v in (("base_model", self.base_model), ("dtype", self.dtype), ("lora", self.lora))
                if v is not None}
        if self.assumed:
            out["assumed"] = list(self.assumed)
        return out

    @classmethod
    def read(cls, adapter: str | os.PathLike, *, max_length: int | None = None,
             l2: float | None = None) -> TrainingRecord:
        """The record of `adapter` (its report.json), with `max_length` / `l2` overriding it when given; a value
        neither recorded nor given is assumed (listed in `assumed`, see `warning`)."""
        stored, lora = _stored(Path(adapter))
        given = {"max_length": max_length, "l2": l2}
        values, assumed = {}, []
        for name, default in (("max_length", DEFAULT_MAX_LENGTH), ("l2", DEFAULT_L2)):
            values[name] = given[name] if given[name] is not None else stored.get(name, default)
            if given[name] is None and name not in stored:
                assumed.append(name)
        if "loss" not in stored and stored.get("max_length") is None:
            assumed.append("loss")  # no record at all: the loss is assumed to be ours
        return cls(max_length=int(values["max_length"]), l2=float(values["l2"]), base_model=stored.get("base_model"),
                   dtype=stored.get("dtype"), lora=lora, loss=stored.get("loss", LOSS), assumed=tuple(assumed))

    def warning(self, adapter: str | os.PathLike) -> str | None:
        """One line naming each assumed value and the flag that sets it, or None when nothing was assumed."""
        if not self.assumed:
            return None
        parts = [f"{name} {getattr(self, name):g} ({FLAGS[name]})" for name in self.assumed if name in FLAGS]
        if "loss" in self.assumed:
            parts.append(f"loss = {self.loss}")
        return (f"{adapter} has no training record for what the update must match (report.json, as 'llmeraser "
                f"finetune' writes it); assuming {'; '.join(parts)}")


def _stored(adapter: Path) -> tuple[dict, dict | None]:
    """(the `task` block, the `lora` block) of the adapter's report.json; ({}, None) when absent or unreadable."""
    path = adapter / REPORT
    if not path.is_file():
        return {}, None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("%s is unreadable; treating the adapter as having no training record", path)
        return {}, None
    if not isinstance(report, dict):
        return {}, None
    task = report.get("task")
    lora = report.get("lora")
    return (task if isinstance(task, dict) else {}), (lora if isinstance(lora, dict) else None)


def finetune_record(*, max_length: int, l2: float, base_model: str | None = None, dtype: str | None = None,
                    lora: LoraSettings | None = None) -> dict:
    """The `task` block a fine-tune writes into its adapter's report.json."""
    return TrainingRecord(max_length=max_length, l2=l2, base_model=base_model, dtype=dtype,
                          lora=lora.to_dict() if lora else None).to_dict()
