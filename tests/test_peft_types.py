"""Every common PEFT type: fine-tuned, unlearned, Δθ checked against the exact dense solve, saved and reloaded; fitted
solvers cover the type's blocks (LoRA, rsLoRA, modules_to_save) or refuse naming them."""

from __future__ import annotations

import pytest
import torch

from llmeraser.eraser import EraserArguments, compute_update
from llmeraser.errors import ConfigError
from llmeraser.factors import linear_blocks
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.params import ParamView, load_adapter, save_adapter
from llmeraser.record import PEFT_KINDS, LoraSettings, lora_model
from llmeraser.request import Request
from llmeraser.solvers.api import solver_arguments
from llmeraser.task import CausalLMTask
from llmeraser.testing import fact_examples, tiny_llama, tiny_tokenizer

N_TRAIN = 16
DAMPING = 1e-2
# what a fitted solver refuses for each kind: the trainable tensor outside every linear layer it names
OUTSIDE_LINEAR = {"dora": "lora_magnitude_vector", "ia3": "ia3_l", "loha": "hada_w1_a", "lokr": "lokr_w1",
                  "prompt": "prompt_encoder", "prefix": "prompt_encoder"}


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    train = fact_examples(N_TRAIN, seed=3)
    return tok, CausalLMTask(tok, max_length=16), train


def adapter(kind: str, vocab: int, **kw):
    base = tiny_llama(vocab, hidden=16, seed=0, init_std=0.2)
    settings = LoraSettings(r=2, alpha=4, targets=("q_proj", "v_proj"), kind=kind, virtual_tokens=2, **kw)
    return lora_model(base, settings, seed=0)


@pytest.mark.parametrize("kind", [*PEFT_KINDS, "lora+modules_to_save"])
def test_every_peft_type_unlearns_like_the_dense_solve(tmp_path, setup, kind):
    tok, task, train = setup
    extra = {"modules_to_save": ("o_proj",)} if kind.endswith("modules_to_save") else {}
    model = adapter(kind.split("+")[0], len(tok), **extra)
    view = ParamView(model)
    assert view.dtype == torch.float64 and view.dim > 0
    result = finetune(model, task, train, FinetuneArguments(epochs=15, lr=2e-2, batch_size=4, record=False,
                                                            final_check=False))
    assert result.losses[-1] < result.losses[0]  # it learned
    request = Request.remove(train[0].id, train[5].id)
    args = dict(damping=DAMPING, method="first-order", curvature="ggn")
    dense = compute_update(model, task, train, request, EraserArguments(solver="dense", **args))
    cg = compute_update(model, task, train, request, EraserArguments(
        solver="cg", solver_args=solver_arguments("cg", tol=1e-12, max_iters=4 * view.dim), **args))
    assert dense.delta.norm() > 0
    # the same damped system solved two ways (exact matrix vs Krylov on products): float64 agreement
    err = (cg.delta - dense.delta).norm() / dense.delta.norm()
    assert err < 1e-6, f"{kind}: cg vs dense {err:.2e}"
    # fitted solvers: cover every block, or refuse naming what they cannot
    if kind in OUTSIDE_LINEAR:
        with pytest.raises(ConfigError, match=OUTSIDE_LINEAR[kind]):
            linear_blocks(model)
    else:
        linear_blocks(model)
    # the new adapter saves and reloads (PeftModel.from_pretrained) with θ̂ + Δθ
    theta = view.vector() + dense.delta
    view.set_vector(theta)
    save_adapter(model, tmp_path / "out")
    again = load_adapter(tiny_llama(len(tok), hidden=16, seed=0, init_std=0.2), tmp_path / "out")
    # peft stores prompt learning's virtual tokens as float32 (its load makes them float32 too): a float32 rounding
    tol = 1e-6 * theta.abs().max() if kind in ("prompt", "prefix") else 1e-12
    assert torch.allclose(ParamView(again).vector(), theta, atol=tol, rtol=0)


def test_prompt_tuning_scores_the_right_positions(setup):
    """Prompt tuning puts virtual tokens before the input: the task reads the logits after them."""
    tok, task, train = setup
    model = adapter("prompt", len(tok))
    batch = task.collate(train[:3])
    with torch.no_grad():
        got = task.forward(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert full.shape[1] == batch["input_ids"].shape[1] + 2
    want = torch.take_along_dim(full, (batch["positions"] + 2)[..., None], dim=1)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["dora", "ia3", "prompt"])
def test_cli_finetunes_and_unlearns_each_kind(tmp_path, kind, capsys):
    """`llmeraser finetune --peft KIND`, then `unlearn`: a fitted solver is refused with the tensor it cannot cover
    named, auto solves (dense: the problem is tiny), and the output loads in peft."""
    import json

    from fixtures.tiny import save_tiny_base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmeraser.cli import main
    from llmeraser.data import save_examples

    save_tiny_base(tmp_path / "base")
    save_examples(fact_examples(12, seed=1), tmp_path / "train.jsonl")
    (tmp_path / "request.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex0"}]}))
    common = ["--base-model", str(tmp_path / "base"), "--train", str(tmp_path / "train.jsonl"), "--quiet"]
    assert main(["finetune", *common, "--out", str(tmp_path / "a"), "--epochs", "2", "--peft", kind,
                 "--virtual-tokens", "2", "--lora-r", "2", "--max-length", "24", "--no-record"]) == 0
    record = json.loads((tmp_path / "a" / "report.json").read_text())["task"]
    assert record["lora"]["kind"] == kind and record["train_sha256"]
    unlearn = ["unlearn", *common, "--adapter", str(tmp_path / "a"), "--request", str(tmp_path / "request.json")]
    capsys.readouterr()
    assert main([*unlearn, "--out", str(tmp_path / "f"), "--solver", "ekfac"]) == 2
    assert OUTSIDE_LINEAR[kind] in capsys.readouterr().err
    assert main([*unlearn, "--out", str(tmp_path / "u"), "--curvature-samples", "4"]) == 0
    report = json.loads((tmp_path / "u" / "report.json").read_text())
    assert report["method"] == "first-order" and report["solver"] == "dense" and report["delta_norm"] > 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    PeftModel.from_pretrained(base, str(tmp_path / "u"))  # loads as any peft adapter does
