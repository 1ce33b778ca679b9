"""An adapter fine-tuned with TRL's SFTTrainer on a chat set, on the CPU, with `LLMEraserCallback`: its training record
and recorded run, the objective `unlearn` differentiates (TRL's own loss), and `unlearn` through the CLI against an
SFTTrainer retrain on the edited set."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import transformers
from fixtures import trl_runs
from packaging.version import Version

from llmeraser.cli import main
from llmeraser.params import ParamView, load_adapter
from llmeraser.record import TrainingRecord
from llmeraser.testing import chat_records

N, BATCH, ACCUMULATION, EPOCHS = 24, 2, 2, 4
STEP = BATCH * ACCUMULATION
# the last step's examples of every epoch: with the sequential sampler, retraining without them takes the very batches
# the recorded run took, less that step
REMOVED = [f"chat{i}" for i in range(N - STEP, N)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# transformers' Trainer before 5.10.1 counts a step's tokens over every label, position 0's too (docs/install.md)
FIRST_COUNTED = Version(transformers.__version__).release < (5, 10, 1) or None


def sft(root, records, out, callback=None, **options):
    """SFTTrainer as a user runs it (`fixtures.trl_runs.sft`), saved to `out` after training."""
    trainer = trl_runs.sft(root, records, out, callback, epochs=EPOCHS, targets=TARGETS, batch=BATCH,
                           accumulation=ACCUMULATION, **options)
    trainer.save_model(str(out))
    return trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from llmeraser.callback import LLMEraserCallback

    root = tmp_path_factory.mktemp("trl")
    records = trl_runs.chat_setup(root, REMOVED)
    trainer = sft(root, records, root / "adapter", LLMEraserCallback(root / "chat.jsonl"))
    sft(root, [r for r in records if r["id"] not in REMOVED], root / "retrain")
    return root, trainer


def test_the_callback_writes_what_the_update_needs(run):
    root, _ = run
    record = TrainingRecord.read(root / "adapter")
    assert not record.assumed and record.max_length == 48 and record.l2 == 0.0
    r = record.rendering
    assert (r.format, r.normalization, r.assistant_only, r.completion_only) == ("trl", "token", False, True)
    assert r.chat_template and r.eos_token == "</s>"
    assert record.optimizer["weight_decay"] == 0.01 and record.optimizer["gradient_accumulation_steps"] == 2
    assert record.optimizer["name"].startswith("adamw_torch") and record.lora["kind"] == "lora"
    assert record.source.startswith("trl ") and record.dropout == 0.0
    assert any("decoupled weight decay" in n for n in record.notes())
    assert (root / "adapter" / "trajectory.safetensors").is_file()


def test_the_objective_is_trls_own_loss(run):
    """Σᵢ ℓᵢ · t̄ / Σ tokens over a batch equals the token-mean loss transformers computes for it, on the records
    as TRL prepared them: the rendering, masks and weighting are the ones the adapter was trained with."""
    root, trainer = run
    from llmeraser.job import AdapterJob
    from llmeraser.task import IGNORE_INDEX, per_example_loss

    job = AdapterJob(root / "adapter", root / "chat.jsonl", base_model=str(root / "base"))
    model, task = job.model_and_task()
    rows = [trainer.train_dataset[i] for i in range(6)]
    inputs = trainer.data_collator(rows)
    with torch.no_grad():
        theirs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       labels=inputs["labels"]).loss
        ours = per_example_loss(task, model, task.collate(job.train[:6]))
    tokens = sum(int((torch.tensor(r["labels"][1:]) != IGNORE_INDEX).sum()) for r in rows)
    counted = sum(int((torch.tensor(r["labels"][0 if FIRST_COUNTED else 1 :]) != IGNORE_INDEX).sum()) for r in rows)
    assert task.rendering.counts_first_label == FIRST_COUNTED
    assert task.step_scale(job.train[:6]) == pytest.approx(task.token_scale / counted)  # the Trainer's step
    # float32 sums in a different order: a few ulps of the loss
    assert float(ours.sum() * task.token_scale / tokens) == pytest.approx(float(theirs), rel=1e-5)


def test_the_recorded_run_replays_to_the_adapter(run):
    """The recording's per-step gradients (before clipping) match ours at the recorded states, and llmeraser's AdamW
    replaying them (decay, clipping, accumulation, the lr of each step) ends at the adapter the Trainer saved."""
    root, _ = run
    from llmeraser.finetune import step_gradient
    from llmeraser.job import AdapterJob

    job = AdapterJob(root / "adapter", root / "chat.jsonl", base_model=str(root / "base"))
    model, task = job.model_and_task()
    trajectory, why = job.trajectory(job.train)
    assert trajectory is not None, why
    assert trajectory.steps == EPOCHS * N // STEP
    view = ParamView(model)
    theta_hat = view.vector()
    steps = trajectory.schedule(job.train)
    for k, theta, _ in trajectory.states(stop=8):
        view.set_vector(theta)
        g, _ = step_gradient(model, task, job.train, steps[k], view)
        # float32 forward/backward in another order (padding, logits kept): relative rounding, ~1e-6
        assert float((g - trajectory.grads[k]).norm() / trajectory.grads[k].norm()) < 1e-4, k
    moved = float((theta_hat - trajectory.theta0).norm())
    assert float((trajectory.final() - theta_hat).norm()) < 1e-4 * moved  # torch's fused AdamW vs ours: rounding


def test_unlearn_rewinds_to_what_an_sfttrainer_retrain_gives(run, tmp_path, capsys):
    root, _ = run
    common = ["--base-model", str(root / "base"), "--adapter", str(root / "adapter"), "--train",
              str(root / "chat.jsonl"), "--request", str(root / "request.json"), "--quiet"]
    assert main(["unlearn", *common, "--out", str(tmp_path / "u"), "--method", "rewind"]) == 0
    report = json.loads((tmp_path / "u" / "report.json").read_text())
    assert report["method"] == "rewind" and report["task"]["rendering"]["format"] == "trl"
    assert report["rewind"]["rewound_to"] == N // STEP - 1  # the first epoch's last step held the removed examples

    def theta(folder):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager")
        return ParamView(load_adapter(base, folder)).vector()

    original, unlearned, retrained = theta(root / "adapter"), theta(tmp_path / "u"), theta(root / "retrain")
    gap = float((original - retrained).norm())
    assert gap > 0.1  # the removal matters
    # the same batches and rates, float32 rounding in another order: the rewind is the SFTTrainer retrain
    assert float((unlearned - retrained).norm()) < 1e-3 * gap
    # path replay with every step exact is that same retraining (its kept-gradient algebra under the token-weighted
    # step loss, clipping and decay adds nothing when nothing is predicted)
    assert main(["unlearn", *common, "--out", str(tmp_path / "p"), "--method", "path", "--path-exact-every", "1",
                 "--path-exact-tail", "0"]) == 0
    assert float((theta(tmp_path / "p") - unlearned).norm()) < 1e-5 * gap
    # with no options, auto picks one of the two and says why
    capsys.readouterr()
    assert main(["unlearn", *common, "--out", str(tmp_path / "a")]) == 0
    assert "auto chose" in capsys.readouterr().out
    # the rewound adapter carries its own recording: a second request in a ledger lineage rewinds again
    ledger = ["--ledger", str(tmp_path / "ledger")]
    assert main(["unlearn", *common, "--out", str(tmp_path / "l1"), "--method", "rewind", *ledger]) == 0
    (tmp_path / "second.json").write_text(json.dumps({"edits": [{"op": "correct_response", "id": "chat3",
                                                                 "response": "The owl likes blue."}]}))
    second = [a if a != str(root / "request.json") else str(tmp_path / "second.json") for a in common]
    second[second.index("--adapter") + 1] = str(tmp_path / "l1")
    assert main(["unlearn", *second, "--out", str(tmp_path / "l2"), "--method", "rewind", *ledger]) == 0
    chained = json.loads((tmp_path / "l2" / "report.json").read_text())
    assert chained["method"] == "rewind" and chained["rewind"]["steps"] == trajectory_steps(tmp_path / "l1")
    # and the one-step update runs on the same record (no trajectory needed): TRL's objective, the decay noted
    assert main(["unlearn", *common, "--out", str(tmp_path / "f"), "--method", "first-order", "--solver", "cg"]) == 0
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert report["method"] == "first-order" and any("weight decay" in n for n in report["record_notes"])


def trajectory_steps(adapter) -> int:
    from llmeraser.recording import read

    return read(adapter).steps


def test_a_plain_trainer_with_its_own_tokenisation_is_recorded_and_rewound(run, tmp_path):
    """transformers' Trainer on data the user tokenised (here llmeraser's rendering with the Trainer's token-mean
    loss): the callback, told the rendering, records the run, and a rewind replays it to the adapter's state."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from llmeraser.callback import LLMEraserCallback
    from llmeraser.data import load_examples
    from llmeraser.job import AdapterJob
    from llmeraser.task import IGNORE_INDEX, CausalLMTask, Rendering

    root, _ = run
    rendering = Rendering(format="llmeraser", normalization="token")
    tok = AutoTokenizer.from_pretrained(root / "base")
    train = load_examples(root / "chat.jsonl")
    task = CausalLMTask(tok, max_length=48, rendering=rendering)
    rows = [dict(zip(("input_ids", "labels"), task.encode(e), strict=True)) for e in train]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        return {"input_ids": torch.tensor(pad([r["input_ids"] for r in batch], tok.pad_token_id)),
                "labels": torch.tensor(pad([r["labels"] for r in batch], IGNORE_INDEX)),
                "attention_mask": torch.tensor(pad([[1] * len(r["input_ids"]) for r in batch], 0))}

    set_seed(0)
    base = AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, weight_decay=0.01, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate,
                      callbacks=[LLMEraserCallback(train, rendering=rendering, max_length=48, tokenizer=tok)])
    trainer.train()
    trainer.save_model(str(tmp_path / "plain"))
    record = TrainingRecord.read(tmp_path / "plain")
    assert record.rendering == dataclasses.replace(rendering, counts_first_label=FIRST_COUNTED)
    assert record.source.startswith("transformers ") and record.max_length == 48
    job = AdapterJob(tmp_path / "plain", root / "chat.jsonl", base_model=str(root / "base"))
    trajectory, why = job.trajectory(job.train)
    assert trajectory is not None, why
    assert trajectory.steps == 2 * N // 4
    model, _ = job.model_and_task()
    theta_hat = ParamView(model).vector()
    assert float((trajectory.final() - theta_hat).norm()) < 1e-4 * float((theta_hat - trajectory.theta0).norm())


def test_without_a_tokenizer_the_callback_records_no_run_but_never_stops_training(run, tmp_path, caplog):
    import logging

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from llmeraser.callback import LLMEraserCallback
    from llmeraser.data import parse_records
    from llmeraser.task import CausalLMTask, Rendering

    root, _ = run
    tok = AutoTokenizer.from_pretrained(root / "base")
    records = chat_records(4, seed=2)
    task = CausalLMTask(tok, max_length=48)
    examples = parse_records([(f"record {i}", r) for i, r in enumerate(records)])
    rows = [dict(zip(("input_ids", "labels"), task.encode(e), strict=True)) for e in examples]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), LoraConfig(target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=1, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    with caplog.at_level(logging.WARNING):
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                callbacks=[LLMEraserCallback(records, rendering=Rendering(), max_length=48)]).train()
    assert any("records no trajectory: no tokenizer" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "o" / "training_record.json").is_file()
    assert not (tmp_path / "o" / "trajectory.safetensors").exists()


def test_shards_trained_under_sfttrainer_assemble_and_rewind_to_an_sfttrainer_retrain(run, tmp_path):
    """`ShardPlan`: each shard trained by SFTTrainer with the callback into the plan's folder, assembled (router
    included) into a sharded folder; a removal rewinds only its shard, to what an SFTTrainer retrain of that shard on
    its edited records gives (the same tolerance as the single adapter's rewind above: float32 rounding in another
    order)."""
    from llmeraser.callback import LLMEraserCallback
    from llmeraser.errors import AdapterError
    from llmeraser.request import Request
    from llmeraser.sharded import ShardPlan, unlearn_sharded

    root, _ = run
    records = [r | {"user": f"u{i % 4}"} for i, r in enumerate(chat_records(N, seed=2))]
    plan = ShardPlan(records, tmp_path / "sharded", shards=2, by="user")
    for name in plan.names:
        sft(root, plan.records(name), plan.folder(name), LLMEraserCallback(plan.records(name)))
    untrained = ShardPlan(records, tmp_path / "untrained", shards=2, by="user")
    with pytest.raises(AdapterError, match="does not exist"):
        untrained.assemble(base_model=str(root / "base"))
    swapped = ShardPlan(records, tmp_path / "swapped", shards=2, by="user")
    for name, other in zip(swapped.names, reversed(plan.names), strict=True):  # each trained on the other's part
        shutil.copytree(plan.folder(other), swapped.folder(name))
    with pytest.raises(AdapterError, match="not trained on exactly its part"):
        swapped.assemble(base_model=str(root / "base"))
    assert not (tmp_path / "swapped").exists()
    sharded = plan.assemble(base_model=str(root / "base"))
    assert not plan.staging.exists() and sharded.partition.sizes() == [12, 12]
    gone = plan.records(plan.names[1])[-1]["id"]
    report = unlearn_sharded(tmp_path / "sharded", plan.examples, Request.remove(gone), tmp_path / "out",
                             base_model=str(root / "base"))
    assert report["touched_shards"] == [plan.names[1]]
    sft(root, [r for r in plan.records(plan.names[1]) if r["id"] != gone], tmp_path / "retrain")

    def theta(folder):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager")
        return ParamView(load_adapter(base, folder)).vector()

    original, unlearned = theta(tmp_path / "sharded" / plan.names[1]), theta(tmp_path / "out" / plan.names[1])
    retrained = theta(tmp_path / "retrain")
    gap = float((original - retrained).norm())
    assert gap > 0.01 and float((unlearned - retrained).norm()) < 1e-3 * gap
