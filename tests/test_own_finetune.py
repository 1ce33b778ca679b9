"""Bringing your own fine-tune, beyond TRL: chats through llmeraser's own CLI, devices and precision, the checks that
refuse what the update cannot do (quantised bases, tensors cut off from the loss, packing), records that steer how
--train is read, and the prepared GPU script on the CPU."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from llmeraser.cli import main
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.testing import chat_records, tiny_llama, tiny_tokenizer


@pytest.fixture
def chat_root(tmp_path):
    records = chat_records(16, seed=4)
    tok = tiny_tokenizer([m["content"] for r in records for m in r["messages"]], vocab_size=400, chat=True)
    tiny_llama(len(tok), hidden=16, seed=0, dtype=torch.float32, init_std=0.3).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    # a chat set without ids, under another field name: the fine-tune's record says how to read it
    (tmp_path / "chat.json").write_text(json.dumps([{"conversation": r["messages"]} for r in records]))
    return tmp_path


def test_chats_through_llmeraser_finetune_ids_unlearn_and_evaluate(chat_root, capsys):
    root = chat_root
    fields = ["--messages-field", "conversation", "--no-id-field"]
    common = ["--base-model", str(root / "base"), "--quiet"]
    assert main(["data", "ids", "--train", str(root / "chat.json"), *fields, "--grep", "fox"]) == 0
    listing = capsys.readouterr().out
    ids = [line.split()[0] for line in listing.splitlines() if line.startswith("sha-")]
    assert len(ids) >= 2 and "messages" in listing and '"op": "remove"' in listing
    assert main(["finetune", *common, "--train", str(root / "chat.json"), *fields, "--out", str(root / "a"),
                 "--epochs", "2", "--lora-r", "2", "--max-length", "48"]) == 0
    record = json.loads((root / "a" / "report.json").read_text())["task"]
    assert record["data_fields"]["messages_field"] == "conversation" and "id_field" not in record["data_fields"]
    (root / "request.json").write_text(json.dumps({"edits": [
        {"op": "remove", "id": ids[0]}, {"op": "correct_response", "id": ids[1], "response": "The fox likes gold."}]}))
    # no field flags: the adapter's record says how chat.json is read; auto rewinds or replays the recorded fine-tune
    assert main(["unlearn", *common, "--adapter", str(root / "a"), "--train", str(root / "chat.json"),
                 "--request", str(root / "request.json"), "--out", str(root / "u")]) == 0
    report = json.loads((root / "u" / "report.json").read_text())
    assert report["method"] in ("rewind", "path") and "auto chose" in report["update_choice"]
    assert report["ops"] == {"remove": 1, "modify_query": 0, "correct_response": 1}
    capsys.readouterr()
    assert main(["evaluate", *common, "--adapter", str(root / "u"), "--data", str(root / "chat.json"),
                 *fields]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 16 and 0 < summary["loss"] < 20


def test_a_different_training_set_is_warned_about(chat_root, caplog):
    from llmeraser.job import AdapterJob

    root = chat_root
    assert main(["finetune", "--base-model", str(root / "base"), "--quiet", "--train", str(root / "chat.json"),
                 "--messages-field", "conversation", "--no-id-field", "--out", str(root / "a"), "--epochs", "1",
                 "--no-record"]) == 0
    records = json.loads((root / "chat.json").read_text())
    (root / "other.json").write_text(json.dumps(records[:-1]))
    with caplog.at_level(logging.WARNING):
        job = AdapterJob(root / "a", root / "other.json", base_model=str(root / "base"))
        job.check_data(job.train)
    assert any("is not the one" in r.getMessage() and "fine-tuned on" in r.getMessage() for r in caplog.records)


def test_an_output_given_the_set_its_request_was_on_is_told_which_set_it_stands_for(tmp_path):
    """`earlier_request_hint`: only a folder whose report names the given set as the one its request was applied to
    (a single adapter's `train_sha256`, a sharded folder's `input_train_sha256`) gets the hint, naming its request
    file; another set, no report, or an unreadable one: none (the warning or error then says what it said before)."""
    from llmeraser.record import earlier_request_hint

    single, sharded, broken = (tmp_path / n for n in ("single", "sharded", "broken"))
    for folder in (single, sharded, broken):
        folder.mkdir()
    (single / "report.json").write_text(json.dumps({"train_sha256": "aaa", "task": {}}))
    (single / "request.json").write_text("{}")
    (sharded / "report.json").write_text(json.dumps({"input_train_sha256": "bbb"}))
    (sharded / "requests.json").write_text("[]")
    (broken / "report.json").write_text("{not json")
    assert "(request.json)" in earlier_request_hint(single, "aaa") and "--ledger" in earlier_request_hint(single, "aaa")
    assert "(requests.json)" in earlier_request_hint(sharded, "bbb")
    assert earlier_request_hint(single, "bbb") == earlier_request_hint(sharded, "aaa") == ""
    assert earlier_request_hint(broken, "aaa") == earlier_request_hint(tmp_path, "aaa") == ""


def test_devices_dtypes_and_quantised_bases(tmp_path, capsys):
    from fixtures.tiny import save_tiny_base

    from llmeraser.models import load_base_model, resolve_device

    save_tiny_base(tmp_path / "base")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserInputError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    model, _ = load_base_model(str(tmp_path / "base"), dtype="float16", device="cpu")
    assert next(model.parameters()).dtype == torch.float16
    shutil.copytree(tmp_path / "base", tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=r"is quantised \(bitsandbytes\).*float \(or bf16\) checkpoint"):
        load_base_model(str(tmp_path / "q"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "prompt": "p", "response": "r"}) + "\n")
    assert main(["evaluate", "--base-model", str(tmp_path / "base"), "--data", str(tmp_path / "d.jsonl"),
                 "--device", "tpu0"]) == 2
    assert "unknown device 'tpu0'" in capsys.readouterr().err


def test_a_bf16_base_keeps_float32_adapter_gradients_and_solves(tmp_path):
    """A bf16 base: the adapter, Δθ and the solve are float32, and Δθ points where the float32 base's does."""
    from fixtures.tiny import tiny_lineage

    from llmeraser.eraser import EraserArguments
    from llmeraser.job import AdapterJob
    from llmeraser.request import Request
    from llmeraser.updates import UnlearnOptions

    tiny_lineage(tmp_path, "a")
    deltas = {}
    for dtype in ("float32", "bfloat16"):
        job = AdapterJob(tmp_path / "a", tmp_path / "train.jsonl", base_model=str(tmp_path / "base"), dtype=dtype)
        model, _ = job.model_and_task()
        assert next(model.base_model.model.model.embed_tokens.parameters()).dtype == getattr(torch, dtype)
        result = job.unlearn(Request.remove("ex0", "ex3"), tmp_path / f"u-{dtype}",
                             UnlearnOptions(method="first-order", eraser=EraserArguments(solver="cg", damping=0.1)))
        deltas[dtype] = result.update.delta
        assert result.update.delta.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(deltas["float32"], deltas["bfloat16"], dim=0)
    assert cosine > 0.95  # bf16 rounding of the base's activations: measured 0.99+


def test_tensors_cut_off_from_the_loss_are_refused():
    """A fresh LoRA (B = 0) gives A no gradient: the update would silently leave A as it is."""
    from llmeraser.eraser import EraserArguments, compute_update
    from llmeraser.record import LoraSettings, lora_model
    from llmeraser.request import Request
    from llmeraser.task import CausalLMTask
    from llmeraser.testing import fact_examples

    tok = tiny_tokenizer()
    model = lora_model(tiny_llama(len(tok), hidden=16, seed=0), LoraSettings(r=2, targets=("q_proj",)))
    train = fact_examples(8)
    with pytest.raises(ConfigError, match=r"receive no gradient from the edited examples: .*lora_A.*B still zero"):
        compute_update(model, CausalLMTask(tok, max_length=16), train, Request.remove("ex0"),
                       EraserArguments(method="first-order", solver="cg"))


def test_packing_and_a_plain_trainer_without_rendering_are_refused(tmp_path):
    from llmeraser.callback import LLMEraserCallback
    from llmeraser.record import RECORD, TrainingRecord

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / RECORD).write_text(json.dumps({"task": {"max_length": 64, "packing": True}}))
    with pytest.raises(UserInputError, match="packing"):
        TrainingRecord.read(tmp_path / "adapter")

    class Args:  # a plain transformers TrainingArguments has neither field TRL adds
        pass

    with pytest.raises(UserInputError, match="pass rendering=Rendering"):
        LLMEraserCallback(chat_records(2)).build(Args(), None, None)


def test_the_prepared_device_script_runs_on_the_cpu(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import device_check

    assert device_check.main(["--device", "cpu", "--tiny", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "unlearn: rewind" in out and "FAIL" not in out
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert all(ok for _, ok in timings["checks"])
    from llmeraser.solvers.api import solver_names
    from llmeraser.updates import method_names

    ran = {row["step"] for row in timings["rows"]}  # every method, and the one-step update with every solver
    assert {f"unlearn: {m}" for m in method_names()} | {f"unlearn: first-order/{s}" for s in solver_names()} <= ran


def test_a_record_with_an_unknown_rendering_is_refused_by_name(tmp_path):
    from llmeraser.record import RECORD, TrainingRecord

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / RECORD).write_text(json.dumps({"task": {"max_length": 64,
                                                                    "rendering": {"format": "axolotl"}}}))
    with pytest.raises(UserInputError, match=r"training_record.json: 'task': 'rendering': 'format' must be one of "
                                             r"llmeraser, trl, got 'axolotl'"):
        TrainingRecord.read(tmp_path / "adapter")
