"""Weighted aggregation of a sharded adapter's shards (`serving.mixture`, APA-style): the model computes with
W + Σ_k w_k ΔW_k, checked against the base model with the weighted LoRA updates merged into its weights by hand;
one-hot weights are the single shard exactly; `evaluate_sharded(aggregate="weighted")` answers each example so."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from fixtures.tiny import save_tiny_base

from llmeraser.errors import ConfigError
from llmeraser.finetune import FinetuneArguments
from llmeraser.record import LoraSettings
from llmeraser.serving import evaluate_sharded, mixture
from llmeraser.sharded import ShardedAdapter, _base_and_task, finetune_sharded
from llmeraser.testing import fact_examples


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    save_tiny_base(root / "base")
    train = [dataclasses.replace(e, extra={"user": f"u{i % 6}"}) for i, e in enumerate(fact_examples(18, seed=2))]
    finetune_sharded(train, root / "in", shards=3, by="user", base_model=str(root / "base"), max_length=24,
                     lora=LoraSettings(r=2, targets=("q_proj", "v_proj")),
                     args=FinetuneArguments(epochs=2, batch_size=3, lr=5e-2))
    return root, train


def logits(model, task, examples) -> torch.Tensor:
    batch = task.collate(examples)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loaded(root):
    whole = ShardedAdapter.read(root / "in")
    base, task = _base_and_task(str(root / "base"), "float32", "cpu", 24)
    plain = copy.deepcopy(base)  # the base model without any adapter, for the merged reference
    return whole, whole.load(base).eval(), plain.eval(), task


def test_the_weighted_mixture_is_the_base_with_the_weighted_updates_merged(sharded):
    from peft.tuners.lora import LoraLayer

    root, train = sharded
    whole, model, plain, task = loaded(root)
    weights = dict(zip(whole.names, (0.2, 0.5, 0.3), strict=True))
    with mixture(model, weights):
        mixed = logits(model, task, train[:6])
    modules = dict(plain.named_modules())
    for where, layer in model.named_modules():  # W + Σ_k w_k ΔW_k, ΔW_k = s_k B_k A_k (peft's own delta)
        if isinstance(layer, LoraLayer):
            target = modules[where.removeprefix("base_model.model.")]
            with torch.no_grad():
                target.weight += sum(w * layer.get_delta_weight(n) for n, w in weights.items())
    merged = logits(plain, task, train[:6])
    # the same function computed two ways (factored vs merged products): equal up to float32 rounding
    assert torch.allclose(mixed, merged, rtol=1e-4, atol=1e-4 * merged.abs().max().item())
    assert not torch.allclose(mixed, logits(plain.__class__.from_pretrained(root / "base"), task, train[:6]))


def test_one_hot_weights_are_the_single_shard_and_the_model_is_restored(sharded):
    root, train = sharded
    whole, model, _, task = loaded(root)
    for name in whole.names:
        model.set_adapter(name)
        alone = logits(model, task, train[:5])
        with mixture(model, {n: float(n == name) for n in whole.names}):
            one_hot = logits(model, task, train[:5])
        assert torch.equal(alone, one_hot)  # the other shards add exactly 0.0 (weight 0 times a finite update)
        assert torch.equal(logits(model, task, train[:5]), alone)  # scales and the active adapter restored


def test_weighted_evaluation_answers_each_example_with_its_own_mixture(sharded, tmp_path, capsys):
    from llmeraser.cli import main
    from llmeraser.data import save_examples
    from llmeraser.metrics import evaluate

    root, train = sharded
    result = evaluate_sharded(root / "in", train, base_model=str(root / "base"), device="cpu", aggregate="weighted",
                              temperature=0.5)
    weights = result["routing"]["weights"]
    assert all(abs(sum(w.values()) - 1) < 1e-6 for w in weights.values())
    whole, model, _, task = loaded(root)
    task.calibrate(train)
    for e in train[:4]:
        with mixture(model, weights[e.id]):
            alone = evaluate(model, task, [e])["losses"][e.id]
        assert alone == pytest.approx(result["losses"][e.id], rel=1e-5)  # one example, same arithmetic
    save_examples(train, tmp_path / "d.jsonl")
    argv = ["evaluate", "--base-model", str(root / "base"), "--data", str(tmp_path / "d.jsonl"), "--quiet"]
    assert main([*argv, "--adapter", str(root / "in"), "--aggregate", "weighted", "--out",
                 str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["routing"]["aggregate"] == "weighted"
    assert main([*argv, "--adapter", str(root / "in" / whole.names[0]), "--aggregate", "weighted"]) == 2
    assert "is not one" in capsys.readouterr().err


def test_dora_is_refused(sharded):
    from peft import LoraConfig, get_peft_model

    root, train = sharded
    base, task = _base_and_task(str(root / "base"), "float32", "cpu", 24)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="not linear in their scale"), mixture(model, {"default": 0.5}):
        pass
