"""A `transformers` callback that writes, beside the adapter a `Trainer` or TRL's `SFTTrainer` saves, the training
record `llmeraser unlearn` needs to unlearn it with the objective it was trained on (docs/data.md#trainer-callback).

    from llmeraser.callback import LLMEraserCallback
    trainer = SFTTrainer(model, args=SFTConfig(output_dir="out", ...), train_dataset=dataset,
                         peft_config=LoraConfig(...), callbacks=[LLMEraserCallback("chat.jsonl")])
    trainer.train(); trainer.save_model("adapter")   # anywhere: the record follows the adapter
    # then: llmeraser unlearn --base-model BASE --adapter adapter --train chat.jsonl --request request.json --out u

The record (`training_record.json`, the `task` block of `record.TrainingRecord`) says how examples were rendered and
masked (TRL's completion-only / assistant-only loss, the chat template, EOS, truncation), the token-weighted loss,
max length, the optimiser (AdamW's decoupled weight decay, schedule, clipping, batch and accumulation), the adapter's
dropout, the adapter layout, packing, and the training set's hash.

With AdamW (the Trainer's default) in one process, the callback also records the run itself (`trajectory.safetensors`,
as `llmeraser finetune` does): θ₀, every step's gradient before clipping, its learning rate and which examples its
batch held (matched by their token ids), so that `unlearn` can rewind the run (retrain from the step before the
first edited example, without the cost of the steps before it) or replay its path (docs/data.md#replaying-the-run).

Where they go (docs/data.md#where-the-record-goes): into the output folder when training ends; and then beside the
adapter wherever the trained model is saved — `trainer.save_model(dir)` and `model.save_pretrained(dir)` both end in
the model's `save_pretrained`, which the callback wraps when training ends — but only while the model's weights are
the ones training ended at (their sha256, taken then): a save after they changed gets no record. Each checkpoint
gets the record and a pointer (`recording.POINTER`) to the run's recording with the checkpoint's step, which
`recording.locate` cuts the run's recording to; with `load_best_model_at_end` the model training ends with is the
best checkpoint's, and the recording written is cut likewise. A file of those names llmeraser did not write is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from llmeraser.data import DataFields, Example, examples_hash, load_examples, parse_records
from llmeraser.errors import UserInputError
from llmeraser.follow import file_stat, follow_saves, theta_sha256, trainable
from llmeraser.io import atomic_write_json
from llmeraser.params import ParamView
from llmeraser.record import RECORD, TRL_LOSS, TrainingRecord
from llmeraser.recorder import DEFAULT_MAX_BYTES, Recorder
from llmeraser.recording import POINTER, prefix, replaceable, write, write_pointer
from llmeraser.schema import read_json
from llmeraser.task import CausalLMTask, Rendering
from llmeraser.trajectory import RECORD_DTYPES, TRAJECTORY, Trajectory, names_sha256, task_recipe, tensor_sha256

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
        max_length, tokenizer: with a plain `Trainer`, the max length the examples were cut to and the tokenizer
            they were tokenised with, when the Trainer is not given it (`processing_class`).
        trajectory: also record the run for rewind and path replay (AdamW, one process; see the module docstring).
        max_gib: the recording's budget on disk (also at most half the free space of the output folder, where it is
            spooled as training runs); beyond it only evenly spaced checkpoints are kept (rewind, not path replay).
        record_dtype: the recorded gradients' precision: "full" or "bfloat16" (half the bytes, with full-precision
            checkpoints every ⌈√steps⌉ steps: rewind stays exact, path replay uses the rounded gradients).
    """

    def __init__(self, train=None, *, fields: DataFields | None = None, rendering: Rendering | None = None,
                 max_length: int | None = None, tokenizer=None, trajectory: bool = True,
                 max_gib: float = DEFAULT_MAX_BYTES / 2**30, record_dtype: str = "full"):
        if record_dtype not in RECORD_DTYPES:
            raise UserInputError(f"LLMEraserCallback: record_dtype must be one of {', '.join(RECORD_DTYPES)}, got "
                                 f"{record_dtype!r}")
        self.fields = fields or DataFields()
        self.examples = _examples(train, self.fields) if train is not None else None
        self.rendering, self.max_length, self.tokenizer = rendering, max_length, tokenizer
        self.record: dict | None = None
        self.want_trajectory, self.max_bytes, self.record_dtype = trajectory, int(max_gib * 2**30), record_dtype
        self.recording: dict | None = None  # the run being recorded (None: not recording)
        # once training ended: the trainable parameters' names, θ's sha256 then, and the recorded Trajectory (None:
        # none); a save of the model writes the record beside it only while its weights still hash to that
        self.final: dict | None = None
        self._written: dict[Path, tuple] = {}  # recordings this callback wrote: path → (inode, size, mtime)

    # ---------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        tokenizer = processing_class or kwargs.get("tokenizer") or self.tokenizer
        self.final = None  # training again: the model's saves are not the last run's end state until it ends
        self.record = self.build(args, model, tokenizer)
        if self.want_trajectory:
            try:
                why = self._start(args, state, model, tokenizer, optimizer)
            except Exception as e:  # noqa: BLE001 — a recording problem must never stop the user's training
                why = f"{type(e).__name__}: {e}"
            if why:
                logger.warning("LLMEraserCallback records no trajectory: %s (unlearn then takes one influence step)",
                               why)
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.recording is not None:
            self.recording["seen"] = set()
        return control

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        rec = self.recording
        if rec is None:
            return control
        if not rec["batch"] or any(g is None for g in rec["pending"]):
            return self._stop("a step whose batch or gradient the callback did not see")
        k, recorder = len(rec["batches"]), rec["recorder"]
        if k >= recorder.n_steps:
            return self._stop(f"more steps than the {recorder.n_steps} the Trainer planned")
        view = rec["view"]

        def state():  # (θ, AdamW's m and v) before this step, flat (a checkpoint)
            states = [getattr(optimizer, "state", {}).get(p, {}) for p in view.params]
            m, v = ([s.get(key, torch.zeros_like(p)) for s, p in zip(states, view.params, strict=True)]
                    for key in ("exp_avg", "exp_avg_sq"))
            return view.vector(), view.flatten(m), view.flatten(v)

        recorder.step(k, torch.cat([g.reshape(-1) for g in rec["pending"]]), state)
        rec["lrs"].append(float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float("nan"))
        rec["batches"].append(rec["batch"])
        rec["batch"], rec["pending"] = [], [None] * len(rec["pending"])
        return control

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint: the record, and a pointer to the run's recording (written at the end) with this step and
        θ's hash at it, so that `unlearn` on the checkpoint rewinds the run's first `global_step` steps."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.record is None or not folder.is_dir() or not state.is_world_process_zero:
            return control
        self._put_record(folder)
        rec = self.recording
        if rec is not None and len(rec["batches"]) == state.global_step and replaceable(folder / POINTER):
            write_pointer(folder, args.output_dir, state.global_step, tensor_sha256(rec["view"].vector()))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """The record and recording into output_dir; θ's hash now (the state they describe); and from here on every
        save of the model writes them beside the adapter saved (`_follow`)."""
        self._remove_hooks()
        if self.record is None or not state.is_world_process_zero:
            return control
        names = self.recording["view"].names if self.recording is not None else trainable(model)
        theta = theta_sha256(model, names) if names else None
        trajectory = self.trajectory() if self.recording is not None else None
        best = _best_step(args, state)
        if trajectory is not None and best is not None and best < trajectory.steps:
            # load_best_model_at_end: the model is checkpoint-`best`'s, so its recording is the run's first steps
            trajectory = prefix(trajectory, best, theta, where="the run's recording")
        self.final = {"names": names, "sha256": theta, "trajectory": trajectory}
        self._put(args.output_dir, trajectory=True)
        if theta is not None and model is not None:
            follow_saves(model, self._follow)
        return control

    def _follow(self, model, folder, state_dict) -> None:
        """After `model.save_pretrained(folder)` (a `trainer.save_model` too): the record, and the recording, beside
        the adapter saved, when the model still holds the weights training ended at (nothing during a run: a
        checkpoint's state is not the end state). With `state_dict` the weights saved are not the live ones the hash
        is taken of: the recording is then left out (the record describes the run, whatever its weights)."""
        final = self.final
        if final is None or final["sha256"] is None:
            return
        folder = Path(folder)
        sub = folder / str(getattr(model, "active_adapter", "default"))
        if not (folder / "adapter_config.json").is_file() and (sub / "adapter_config.json").is_file():
            folder = sub  # peft saves a non-default adapter in a subfolder
        if theta_sha256(model, final["names"]) != final["sha256"]:
            logger.warning("LLMEraserCallback writes no record beside %s: the model's weights are no longer the ones "
                           "training ended at, which the record and recording describe", folder)
            return
        self._put(folder, trajectory=state_dict is None)

    # ---------------------------------------------------------------------------------------------- trajectory
    def _start(self, args, state, model, tokenizer, optimizer) -> str | None:
        """Begin recording, or say why not."""
        optim = _plain(getattr(args, "optim", ""))
        if self.examples is None:
            return "no training data was given to the callback (its batches cannot be matched to examples)"
        if tokenizer is None:
            return "no tokenizer (give the Trainer processing_class=, or the callback tokenizer=)"
        if not optim.startswith("adamw_torch"):
            return f"optimizer {optim!r} (only torch's AdamW is replayed)"
        if getattr(args, "world_size", 1) > 1:
            return "data-parallel training (record on one process)"
        if self.record["task"].get("packing"):
            return "packing"
        groups = [g for g in (optimizer.param_groups if optimizer is not None else []) if g["params"]]
        if len({(g["weight_decay"], g.get("betas"), g.get("eps")) for g in groups}) > 1:
            return "parameter groups with different weight decay or betas"
        if not getattr(state, "max_steps", 0) or state.max_steps < 1:
            return "the Trainer did not say how many steps it will take"
        view = ParamView(model)
        task = CausalLMTask(tokenizer, max_length=TrainingRecord(max_length=self.record["task"]["max_length"]).length,
                            rendering=Rendering.from_dict(self.record["task"].get("rendering") or {}))
        index: dict[str, list[str]] = {}
        for e in self.examples:
            index.setdefault(_token_key(task.encode(e)[0]), []).append(e.id)
        recorder = Recorder({}, view.vector(), state.max_steps, max_bytes=self.max_bytes, dtype=self.record_dtype,
                            folder=args.output_dir)
        if state.is_world_process_zero:
            print(recorder.plan.describe())
        rec = {"view": view, "index": index, "task": task, "recorder": recorder, "lrs": [], "batches": [],
               "batch": [], "pending": [None] * len(view.params), "args": args,
               "group": groups[0] if groups else {}, "hooks": [], "seen": set()}
        for i, p in enumerate(view.params):  # the step's gradient before clipping, summed over accumulation
            rec["hooks"].append(p.register_post_accumulate_grad_hook(
                lambda p, i=i: rec["pending"].__setitem__(i, p.grad.detach().clone())))
        rec["hooks"].append(model.register_forward_pre_hook(self._see, with_kwargs=True))
        self.recording = rec
        return None

    def _see(self, module, args, kwargs) -> None:
        """Forward pre-hook: which examples a training forward holds, matched by their unpadded token ids."""
        rec = self.recording
        if rec is None or not module.training or not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            self._stop("a training forward without input_ids")
            return
        for j, row in enumerate(ids.detach().cpu()):
            tokens = row[mask[j].detach().cpu().bool()] if mask is not None else row
            found = rec["index"].get(_token_key(tokens.tolist()))
            if not found:
                self._stop("a training sequence matches no example of the training data given to the callback "
                           "(another rendering, a different max_length, or data the callback was not given)")
                return
            # examples of equal tokens are told apart by order: each is seen once an epoch (their gradients are
            # equal, so which copy a step held changes nothing but the names)
            ex_id = next((i for i in found if i not in rec["seen"]), found[0])
            rec["seen"].add(ex_id)
            rec["batch"].append(ex_id)

    def _stop(self, why: str):
        logger.warning("LLMEraserCallback stops recording the trajectory: %s", why)
        self._remove_hooks()
        if self.recording is not None:
            self.recording["recorder"].discard()
        self.recording = None
        return None

    def _remove_hooks(self) -> None:
        for h in (self.recording or {}).get("hooks", []):
            h.remove()

    def trajectory(self) -> Trajectory:
        """The recorded run as a `Trajectory` (rewind and path replay take it)."""
        rec = self.recording
        if rec is None:
            raise UserInputError("LLMEraserCallback: no trajectory was recorded")
        args, group, view = rec["args"], rec["group"], rec["view"]
        betas = group.get("betas", (args.adam_beta1, args.adam_beta2))
        meta = {"optimizer": "adamw", "lr": args.learning_rate, "beta1": betas[0], "beta2": betas[1],
                "eps": group.get("eps", args.adam_epsilon), "l2": 0.0,
                "weight_decay": group.get("weight_decay", args.weight_decay),
                "max_grad_norm": args.max_grad_norm or 0.0,
                "epochs": args.num_train_epochs, "seed": args.seed,
                "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
                "n_train": len(self.examples), "train_sha256": examples_hash(self.examples),
                "normalization": self.record["task"].get("rendering", {}).get("normalization", "example"),
                "batches": rec["batches"], "lrs": rec["lrs"], "param_names_sha256": names_sha256(view.names),
                "recorder": self.record["task"].get("source"), "recipe": task_recipe(rec["task"])}
        recorder = rec["recorder"]
        recorder.meta = meta
        return recorder.finish(len(rec["batches"]), view.vector(), partial=True)


    # ---------------------------------------------------------------------------------------------- record
    def write(self, folder: str | os.PathLike) -> Path:
        """Write the record as FOLDER/training_record.json (atomically), and once training ended its recording
        (when one was made); returns the record's path. Files of those names llmeraser did not write are kept."""
        if self.record is None:
            raise UserInputError("LLMEraserCallback.write: no record yet (it is built when training begins)")
        return self._put(folder, trajectory=True)

    def _put(self, folder: str | os.PathLike, *, trajectory: bool) -> Path:
        path = self._put_record(folder)
        made = (self.final or {}).get("trajectory")
        if trajectory and made is not None:
            target = Path(folder) / TRAJECTORY
            if file_stat(target) is not None and self._written.get(target.resolve()) == file_stat(target):
                return path  # this callback's own, unchanged (e.g. save_model() into output_dir after training)
            if not replaceable(target):
                logger.warning("LLMEraserCallback keeps %s, which llmeraser did not write: the run's recording is not "
                               "written there", target)
                return path
            write(made, folder)
            self._written[target.resolve()] = file_stat(target)
        return path

    def _put_record(self, folder: str | os.PathLike) -> Path:
        """FOLDER/training_record.json, unless a file of that name that is not a callback's record is there."""
        path = Path(folder) / RECORD
        if path.exists():
            try:
                ours = read_json(path).get("kind") == "trainer-callback"
            except (UserInputError, AttributeError):
                ours = False
            if not ours:
                logger.warning("LLMEraserCallback keeps %s, which it did not write: its record is not written there",
                               path)
                return path
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
            rendering = self.rendering
            max_length = self.max_length if self.max_length is not None else getattr(args, "max_length", None)
        else:
            raise UserInputError("LLMEraserCallback with transformers' Trainer: the Trainer takes tokenised data, so "
                                 "the callback cannot see how examples were rendered and masked; pass "
                                 "rendering=Rendering(...) (docs/data.md#trainer-callback)")
        if rendering.normalization == "token" and _counts_first_label():
            rendering = dataclasses.replace(rendering, counts_first_label=True)
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
               "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
               "output_dir": str(Path(args.output_dir).resolve())}  # where the run's recording is written
        if record.packing:
            logger.warning("LLMEraserCallback: packing=True mixes examples in one sequence; 'llmeraser unlearn' will "
                           "refuse this adapter (an example's own loss is not defined)")
        return out


def _best_step(args, state) -> int | None:
    """The step of the checkpoint the Trainer loaded when training ended (`load_best_model_at_end`), else None."""
    path = getattr(state, "best_model_checkpoint", None)
    if not getattr(args, "load_best_model_at_end", False) or not path:
        return None
    found = re.fullmatch(r"checkpoint-([0-9]+)", Path(path).name)
    return int(found[1]) if found else None


def _counts_first_label() -> bool:
    """Whether this transformers' Trainer divides a token-weighted step by every label of its batches, position 0's
    included (before 5.10.1, whose `_loss_shifts_labels` counts `labels[..., 1:]`, the tokens the loss sums)."""
    from packaging.version import Version

    return Version(transformers.__version__).release < (5, 10, 1)


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
    dropout = next((d[k] for k in ("lora_dropout", "module_dropout", "rank_dropout") if d.get(k) is not None), None)
    return {"layout": layout, "dropout": dropout}


def _source(trl: bool) -> str:
    import transformers

    if not trl:
        return f"transformers {transformers.__version__} Trainer (LLMEraserCallback)"
    try:
        import trl as trl_package

        return f"trl {trl_package.__version__} SFTTrainer (LLMEraserCallback)"
    except ImportError:
        return "an SFTTrainer-like trainer (LLMEraserCallback)"



def _token_key(ids) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def _plain(value) -> str:
    """An enum's value (TrainingArguments holds OptimizerNames, SchedulerType), else the string."""
    return str(getattr(value, "value", value))
