"""The callback's record follows the adapter: an SFTTrainer run with `LLMEraserCallback` (tiny chat Llama, the CPU,
checkpoints every epoch), its adapter saved the ways users save it — `trainer.save_model()` into output_dir,
`trainer.save_model(other)`, `model.save_pretrained(other)` — and its checkpoints; `unlearn` finds the run's recording
for each (beside it, or where the run left it, naming where) and rewinds it to what an SFTTrainer retrain gives. A
save after the weights changed carries no record, and the run's recording found for it is refused by name."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from fixtures import trl_runs

from llmeraser.params import ParamView, load_adapter

N, BATCH, ACCUMULATION, EPOCHS = 24, 2, 2, 3
STEP = BATCH * ACCUMULATION
PER_EPOCH = N // STEP  # 6 steps an epoch: checkpoints at 6, 12, 18
# the last step's examples of every epoch: with the sequential sampler a retrain without them takes the very batches
# the recorded run took, less that step (tests/test_trl.py), so its checkpoint after epoch e is at 5e, not 6e
REMOVED = [f"chat{i}" for i in range(N - STEP, N)]
TARGETS = ["q_proj", "v_proj", "o_proj"]


def sft(root, records, out, callback=None, **options):
    """SFTTrainer as a user runs it (`fixtures.trl_runs.sft`), saving a checkpoint every epoch; no save after
    training."""
    return trl_runs.sft(root, records, out, callback, epochs=EPOCHS, targets=TARGETS, batch=BATCH,
                        accumulation=ACCUMULATION, **({"save_strategy": "epoch", "save_only_model": True} | options))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from llmeraser.callback import LLMEraserCallback

    root = tmp_path_factory.mktemp("follows")
    records = trl_runs.chat_setup(root, REMOVED)
    trainer = sft(root, records, root / "out", LLMEraserCallback(root / "chat.jsonl"))
    trainer.save_model()  # into output_dir, where training's end already wrote the record
    trainer.save_model(str(root / "saved"))
    trainer.model.save_pretrained(str(root / "pretrained"))
    retrain = sft(root, [r for r in records if r["id"] not in REMOVED], root / "retrain")
    retrain.save_model()
    return root, trainer


def theta(root, folder):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager")
    return ParamView(load_adapter(base, folder)).vector()


def unlearn(root, adapter, out, method="auto"):
    from llmeraser.job import AdapterJob
    from llmeraser.updates import UnlearnOptions

    job = AdapterJob(adapter, root / "chat.jsonl", base_model=str(root / "base"))
    return job.unlearn(root / "request.json", out, UnlearnOptions(method=method)).report


def assert_is_the_retrain(root, original, unlearned, retrained):
    """The rewind is the SFTTrainer retrain: the same batches and rates, float32 rounding in another order (torch's
    fused AdamW and the Trainer's forward against llmeraser's replay: < 1e-4 of the distance travelled in
    tests/test_trl.py), so within 1e-3 of the distance the removal makes."""
    original, unlearned, retrained = (theta(root, f) for f in (original, unlearned, retrained))
    gap = float((original - retrained).norm())
    assert gap > 0.05  # the removal matters
    assert float((unlearned - retrained).norm()) < 1e-3 * gap


def test_save_model_into_output_dir_keeps_the_record_beside_it(run, tmp_path):
    root, _ = run
    out = root / "out"
    assert (out / "training_record.json").is_file() and (out / "trajectory.safetensors").is_file()
    report = unlearn(root, out, tmp_path / "u")
    assert report["method"] in ("rewind", "path") and "recording" not in report["trajectory"]["verified"]


@pytest.mark.parametrize("saved", ["saved", "pretrained"])
def test_a_save_elsewhere_carries_the_record(run, tmp_path, saved):
    """`trainer.save_model(other)` and `model.save_pretrained(other)` after training: the record and the recording
    are written beside the adapter (the recording equal to the run's), and unlearn rewinds it to the retrain."""
    root, _ = run
    folder = root / saved
    assert (folder / "training_record.json").read_text() == (root / "out" / "training_record.json").read_text()
    assert (folder / "trajectory.safetensors").read_bytes() == (root / "out" / "trajectory.safetensors").read_bytes()
    report = unlearn(root, folder, tmp_path / "u", method="rewind" if saved == "saved" else "auto")
    assert report["method"] in ("rewind", "path") and "recording" not in report["trajectory"]["verified"]
    if saved == "saved":
        assert report["rewind"]["rewound_to"] == PER_EPOCH - 1  # the first epoch's last step held the removed
        assert_is_the_retrain(root, folder, tmp_path / "u", root / "retrain")


def test_a_checkpoint_rewinds_the_runs_first_steps(run, tmp_path):
    """checkpoint-12 (after two of three epochs) is not the run's end: it gets the record and a pointer to the run's
    recording with its step, and unlearn cuts the run's recording to its first 12 steps, names where it came from,
    and rewinds to the retrain's own checkpoint after two epochs (checkpoint-10: 5 steps an epoch)."""
    root, _ = run
    checkpoint = root / "out" / f"checkpoint-{2 * PER_EPOCH}"
    assert (checkpoint / "training_record.json").is_file() and not (checkpoint / "trajectory.safetensors").exists()
    pointer = json.loads((checkpoint / "llmeraser_recording.json").read_text())
    assert pointer["steps"] == 2 * PER_EPOCH and pointer["relative"] == ".."
    report = unlearn(root, checkpoint, tmp_path / "u", method="rewind")
    source = report["trajectory"]["verified"]["recording"]
    assert str(root / "out" / "trajectory.safetensors") in source and "llmeraser_recording.json" in source
    assert f"first {2 * PER_EPOCH} of {EPOCHS * PER_EPOCH} steps" in source
    assert report["trajectory"]["steps"] == 2 * PER_EPOCH and report["rewind"]["rewound_to"] == PER_EPOCH - 1
    assert_is_the_retrain(root, checkpoint, tmp_path / "u", root / "retrain" / f"checkpoint-{2 * (PER_EPOCH - 1)}")
    # auto takes it too
    assert unlearn(root, checkpoint, tmp_path / "a")["method"] in ("rewind", "path")


def test_a_checkpoint_without_a_pointer_is_tied_to_the_run_by_the_replay(run, tmp_path):
    """A checkpoint of an older callback (record, no pointer): the recording in the folder above `checkpoint-N` is
    cut to N steps; with no hash of the checkpoint's weights, the replay of the recorded gradients (which must end at
    them) is what ties it, and the report says so. Cut to a wrong N (a renamed folder), that replay refuses it."""
    root, _ = run
    for n in (PER_EPOCH, PER_EPOCH + 1):
        old = tmp_path / f"run{n}"
        shutil.copytree(root / "out" / f"checkpoint-{PER_EPOCH}", old / f"checkpoint-{n}")
        (old / f"checkpoint-{n}" / "llmeraser_recording.json").unlink()
        shutil.copy(root / "out" / "trajectory.safetensors", old)
    from llmeraser.job import AdapterJob

    job = AdapterJob(tmp_path / f"run{PER_EPOCH}" / f"checkpoint-{PER_EPOCH}", root / "chat.jsonl",
                     base_model=str(root / "base"))
    found, why = job.trajectory(job.train)
    assert found is not None, why
    assert "the Trainer run above" in found.verification["recording"] and "replay ties" in found.verification["end"]
    assert found.steps == PER_EPOCH
    wrong = AdapterJob(tmp_path / f"run{PER_EPOCH + 1}" / f"checkpoint-{PER_EPOCH + 1}", root / "chat.jsonl",
                       base_model=str(root / "base"))
    found, why = wrong.trajectory(wrong.train)
    assert found is None and "the run's recording" in why and "replaying the recorded gradients" in why


def test_an_adapter_without_its_recording_finds_the_runs_output_dir(run, tmp_path, caplog):
    """Without a recording beside the adapter: the record's `output_dir` names the run's folder; an older callback's
    record has none, and `trainer.save_model(other)` wrote training_args.bin (a pickle: its output_dir is read from
    the opcodes, never unpickled). unlearn takes the recording there and names it."""
    from llmeraser.recording import locate, trainer_output_dir

    root, _ = run
    shutil.copytree(root / "saved", tmp_path / "copied")
    (tmp_path / "copied" / "trajectory.safetensors").unlink()
    found = locate(tmp_path / "copied")
    assert not found.beside and "training_record.json" in found.where and found.trajectory.steps == EPOCHS * PER_EPOCH
    shutil.copytree(tmp_path / "copied", tmp_path / "old")
    record = json.loads((tmp_path / "old" / "training_record.json").read_text())
    del record["output_dir"]
    (tmp_path / "old" / "training_record.json").write_text(json.dumps(record))
    assert trainer_output_dir(tmp_path / "old") == str(root / "out")
    from llmeraser.cli import main

    with caplog.at_level(logging.WARNING):
        assert main(["unlearn", "--base-model", str(root / "base"), "--adapter", str(tmp_path / "old"), "--train",
                     str(root / "chat.jsonl"), "--request", str(root / "request.json"), "--out",
                     str(tmp_path / "u")]) == 0
    said = "\n".join(r.getMessage() for r in caplog.records)  # the CLI's log (stderr outside pytest)
    report = json.loads((tmp_path / "u" / "report.json").read_text())
    assert report["method"] in ("rewind", "path")
    source = report["trajectory"]["verified"]["recording"]
    assert str(root / "out" / "trajectory.safetensors") in source and "training_args.bin" in source
    assert "not beside it" in said and str(root / "out" / "trajectory.safetensors") in said


def test_a_save_after_the_weights_changed_carries_no_record(run, tmp_path, caplog):
    """The model changed after training: its saves get no record (a warning says why); `unlearn` on such an adapter
    saved by the Trainer finds the run's recording through training_args.bin and refuses it by name (it does not end
    at these weights: auto would take the one-step update, saying so); a user's file of the record's name is never
    replaced."""
    from llmeraser.job import AdapterJob

    root, trainer = run
    model = trainer.model
    view = ParamView(model)
    trained = view.vector()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "training_record.json").write_text('{"mine": true}')
    with caplog.at_level(logging.WARNING):
        # a deep copy of the trained model saves with the record too; its wrapper is bound to the copy: the copy's
        # own weights are saved and checked (changed, the copy's save gets no record)
        twin = copy.deepcopy(model)
        twin.save_pretrained(str(tmp_path / "copy"))
        assert (tmp_path / "copy" / "trajectory.safetensors").is_file()
        ParamView(twin).add_(torch.full_like(trained, 1e-3))
        twin.save_pretrained(str(tmp_path / "copy2"))
        assert not (tmp_path / "copy2" / "trajectory.safetensors").exists()
        assert float((theta(root, tmp_path / "copy2") - trained).abs().max()) > 5e-4  # the copy's weights, saved
        model.save_pretrained(str(tmp_path / "mine"))
        assert (tmp_path / "mine" / "training_record.json").read_text() == '{"mine": true}'
        assert any("which it did not write" in r.getMessage() for r in caplog.records)
        try:
            view.add_(torch.full_like(trained, 1e-3))
            trainer.save_model(str(tmp_path / "changed"))
            model.save_pretrained(str(tmp_path / "changed2"))
        finally:
            view.set_vector(trained)
    assert sum("no longer the ones training ended at" in r.getMessage() for r in caplog.records) == 3
    for folder in ("changed", "changed2"):
        assert (tmp_path / folder / "adapter_model.safetensors").is_file()
        assert not (tmp_path / folder / "training_record.json").exists()
        assert not (tmp_path / folder / "trajectory.safetensors").exists()
    job = AdapterJob(tmp_path / "changed", root / "chat.jsonl", base_model=str(root / "base"))
    found, why = job.trajectory(job.train)
    assert found is None and str(root / "out" / "trajectory.safetensors") in why
    assert "does not end at the adapter's weights" in why
    job = AdapterJob(tmp_path / "changed2", root / "chat.jsonl", base_model=str(root / "base"))
    found, why = job.trajectory(job.train)
    assert found is None and "has no trajectory.safetensors" in why and "LLMEraserCallback" in why


def test_load_best_model_at_end_cuts_the_recording_to_the_best_checkpoint(run, tmp_path):
    """With load_best_model_at_end the model training ends with is the best checkpoint's (here the first epoch's:
    "best" is the highest eval loss, which falls as the run memorises), so the recording that follows it is the run's
    first steps, and its rewind is the retrain's checkpoint after as many epochs."""
    from llmeraser.callback import LLMEraserCallback

    root, _ = run
    records = [json.loads(line) for line in (root / "chat.jsonl").read_text().splitlines()]
    trainer = sft(root, records, tmp_path / "out", LLMEraserCallback(root / "chat.jsonl"), eval_strategy="epoch",
                  load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                  save_only_model=False)
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best < EPOCHS * PER_EPOCH  # a checkpoint before the end was loaded
    trainer.save_model(str(tmp_path / "best"))
    report = unlearn(root, tmp_path / "best", tmp_path / "u", method="rewind")
    assert report["trajectory"]["steps"] == best
    epochs = best // PER_EPOCH
    assert_is_the_retrain(root, tmp_path / "best", tmp_path / "u",
                          root / "retrain" / f"checkpoint-{epochs * (PER_EPOCH - 1)}")
