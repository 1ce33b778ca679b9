"""Weighted aggregation of a sharded adapter's shards (`serving.mixture`, APA-style): the model computes with
W + Σ_k w_k ΔW_k, checked against the base model with the weighted LoRA updates merged into its weights by hand;
one-hot weights are the single shard exactly; `row_mixture` gives each row of one batch its own weights, as `mixture`
gives one query; `evaluate_sharded(aggregate="weighted")` answers each example so, in batches."""

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
from llmeraser.serving import evaluate_sharded, mixture, row_mixture
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
        # the same function, batched (8 rows, padded) against alone: float32 rounding only (see ROUNDING below)
        assert alone == pytest.approx(result["losses"][e.id], rel=1e-5)
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


# ROUNDING: a row of a batched row mixture and the same query alone under `mixture` compute the same function of the
# same weights; they differ only by float32 rounding: the hook rounds (B A x)·w then ·s where `mixture` multiplies by
# the one float s·w (a relative 2⁻²⁴ per element), and a padded batch of several rows may sum its matrix products in
# another order than one row does (a few ulps of each sum). Through the tiny model that stays near 3·10⁻⁷ of
# the logits' scale, so 10⁻⁵ of it bounds the difference with room and would still catch a wrong weight (the
# shards' updates differ by far more: see the last assertion of the first test).
def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def queries(train):
    """Six queries of different lengths (a batch of them is right-padded) and their weights: mixed and one-hot rows."""
    rows = train[:4] + [dataclasses.replace(train[4], prompt=train[4].prompt + " and the green one, too?"), train[5]]
    weights = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.4], [0.0, 0.0, 1.0],
                            [1 / 3, 1 / 3, 1 / 3]])
    return rows, weights


def test_each_row_of_a_batch_gets_its_own_mixture(sharded):
    root, train = sharded
    whole, model, _, task = loaded(root)
    rows, weights = queries(train)
    batch = task.collate(rows)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # padded: the rows have different lengths
    with torch.no_grad(), row_mixture(model, whole.names) as weigh, weigh(weights):
        batched = task.forward(model, batch)
    for i, (e, w) in enumerate(zip(rows, weights.tolist(), strict=True)):
        with torch.no_grad(), mixture(model, dict(zip(whole.names, w, strict=True))):
            alone = task.forward(model, task.collate([e]))
        assert close(batched[i], alone[0]), i
        if max(w) == 1.0:  # one-hot: the single shard, alone
            model.set_adapter(whole.names[w.index(1.0)])
            with torch.no_grad():
                assert close(batched[i], task.forward(model, task.collate([e]))[0]), i
    for k, name in enumerate(whole.names):  # every row one-hot on one shard: that shard's own batch, bit for bit
        model.set_adapter(name)  # (×1.0 and + 0.0·update are exact, and the batch is the same)
        with torch.no_grad():
            single = task.forward(model, batch)
            with row_mixture(model, whole.names) as weigh, weigh(torch.eye(3)[[k] * len(rows)]):
                assert torch.equal(task.forward(model, batch), single)


def state(model):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return ([(dict(m.scaling), list(m.active_adapters)) for m in layers],
            [(n, q.requires_grad) for n, q in model.named_parameters()],
            sum(len(b._forward_hooks) for m in layers for b in m.lora_B.values()))


def test_the_row_mixture_restores_the_model_also_after_an_error(sharded):
    root, train = sharded
    whole, model, _, task = loaded(root)
    model.set_adapter(whole.names[1])
    before, batch = state(model), task.collate(train[:3])
    with torch.no_grad():
        reference = task.forward(model, batch)
        with row_mixture(model, whole.names) as weigh:
            assert state(model)[2] == len(before[0]) * 3  # a hook per LoRA layer and shard
            with pytest.raises(ConfigError, match="outside"):
                task.forward(model, batch)
            with pytest.raises(ConfigError, match="2 weight rows for a batch of 3"), weigh(torch.ones(2, 3) / 3):
                task.forward(model, batch)
            with pytest.raises(ConfigError, match=r"must be \(batch, 3\)"), weigh(torch.ones(3, 2)):
                pass
        assert state(model) == before
        with pytest.raises(RuntimeError, match="boom"), row_mixture(model, whole.names) as weigh, weigh(
                torch.ones(3, 3) / 3):
            task.forward(model, batch)
            raise RuntimeError("boom")
        assert state(model) == before
        assert torch.equal(task.forward(model, batch), reference)
        with pytest.raises(ConfigError), mixture(model, dict.fromkeys(whole.names, 0.5)):
            raise ConfigError("inside")
        assert state(model) == before


def test_weighted_evaluation_in_batches_equals_one_query_at_a_time(sharded):
    root, train = sharded
    rows, _ = queries(train)
    common = {"base_model": str(root / "base"), "device": "cpu", "aggregate": "weighted", "temperature": 0.5}
    one = evaluate_sharded(root / "in", rows + train, batch_size=1, **common)
    four = evaluate_sharded(root / "in", rows + train, batch_size=4, **common)
    assert four["routing"] == one["routing"]  # the router does not depend on the batch size
    for key in ("losses", "p_yes"):  # float32 rounding only (ROUNDING above); loss, accuracy and AUC follow from them
        assert four[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6)


def test_a_merged_adapter_is_refused(sharded):
    root, _ = sharded
    whole, model, _, _ = loaded(root)
    model.merge_adapter([whole.names[0]])  # its update is in W: a hook on its lora_B would never run
    with pytest.raises(ConfigError, match="merged"), row_mixture(model, whole.names):
        pass


def test_the_ensemble_mixes_each_shards_own_answer(sharded, tmp_path, capsys):
    """aggregate="ensemble": P(yes) the router-weighted mean of each shard's own P(yes), and each loss −log Σ_k w_k
    exp(−ℓ_k), against each shard's answers computed here one example at a time (`yes_no_probabilities`, tested
    against a manual softmax in test_metrics, and the task's loss on a batch of one); one-hot weights give a shard
    alone exactly (1·x + 0·y = x and logsumexp(−ℓ, −inf) = −ℓ: no rounding)."""
    from llmeraser.cli import main
    from llmeraser.data import save_examples
    from llmeraser.metrics import evaluate, roc_auc, yes_no_probabilities
    from llmeraser.serving import ensemble
    from llmeraser.task import per_example_loss

    root, train = sharded
    result = evaluate_sharded(root / "in", train, base_model=str(root / "base"), device="cpu", aggregate="ensemble",
                              temperature=0.5)
    assert result["routing"]["aggregate"] == "ensemble"
    assert set(result["routing"]["each_shard"]) == set(ShardedAdapter.read(root / "in").names)
    whole, model, _, task = loaded(root)
    task.calibrate(train)
    w = torch.tensor([[result["routing"]["weights"][e.id][n] for n in whole.names] for e in train], dtype=torch.float64)
    assert torch.allclose(w.sum(1), torch.ones(len(train), dtype=torch.float64))
    p, nll = [], []
    for n in whole.names:
        model.set_adapter(n)
        p.append(yes_no_probabilities(model, task, train, batch_size=1))
        with torch.no_grad():
            nll.append(torch.cat([per_example_loss(task, model, task.collate([e])).double() for e in train]))
    p, nll = torch.stack(p, 1), torch.stack(nll, 1)  # (n, S)
    mixed = (w * p).sum(1)
    loss = -torch.log((w * torch.exp(-nll)).sum(1))
    # batched and padded (8 rows) in the ensemble, one row here: float32 rounding only (ROUNDING above)
    assert [result["p_yes"][e.id] for e in train] == pytest.approx(mixed.tolist(), rel=1e-5, abs=1e-6)
    assert [result["losses"][e.id] for e in train] == pytest.approx(loss.tolist(), rel=1e-5)
    labels = [int(e.response == " Yes") for e in train]
    assert 0 < sum(labels) < len(train)
    assert result["auc"] == pytest.approx(roc_auc(mixed, labels), abs=1 / (sum(labels) * (len(train) - sum(labels))))
    one_hot = torch.zeros(len(train), len(whole.names))
    one_hot[:, 1] = 1.0
    alone_mix, each = ensemble(model, task, train, whole.names, one_hot)
    alone = evaluate(model, task, train, adapters=[whole.names[1]] * len(train))
    assert alone_mix["losses"] == alone["losses"] and alone_mix["p_yes"] == alone["p_yes"]
    assert each[whole.names[1]]["auc"] == alone["auc"]
    with pytest.raises(ConfigError, match="weights must be"):
        ensemble(model, task, train, whole.names, one_hot[:, :2])
    save_examples(train, tmp_path / "d.jsonl")
    argv = ["evaluate", "--base-model", str(root / "base"), "--data", str(tmp_path / "d.jsonl"), "--quiet"]
    assert main([*argv, "--adapter", str(root / "in"), "--aggregate", "ensemble"]) == 0
    assert main([*argv, "--adapter", str(root / "in" / whole.names[0]), "--aggregate", "ensemble"]) == 2
    assert "--aggregate ensemble combines the shards" in capsys.readouterr().err
