"""Nothing read is trusted unchecked: a recording (trajectory.safetensors) or a training record that was flipped,
edited or forged is refused by name before any replay — `--method rewind` / `path` exit 2, `auto` falls back to the
one-step update and says why — and never yields an adapter whose report claims an exactness it does not have.

The world is the one the issue reproduces: `finetune --lora-r 2 --max-length 24 --epochs 3 --lr 1e-2` on
`fact_examples(40, seed=1)`, request: remove `ex3`.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from fixtures.tiny import fact_examples, save_tiny_base
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from llmeraser.cli import main
from llmeraser.data import save_examples
from llmeraser.recording import _header_sha256
from llmeraser.trajectory import TRAJECTORY


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    save_tiny_base(root / "base")
    save_examples(fact_examples(40, seed=1), root / "train.jsonl")
    (root / "request.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex3"}]}))
    assert main(["finetune", "--base-model", str(root / "base"), "--train", str(root / "train.jsonl"), "--out",
                 str(root / "adapter"), "--lora-r", "2", "--lora-targets", "q_proj", "--max-length", "24",
                 "--epochs", "3", "--lr", "1e-2", "--quiet"]) == 0
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def unlearn(capsys, world: Path, adapter: Path, method: str, *extra: str) -> tuple[int, str, Path]:
    """Run unlearn on `adapter`; the inputs must be byte-identical afterwards whatever the outcome."""
    out = adapter.parent / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    before = _files(adapter) | _files(world / "base")
    capsys.readouterr()
    code = main(["unlearn", "--base-model", str(world / "base"), "--adapter", str(adapter), "--train",
                 str(world / "train.jsonl"), "--request", str(world / "request.json"), "--out", str(out),
                 "--method", method, "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert _files(adapter) | _files(world / "base") == before
    return code, err, out


def copy_adapter(world: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(world / "adapter", dst)
    return dst


def refused(capsys, world, adapter, *phrases: str, method: str = "rewind") -> str:
    """`--method rewind` exits 2 with one line naming the problem and writes nothing."""
    code, err, out = unlearn(capsys, world, adapter, method)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("llmeraser: error:"), err
    for phrase in phrases:
        assert phrase in err, err
    assert not out.exists()
    return err


def falls_back(capsys, world, adapter, phrase: str) -> None:
    """`--method auto` takes the one-step update and its report says why the recording was not used."""
    code, err, out = unlearn(capsys, world, adapter, "auto")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "first-order" and phrase in report["update_choice"], report["update_choice"]


def edit_header(adapter: Path, change, *, reseal: bool = True) -> None:
    """Rewrite trajectory.safetensors' header with `change(header)` applied; `reseal`: recompute its digest (a
    forger's edit), else leave the old one (an edit by hand)."""
    path = adapter / TRAJECTORY
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["llmeraser"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(header)
    if reseal:
        header["header_sha256"] = _header_sha256({k: v for k, v in header.items() if k != "header_sha256"})
    save_file(tensors, str(path), metadata={"llmeraser": json.dumps(header)})


# ------------------------------------------------------------------------------------------------ the clean case
def test_a_clean_recording_is_verified_and_rewound(capsys, world, tmp_path):
    code, err, out = unlearn(capsys, world, world / "adapter", "rewind")
    assert code == 0, err
    trajectory = json.loads((out / "report.json").read_text())["trajectory"]
    assert trajectory["integrity"].startswith("header and every tensor verified")
    assert set(trajectory["verified"]) == {"recipe", "path", "gradients"}


# ------------------------------------------------------------------------------------------------ byte flips
def _data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_a_flipped_byte_anywhere_in_the_tensors_is_refused_naming_it(capsys, world, tmp_path_factory, where, mask):
    adapter = copy_adapter(world, tmp_path_factory.mktemp("flip"))
    path = adapter / TRAJECTORY
    data = bytearray(path.read_bytes())
    start = _data_start(path)
    offset = start + int(where * (len(data) - start))
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    refused(capsys, world, adapter, "fails its checksum")


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_a_flipped_byte_in_the_header_is_refused(capsys, world, tmp_path_factory, where, mask):
    adapter = copy_adapter(world, tmp_path_factory.mktemp("flip"))
    path = adapter / TRAJECTORY
    data = bytearray(path.read_bytes())
    data[int(where * _data_start(path))] ^= mask
    path.write_bytes(bytes(data))
    refused(capsys, world, adapter, str(path))


def test_a_flipped_gradient_names_its_step_and_auto_falls_back(capsys, world, tmp_path):
    adapter = copy_adapter(world, tmp_path)
    path = adapter / TRAJECTORY
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["grads"][5, 7] += 1e-3
    save_file(tensors, str(path), metadata=header)
    refused(capsys, world, adapter, "step 5's recorded gradient fails its checksum")
    falls_back(capsys, world, adapter, "step 5's recorded gradient fails its checksum")


# ------------------------------------------------------------------------------------------------ edited headers
def test_a_header_edited_by_hand_is_refused(capsys, world, tmp_path):
    adapter = copy_adapter(world, tmp_path)
    edit_header(adapter, lambda h: h.update(lr=0.02), reseal=False)
    refused(capsys, world, adapter, "header does not match its recorded sha256")


@pytest.mark.parametrize("change, phrase", [
    ({"lr": 0.02}, "the header's learning rates, betas"),
    ({"l2": 0.5}, "the header's learning rates, betas"),
    ({"weight_decay": 0.1}, "the header's learning rates, betas"),
    ({"beta2": 0.99}, "the header's learning rates, betas"),
    ({"seed": 1}, "step 0's gradient recomputed"),
])
def test_a_forged_recipe_is_caught_by_replaying_it(capsys, world, tmp_path, change, phrase):
    """Edits whose digest was recomputed: replaying the recorded gradients with the edited optimiser no longer ends
    at the adapter, and another seed's batches no longer give the recorded gradients."""
    adapter = copy_adapter(world, tmp_path)
    edit_header(adapter, lambda h: h.update(change))
    refused(capsys, world, adapter, phrase)


def test_forged_batches_are_caught_by_their_gradients(capsys, world, tmp_path):
    """A recorded schedule injected into llmeraser's recording (two steps' batches swapped)."""
    from llmeraser.data import load_examples
    from llmeraser.trajectory import schedule

    train = load_examples(world / "train.jsonl")
    steps = schedule(train, seed=0, epochs=3, batch_size=8)
    batches = [[train[i].id for i in b] for b in steps]
    batches[0], batches[1] = batches[1], batches[0]

    def change(h):
        h.update(batches=batches, lrs=[h["lr"]] * len(batches))

    adapter = copy_adapter(world, tmp_path)
    edit_header(adapter, change)
    refused(capsys, world, adapter, "step 0's gradient recomputed")


@pytest.mark.parametrize("change, phrase", [
    ({"lr": "0.01"}, "'lr' must be a number"),
    ({"lr": -0.01}, "'lr' must be ≥ 0"),
    ({"beta1": 1}, "'beta1' must be < 1"),
    ({"eps": 0}, "'eps' must be > 0"),
    ({"epochs": 3.5}, "'epochs' must be a whole number"),
    ({"epochs": 1e9}, "'epochs' must be ≤ 1000"),
    ({"batch_size": 0}, "'batch_size' must be ≥ 1"),
    ({"lrs": [0.01] * 15}, "needs both 'batches' and 'lrs'"),
    ({"lrs": [0.01] * 3, "batches": [["ex1"]] * 3}, "'batches' has 3 entries, expected 15"),
    ({"steps": True}, "'steps' must be a number"),
    ({"final_sha256": 7}, "'final_sha256' must be a string"),
    ({"recipe": {"max_length": 4}}, "max length"),
])
def test_malformed_header_values_are_refused_by_field(capsys, world, tmp_path, change, phrase):
    adapter = copy_adapter(world, tmp_path)
    edit_header(adapter, lambda h: h.update(change))
    refused(capsys, world, adapter, phrase)


def test_auto_falls_back_on_a_malformed_header(capsys, world, tmp_path):
    adapter = copy_adapter(world, tmp_path)
    edit_header(adapter, lambda h: h.update(beta1=1))
    falls_back(capsys, world, adapter, "'beta1' must be < 1")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["lr", "beta1", "beta2", "eps", "l2", "weight_decay", "max_grad_norm", "epochs",
                             "batch_size", "seed", "steps", "checkpoint_every", "n_train", "train_sha256",
                             "final_sha256", "batches", "lrs", "recipe"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                       st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                       st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                max_size=2)))
def test_any_header_value_is_refused_or_replays_exactly(capsys, world, tmp_path_factory, name, value):
    """Whatever one header field is set to (digest recomputed): exit 2 naming a problem, or — when the value changes
    nothing the replay reads — the rewind still succeeds; never exit 1."""
    adapter = copy_adapter(world, tmp_path_factory.mktemp("fuzz"))
    edit_header(adapter, lambda h: h.update({name: value}))
    code, err, _ = unlearn(capsys, world, adapter, "rewind")
    assert code in (0, 2), err
    assert code == 0 or (len(err.splitlines()) == 1 and err.startswith("llmeraser: error:")), err


# ------------------------------------------------------------------------------------------------ the objective
def test_a_different_max_length_is_refused_for_a_replay(capsys, world):
    code, err, out = unlearn(capsys, world, world / "adapter", "rewind", "--max-length", "4")
    assert code == 2 and "max length 24" in err and "4" in err and not out.exists(), err


def _edit_record(adapter: Path, change) -> None:
    path = adapter / "report.json"
    report = json.loads(path.read_text())
    change(report["task"])
    path.write_text(json.dumps(report))


@pytest.mark.parametrize("change, phrase", [
    (lambda t: t.update(max_length=4), "max length 24"),
    (lambda t: t.update(rendering={"format": "trl"}), "rendering"),
])
def test_an_edited_record_is_refused_for_a_replay(capsys, world, tmp_path, change, phrase):
    adapter = copy_adapter(world, tmp_path)
    _edit_record(adapter, change)
    refused(capsys, world, adapter, phrase)


@pytest.mark.parametrize("text, phrase", [
    ('{"task": {"max_length": "abc"}}', "'max_length' must be a number"),
    ('{"task": {"max_length": 1e400}}', "'max_length' must be finite"),
    ('{"task": {"max_length": [24]}}', "'max_length' must be a number"),
    ('{"task": {"max_length": 0}}', "'max_length' must be ≥ 2"),
    ('{"task": {"max_length": 24, "l2": "abc"}}', "'l2' must be a number"),
    ('{"task": {"max_length": 24, "data_fields": ["id"]}}', "'data_fields' must be a JSON object"),
    ('{"task": {"max_length": 24, "data_fields": {"id_field": 3}}}', "'id_field' must be a string"),
    ('{"task": {"max_length": 24, "optimizer": "adamw"}}', "'optimizer' must be a JSON object"),
    ('{"task": {"max_length": 24, "dropout": "0.1"}}', "'dropout' must be a number"),
    ('{"task": {"max_length": 24, "train_sha256": 12}}', "'train_sha256' must be a string"),
    ('{"task": {"max_length": 24, "rendering": {"format": "other"}}}', "'format' must be one of"),
    ('{"task": ' + "[" * 200_000 + "]" * 200_000 + "}", "levels deep"),
    ("{not json", "is not valid JSON"),
])
@pytest.mark.parametrize("name", ["report.json", "training_record.json"])
def test_a_malformed_record_is_refused_by_file_and_field(capsys, world, tmp_path, text, phrase, name):
    adapter = copy_adapter(world, tmp_path)
    (adapter / name).write_text(text)
    err = refused(capsys, world, adapter, phrase, method="first-order")
    assert name in err


# ------------------------------------------------------------------------------------------------ other shapes
def test_a_fifo_named_like_the_recording_is_not_taken_for_a_missing_one(capsys, world, tmp_path):
    import os

    adapter = copy_adapter(world, tmp_path)
    (adapter / TRAJECTORY).unlink()
    os.mkfifo(adapter / TRAJECTORY)
    refused(capsys, world, adapter, "not a regular file")


def test_a_checkpoint_only_recording_is_checksummed(capsys, world, tmp_path):
    root = tmp_path
    assert main(["finetune", "--base-model", str(world / "base"), "--train", str(world / "train.jsonl"), "--out",
                 str(root / "adapter"), "--lora-r", "2", "--lora-targets", "q_proj", "--max-length", "24",
                 "--epochs", "3", "--lr", "1e-2", "--record-max-gib", "1e-6", "--quiet"]) == 0
    path = root / "adapter" / TRAJECTORY
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert "grads" not in tensors and any(k.startswith("ckpt.") for k in tensors)
    key = sorted(k for k in tensors if k.endswith(".m"))[-1]
    tensors[key][0] += 1.0
    save_file(tensors, str(path), metadata=header)
    refused(capsys, world, root / "adapter", f"checkpoint at step {key.split('.')[1]} fails its checksum")


# ------------------------------------------------------------------------------------------------ the ledger
def test_ledger_verify_covers_every_file_of_an_applied_output(capsys, world, tmp_path):
    """A rewind's output carries its own recording (the next request rewinds from it): `ledger verify` holds that
    file to its staged hash too, and the next rewind in the lineage refuses the flipped file."""
    ledger, out = tmp_path / "ledger", tmp_path / "unlearned"
    assert main(["unlearn", "--base-model", str(world / "base"), "--adapter", str(world / "adapter"), "--train",
                 str(world / "train.jsonl"), "--request", str(world / "request.json"), "--out", str(out),
                 "--method", "rewind", "--ledger", str(ledger), "--quiet"]) == 0
    assert main(["ledger", "verify", str(ledger)]) == 0
    path = out / TRAJECTORY
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["ledger", "verify", str(ledger)]) == 1
    assert f"{TRAJECTORY} in {str(out)!r} has sha256" in capsys.readouterr().out
    (tmp_path / "next.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex5"}]}))
    code = main(["unlearn", "--base-model", str(world / "base"), "--adapter", str(out), "--train",
                 str(world / "train.jsonl"), "--request", str(tmp_path / "next.json"), "--out",
                 str(tmp_path / "next"), "--method", "rewind", "--ledger", str(ledger), "--quiet"])
    assert code == 2 and "fails its checksum" in capsys.readouterr().err


def test_a_recording_from_before_checksums_is_read_and_says_so(capsys, world, tmp_path):
    """Format 1 (no checksums, digest or recipe) still rewinds: the replay and gradient checks still run, and the
    report says what could not be verified."""
    adapter = copy_adapter(world, tmp_path)

    def old(h):
        for key in ("checksums", "header_sha256", "recipe"):
            h.pop(key)
        h["format"] = 1

    edit_header(adapter, old, reseal=False)
    code, err, out = unlearn(capsys, world, adapter, "rewind")
    assert code == 0, err
    trajectory = json.loads((out / "report.json").read_text())["trajectory"]
    assert trajectory["integrity"] == "format 1: no checksums recorded"
    assert "not compared" in trajectory["verified"]["recipe"] and "as recorded" in trajectory["verified"]["gradients"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["max_length", "l2", "dropout", "train_sha256", "packing", "base_model", "dtype", "loss",
                             "source", "rendering", "optimizer", "data_fields", "lora"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=8),
                       st.lists(st.integers(0, 3), max_size=3),
                       st.dictionaries(st.sampled_from(["format", "normalization", "weight_decay", "id_field", "x"]),
                                       st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=2)),
       method=st.sampled_from(["rewind", "auto"]))
def test_any_record_value_is_refused_or_used_as_recorded(capsys, world, tmp_path_factory, name, value, method):
    """Whatever one field of report.json's task block is set to: exit 2 naming the file, or the update runs — and
    a rewind that runs was verified against the recording's recipe (so an edit that would change the objective is
    refused); never exit 1."""
    adapter = copy_adapter(world, tmp_path_factory.mktemp("record"))
    _edit_record(adapter, lambda t: t.update({name: value}))
    code, err, out = unlearn(capsys, world, adapter, method)
    assert code in (0, 2), err
    assert code == 0 or (len(err.splitlines()) == 1 and err.startswith("llmeraser: error:")), err
    if code == 0 and json.loads((out / "report.json").read_text())["method"] == "rewind":
        assert "as recorded" in json.loads((out / "report.json").read_text())["trajectory"]["verified"]["recipe"]


# ------------------------------------------------------------------------------------------------ bfloat16
def test_a_bfloat16_recording_is_verified_and_rewinds_as_the_full_one(capsys, world, tmp_path):
    """`finetune --record-dtype bfloat16`: the plan line says what is kept, the recording passes every check
    (each checkpoint interval's replay within its rounding bound, the spot gradients) and the rewind writes the very
    adapter the full recording's rewind writes (both restart from exact states: tests/test_path.py argues it)."""
    from safetensors.torch import load_file

    capsys.readouterr()
    assert main(["finetune", "--base-model", str(world / "base"), "--train", str(world / "train.jsonl"), "--out",
                 str(tmp_path / "adapter"), "--lora-r", "2", "--lora-targets", "q_proj", "--max-length", "24",
                 "--epochs", "3", "--lr", "1e-2", "--record-dtype", "bfloat16"]) == 0
    assert "every step's gradient in bfloat16 and full-precision checkpoints every 4 steps" in capsys.readouterr().out
    code, err, out = unlearn(capsys, world, tmp_path / "adapter", "rewind")
    assert code == 0, err
    trajectory = json.loads((out / "report.json").read_text())["trajectory"]
    assert trajectory["integrity"].startswith("header and every tensor verified")
    assert "bfloat16 gradients" in trajectory["verified"]["path"] and trajectory["gradient_dtype"] == "bfloat16"
    code, err, full = unlearn(capsys, world, world / "adapter", "rewind")
    assert code == 0, err
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (out, full))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
