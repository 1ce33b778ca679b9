"""A `transformers` callback that writes, beside the adapter a `Trainer` or TRL's `SFTTrainer` saves, the training
record `llmeraser unlearn` needs to unlearn it with the objective it was trained on (docs/data.md#trainer-callback).

    from llmeraser.callback import LLMEraserCallback
    trainer = SFTTrainer(model, args=SFTConfig(output_dir="out", ...), train_dataset=dataset,
                         peft_config=LoraConfig(...), callbacks=[LLMEraserCallback("chat.jsonl")])
    trainer.train(); trainer.save_model("out")
    # then: llmeraser unlearn --base-model BASE --adapter out --train chat.jsonl --request request.json --out unlearned

The record (`training_record.json`, the `task` block of `record.TrainingRecord`) says how examples were rendered and
masked (TRL's completion-only / assistant-only loss, the chat template, EOS, truncation), the token-weighted loss,
max length, the optimiser (AdamW's decoupled weight decay, schedule, clipping, batch and accumulation), the adapter's
dropout, the adapter layout, packing, and the training set's hash. It is written into the output folder when training
ends and into every checkpoint; `write(folder)` writes it anywhere else (e.g. where `save_model` put the adapter).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import TrainerCallback

from llmeraser.data import DataFields, Example, examples_hash, load_examples, parse_records
from llmeraser.errors import UserInputError
from llmeraser.io import atomic_write_json
from llmeraser.record import RECORD, TRL_LOSS, TrainingRecord
from llmeraser.task import Rendering

logger = logging.getLogger(__name__)


def _examples(train, fields: DataFields) -> list[Example]:
    """The training data as llmeraser reads it: a path, a datasets Dataset, a list of records or of Examples."""
    if isinstance(train, str | os.PathLike):
        return load_examples(train, fields)
    if hasattr(train, "to_list"):  # a datasets Dataset, before the trainer tokenises it
        train = train.to_list()
    train = list(train)
    if train and all(isinstance(e, Example) for e in train):
        return train
    return parse_records(((f"record {i}", r) for i, r in enumerate(train)), "the callback's training data", fields)


class LLMEraserCallback(TrainerCallback):
    """Records how a transformers `Trainer` / TRL `SFTTrainer` fine-tuned an adapter, for `llmeraser unlearn`.

    Args:
        train: the training data as given to the trainer, untokenised: a file or datasets folder (as `--train`
            reads it), a `datasets.Dataset`, or a list of records; its hash goes into the record and `unlearn`
            warns when its --train differs.
        fields: which record fields hold what (saved in the record: `unlearn` then reads --train the same way).
        rendering: how examples were tokenised and masked. Found by itself under SFTTrainer (from its config); with
            a plain `Trainer`, which takes already tokenised data, give it (e.g. `Rendering(format="trl")` when the
            collator follows TRL, or `Rendering(format="llmeraser", normalization="token")`).
    """

    def __init__(self, train=None, *, fields: DataFields | None = None, rendering: Rendering | None = None):
        self.fields = fields or DataFields()
        self.examples = _examples(train, self.fields) if train is not None else None
        self.rendering = rendering
        self.record: dict | None = None

    # ---------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.record = self.build(args, model, processing_class or kwargs.get("tokenizer"))
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.record is not None and folder.is_dir() and state.is_world_process_zero:
            self.write(folder)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.record is not None and state.is_world_process_zero:
            self.write(args.output_dir)
        return control

    # ---------------------------------------------------------------------------------------------- record
    def write(self, folder: str | os.PathLike) -> Path:
        """Write the record as FOLDER/training_record.json (atomically); returns its path."""
        if self.record is None:
            raise UserInputError("LLMEraserCallback.write: no record yet (it is built when training begins)")
        path = Path(folder) / RECORD
        atomic_write_json(path, self.record)
        return path

    def build(self, args, model, tokenizer) -> dict:
        """The record of a run with TrainingArguments / SFTConfig `args` on `model` (a PeftModel)."""
        trl = hasattr(args, "completion_only_loss") and hasattr(args, "assistant_only_loss")
        chat = bool(self.examples) and any(e.is_chat for e in self.examples)
        if trl:
            rendering = Rendering(
                format="trl", completion_only=args.completion_only_loss is not False,
                assistant_only=bool(args.assistant_only_loss), normalization="token",
                truncation=getattr(args, "truncation_mode", "keep_start"),
                chat_template=getattr(tokenizer, "chat_template", None) if chat else None,
                eos_token=getattr(args, "eos_token", None) or getattr(tokenizer, "eos_token", None))
            max_length = args.max_length
        elif self.rendering is not None:
            rendering, max_length = self.rendering, getattr(args, "max_length", None)
        else:
            raise UserInputError("LLMEraserCallback with transformers' Trainer: the Trainer takes tokenised data, so "
                                 "the callback cannot see how examples were rendered and masked; pass "
                                 "rendering=Rendering(...) (docs/data.md#trainer-callback)")
        peft = _peft_summary(model)
        if self.examples is None:
            logger.warning("LLMEraserCallback got no training data: the record holds no training-set hash, so "
                           "'llmeraser unlearn' cannot check that --train is the set the adapter was trained on")
        optimizer = {"name": _plain(getattr(args, "optim", "adamw_torch")), "lr": args.learning_rate,
                     "weight_decay": args.weight_decay, "betas": [args.adam_beta1, args.adam_beta2],
                     "eps": args.adam_epsilon, "schedule": _plain(args.lr_scheduler_type),
                     "warmup_steps": args.warmup_steps, "max_grad_norm": args.max_grad_norm,
                     "batch_size": args.per_device_train_batch_size,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "epochs": args.num_train_epochs, "max_steps": args.max_steps, "seed": args.seed}
        base = getattr(getattr(model, "base_model", model), "config", None) if model is not None else None
        record = TrainingRecord(
            max_length=max_length, l2=0.0, base_model=getattr(base, "_name_or_path", None) or None,
            dtype="bfloat16" if args.bf16 else "float16" if args.fp16 else None, lora=peft.pop("layout", None),
            loss=TRL_LOSS if rendering.normalization == "token" else TrainingRecord().loss, rendering=rendering,
            optimizer=optimizer, dropout=peft.get("dropout"),
            train_sha256=examples_hash(self.examples) if self.examples else None,
            data_fields=self.fields.to_dict(), packing=bool(getattr(args, "packing", False)),
            source=_source(trl))
        out = {"kind": "trainer-callback", "task": record.to_dict(), "lora": record.lora,
               "n_train": len(self.examples) if self.examples else None,
               "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False))}
        if record.packing:
            logger.warning("LLMEraserCallback: packing=True mixes examples in one sequence; 'llmeraser unlearn' will "
                           "refuse this adapter (an example's own loss is not defined)")
        return out


def _peft_summary(model) -> dict:
    """{'layout': the adapter's kind and shape, 'dropout': its dropout} from a PeftModel's active config."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return {}
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()))
    d = config.to_dict()
    kind = str(d.get("peft_type", "")).split(".")[-1].lower()
    if d.get("use_dora"):
        kind = "dora"
    elif d.get("use_rslora"):
        kind = "rslora"
    layout = {"kind": kind, **{k: d[k] for k in ("r", "lora_alpha", "alpha", "num_virtual_tokens") if k in d}}
    targets = d.get("target_modules")
    if targets is not None:
        layout["targets"] = sorted(targets) if isinstance(targets, list | set | tuple) else targets
    if d.get("modules_to_save"):
        layout["modules_to_save"] = list(d["modules_to_save"])
    return {"layout": layout, "dropout": d.get("lora_dropout") or d.get("module_dropout") or d.get("rank_dropout")}


def _source(trl: bool) -> str:
    import transformers

    if not trl:
        return f"transformers {transformers.__version__} Trainer (LLMEraserCallback)"
    try:
        import trl as trl_package

        return f"trl {trl_package.__version__} SFTTrainer (LLMEraserCallback)"
    except ImportError:
        return "an SFTTrainer-like trainer (LLMEraserCallback)"



def _plain(value) -> str:
    """An enum's value (TrainingArguments holds OptimizerNames, SchedulerType), else the string."""
    return str(getattr(value, "value", value))
