"""The trainable-parameter view θ and PEFT adapters on disk (llmeraser.params).

Float64 throughout. A saved and reloaded adapter must reproduce θ bit for bit (safetensors stores float64 as is) and
hence the same logits: the bound 1e-12 is loose only to allow for a different summation order, while a wrong or
missing tensor changes logits by ≥ 1e-3 (asserted below for the adapter against the bare base).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.tiny import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from llmeraser.errors import AdapterError, UserInputError
from llmeraser.params import ADAPTER_WEIGHTS, ParamView, adapter_hash, load_adapter, save_adapter
from llmeraser.task import CausalLMTask

DT = torch.float64
PEFT_FILES = {ADAPTER_WEIGHTS, "adapter_config.json"}
MODEL_CARD = "README.md"  # peft's save_pretrained also writes a model card


def tree_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (also catches added or removed files)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} | {
            str(p.relative_to(folder)) + "/": "dir" for p in folder.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lora(tok):
    """The tiny LoRA Llama with a random (non-zero) B, so the adapter changes the logits."""
    return tiny_lora(tiny_llama(len(tok), seed=0), seed=0)


@pytest.fixture(scope="module")
def batch(tok):
    task = CausalLMTask(tok)
    b = task.collate(fact_examples(5, seed=2))
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


@pytest.fixture(scope="module")
def saved(lora, tmp_path_factory) -> Path:
    """The adapter of `lora`, saved once (tests that modify it work on a copy)."""
    return save_adapter(lora, tmp_path_factory.mktemp("saved") / "adapter", report={"note": "test"})


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# ParamView


def test_param_view_layout(lora) -> None:
    view = ParamView(lora)
    trainable = [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    assert view.names == [n for n, _ in trainable]
    assert all("lora_" in n for n in view.names) and len(view.names) == 4  # A and B of q_proj and v_proj
    assert view.dim == sum(p.numel() for _, p in trainable) == 2 * (16 + 16)  # r = 1, hidden 16
    assert view.dim < sum(p.numel() for p in lora.parameters())  # the frozen base is not part of θ
    assert view.dtype == DT


def test_flatten_unflatten_round_trip(lora) -> None:
    view = ParamView(lora)
    vec = torch.randn(view.dim, generator=torch.Generator().manual_seed(0), dtype=DT)
    parts = view.unflatten(vec)
    assert [t.shape for t in parts] == [p.shape for p in view.params]
    assert torch.equal(view.flatten(parts), vec)
    # None stands for a zero block (an unused parameter's gradient)
    with_none = view.flatten([None, *parts[1:]])
    assert torch.equal(with_none[: view.numels[0]], torch.zeros(view.numels[0], dtype=DT))
    assert torch.equal(with_none[view.numels[0]:], vec[view.numels[0]:])
    with pytest.raises(ValueError, match=f"{view.dim} entries"):
        view.unflatten(vec[:-1])


def test_vector_set_vector_add(tok) -> None:
    model = tiny_lora(tiny_llama(len(tok), seed=1), seed=1)
    view = ParamView(model)
    theta = view.vector()
    assert torch.equal(theta, torch.cat([p.detach().reshape(-1) for p in view.params]))
    theta[0] += 1.0  # a copy: changing it leaves the model alone
    assert float(view.params[0].detach().reshape(-1)[0]) == float(theta[0]) - 1.0
    new = torch.randn(view.dim, generator=torch.Generator().manual_seed(1), dtype=DT)
    view.set_vector(new)
    assert torch.equal(view.vector(), new)
    assert torch.equal(view.params[1].detach().reshape(-1), new[view.numels[0]:view.numels[0] + view.numels[1]])
    delta = torch.randn(view.dim, generator=torch.Generator().manual_seed(2), dtype=DT)
    view.add_(delta)
    assert torch.equal(view.vector(), new + delta)
    assert all(p.requires_grad for p in view.params)  # in-place updates keep θ trainable


def test_model_without_trainable_parameters_raises() -> None:
    frozen = torch.nn.Linear(3, 2).double().requires_grad_(False)
    with pytest.raises(AdapterError, match="no trainable parameters"):
        ParamView(frozen)


# ---------------------------------------------------------------------------------------------------------------
# save and reload


def test_save_then_load_reproduces_the_model(tok, lora, batch, saved) -> None:
    files = {p.name for p in saved.iterdir()}
    assert PEFT_FILES | {"report.json"} <= files <= PEFT_FILES | {"report.json", MODEL_CARD}
    report = json.loads((saved / "report.json").read_text())
    assert report["note"] == "test"
    assert report["adapter_sha256"] == adapter_hash(saved)
    assert report["adapter_sha256"] == hashlib.sha256((saved / ADAPTER_WEIGHTS).read_bytes()).hexdigest()

    base = tiny_llama(len(tok), seed=0)  # a fresh copy of the same base
    with torch.no_grad():
        base_logits = base(**batch).logits
        reloaded = load_adapter(base, saved)
        logits, expected = reloaded(**batch).logits, lora(**batch).logits
    assert float((expected - base_logits).abs().max()) > 1e-3  # the adapter matters
    assert float((logits - expected).abs().max()) <= 1e-12
    assert ParamView(reloaded).names == ParamView(lora).names
    assert torch.equal(ParamView(reloaded).vector(), ParamView(lora).vector())
    assert all(p.requires_grad for p in ParamView(reloaded).params)  # trainable by default


def test_saving_into_a_non_empty_folder_is_refused(lora, saved, tmp_path) -> None:
    before = tree_hashes(saved)
    with pytest.raises(UserInputError, match="already exists"):
        save_adapter(lora, saved)
    assert tree_hashes(saved) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="already exists"):
        save_adapter(lora, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_saving_into_an_empty_folder_is_allowed(lora, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    save_adapter(lora, empty)
    assert PEFT_FILES <= {p.name for p in empty.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temporary folder left behind


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_saving_over_the_protected_input_is_refused(lora, tmp_path, where: str) -> None:
    adapter = save_adapter(lora, tmp_path / "input")
    before = tree_hashes(adapter)
    out = adapter if where == "itself" else adapter / "unlearned"
    with pytest.raises(UserInputError, match="would overwrite the input"):
        save_adapter(lora, out, protect=(adapter,))
    assert tree_hashes(adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_protection_sees_through_dot_dot(lora, tmp_path, monkeypatch) -> None:
    adapter = save_adapter(lora, tmp_path / "input")
    before = tree_hashes(adapter)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(UserInputError, match="would overwrite the input"):
        save_adapter(lora, "../input/unlearned", protect=(adapter,))  # today: written into input/unlearned
    assert tree_hashes(adapter) == before


def test_a_failure_while_saving_leaves_nothing_behind(lora, tmp_path, monkeypatch) -> None:
    def broken_save(path: str, **kwargs) -> None:
        (Path(path) / ADAPTER_WEIGHTS).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_pretrained", broken_save)
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        save_adapter(lora, parent / "new", report={"a": 1})
    assert list(parent.iterdir()) == []  # neither `new` nor a temporary folder


def test_non_finite_parameters_are_not_saved(tok, tmp_path) -> None:
    model = tiny_lora(tiny_llama(len(tok), seed=0), seed=0)
    with torch.no_grad():
        ParamView(model).params[1].view(-1)[3] = float("inf")
    with pytest.raises(AdapterError, match="non-finite"):
        save_adapter(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# load errors


def test_load_missing_folder(tok, tmp_path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tiny_llama(len(tok)), tmp_path / "nowhere")


def test_load_without_config(tok, saved, tmp_path) -> None:
    bad = copy_of(saved, tmp_path)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(tiny_llama(len(tok)), bad)


def test_load_refuses_pickled_weights(tok, saved, tmp_path) -> None:
    bad = copy_of(saved, tmp_path)
    (bad / ADAPTER_WEIGHTS).rename(bad / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin") as info:
        load_adapter(tiny_llama(len(tok)), bad)
    assert "pickled" in str(info.value) and "safetensors" in str(info.value)


def test_load_invalid_json_config(tok, saved, tmp_path) -> None:
    bad = copy_of(saved, tmp_path)
    (bad / "adapter_config.json").write_text('{"r": 1,', encoding="utf-8")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tiny_llama(len(tok)), bad)


def test_load_nan_weights(tok, saved, tmp_path) -> None:
    bad = copy_of(saved, tmp_path)
    tensors = load_file(str(bad / ADAPTER_WEIGHTS))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterError, match="non-finite values in .*lora_"):
        load_adapter(tiny_llama(len(tok)), bad)


def test_load_adapter_of_another_base_model(tok, saved) -> None:
    wider = tiny_llama(len(tok), hidden=32)  # LoRA A is (1, 16) in the adapter, (1, 32) here
    with pytest.raises(AdapterError, match="does not fit the base model"):
        load_adapter(wider, saved)


def test_load_adapter_of_another_base_model_names_the_mismatch(tok, saved) -> None:
    with pytest.raises(AdapterError) as info:
        load_adapter(tiny_llama(len(tok), hidden=32), saved)
    message = str(info.value)
    assert "size mismatch" in message and "lora_A" in message, message


# ---------------------------------------------------------------------------------------------------------------
# modules_to_save


class Net(torch.nn.Module):
    """A non-LLM base: a LoRA-targeted body and a head trained in full through modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 6).double()
        self.head = torch.nn.Linear(6, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_modules_to_save_are_part_of_theta_and_survive_reload(tmp_path) -> None:
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=2, target_modules=["body"], modules_to_save=["head"]))
    view = ParamView(model)
    head = [n for n in view.names if ".head." in n]
    assert len(head) == 2 and all("modules_to_save" in n for n in head)  # the trainable copy, not the original
    assert view.dim == 2 * 4 + 6 * 2 + 6 * 3 + 3
    view.add_(torch.linspace(-0.5, 0.5, view.dim, dtype=DT))  # move every part of θ, the head included
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    with torch.no_grad():
        assert float((model(x) - Net()(x)).abs().max()) > 1e-3
    out = save_adapter(model, tmp_path / "mts")
    reloaded = load_adapter(Net(), out)
    assert ParamView(reloaded).names == view.names
    assert torch.equal(ParamView(reloaded).vector(), view.vector())
    with torch.no_grad():
        assert float((reloaded(x) - model(x)).abs().max()) <= 1e-12


def test_load_llama_adapter_into_an_unrelated_model(saved) -> None:
    with pytest.raises(AdapterError, match="does not fit the base model"):
        load_adapter(Net(), saved)


def test_environment_has_no_stray_output(saved) -> None:
    """The module-wide adapter folder holds only what save_adapter wrote (no temporary files)."""
    assert not [p for p in saved.parent.iterdir() if p.name != saved.name]
    assert not [p for p in saved.iterdir() if p.name.startswith(".")]
    assert os.path.getsize(saved / ADAPTER_WEIGHTS) > 0
