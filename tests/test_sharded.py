"""Sharded adapters (llmeraser.sharded): a request retrains only the shards it touches, by rewind, and the result
equals retraining those shards on the edited data bit for bit (rewind is exact: same recipe, same batches, same
arithmetic); the untouched shards are the input's, file for file; bad folders and requests are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from fixtures.tiny import save_tiny_base
from safetensors.torch import load_file

from llmeraser.errors import AdapterError, DataError, RequestError
from llmeraser.finetune import FinetuneArguments, finetune_adapter
from llmeraser.record import LoraSettings
from llmeraser.request import Edit, Request, apply_request
from llmeraser.router import embed_prompts
from llmeraser.sharded import ShardedAdapter, _base_and_task, finetune_sharded, unlearn_sharded
from llmeraser.testing import fact_examples

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    save_tiny_base(root / "base")
    train = [dataclasses.replace(e, extra={"user": f"u{i % 6}"}) for i, e in enumerate(fact_examples(24, seed=1))]
    recipe = {"base_model": str(root / "base"), "lora": LoraSettings(r=1, targets=("q_proj",)), "max_length": 24,
              "args": FinetuneArguments(epochs=2, batch_size=3, lr=1e-2)}
    finetune_sharded(train, root / "in", shards=3, by="user", **recipe)
    return root, train, recipe


def test_a_request_retrains_the_touched_shards_bit_for_bit_and_copies_the_others(sharded, tmp_path):
    root, train, recipe = sharded
    before = ShardedAdapter.read(root / "in")
    gone = [e.id for e in train if e.extra["user"] == "u1"]  # a whole data subject
    fixed = next(e for e in train if e.extra["user"] == "u4")
    asked = next(e for e in train if e.extra["user"] == "u4" and e.id != fixed.id)
    request = Request([*(Edit("remove", i) for i in gone), Edit("correct_response", fixed.id, response=" Maybe"),
                       Edit("modify_query", asked.id, prompt="Which colour does the owl dislike most?")])
    report = unlearn_sharded(root / "in", train, request, tmp_path / "out", base_model=recipe["base_model"])
    after = ShardedAdapter.read(tmp_path / "out")
    edited = apply_request(train, request)
    after.check_train(edited)
    touched = {before.partition.shard(gone[0]), before.partition.shard(fixed.id)}
    assert report["touched_shards"] == [before.names[k] for k in sorted(touched)]
    assert 0 < report["replayed_share"] < 1 and report["replayed_steps"] <= report["steps"]
    for k, name in enumerate(before.names):
        new = load_file(str(tmp_path / "out" / name / WEIGHTS))
        if k not in touched:
            assert (tmp_path / "out" / name / WEIGHTS).read_bytes() == (root / "in" / name / WEIGHTS).read_bytes()
            continue
        retrained = finetune_adapter(after.partition.members(k, edited), tmp_path / f"retrain-{k}", **recipe)
        ref = load_file(str(retrained.path) + "/" + WEIGHTS)
        assert ref.keys() == new.keys() and all(torch.equal(ref[t], new[t]) for t in ref)
    # the router holds nothing of the removed examples, and the edited prompt's row is its new prompt's embedding
    old, new = before.router(), after.router()
    assert set(new.ids) == {e.id for e in edited} and not set(gone) & set(new.ids)
    model, task = _base_and_task(recipe["base_model"], "float32", "cpu", 24)
    row = new.ids.index(asked.id)
    fresh = embed_prompts(model, task, [next(e for e in edited if e.id == asked.id)])[0]
    # the same prompt embedded in another batch: equal up to rounding (padding changes the summation order)
    assert float(new.vectors[row] @ fresh) > 1 - 1e-4
    assert not torch.equal(new.vectors[row], old.vectors[old.ids.index(asked.id)])
    # the output stands for the edited set, and takes a further request
    again = unlearn_sharded(tmp_path / "out", edited, Request([Edit("remove", edited[0].id)]), tmp_path / "out2",
                            base_model=recipe["base_model"])
    assert len(again["touched_shards"]) == 1
    # … and, given the original set again, refuses it, saying the folder stands for the set after its request
    with pytest.raises(RequestError, match=r"output of a request on this very set \(requests\.json\).*--ledger"):
        unlearn_sharded(tmp_path / "out", train, Request([Edit("remove", edited[0].id)]), tmp_path / "out3",
                        base_model=recipe["base_model"])
    assert not (tmp_path / "out3").exists()


def test_bad_folders_and_requests_are_refused_and_nothing_is_written(sharded, tmp_path):
    root, train, recipe = sharded
    base = recipe["base_model"]
    with pytest.raises(RequestError, match="nope"):
        unlearn_sharded(root / "in", train, Request([Edit("remove", "nope")]), tmp_path / "a", base_model=base)
    with pytest.raises(DataError, match="does not match the partition: 1 partitioned id"):
        unlearn_sharded(root / "in", train[:-1], Request([Edit("remove", train[0].id)]), tmp_path / "a",
                        base_model=base)
    changed = [dataclasses.replace(train[0], response=" Maybe"), *train[1:]]  # same ids, other content
    with pytest.raises(RequestError, match="not the one"):
        unlearn_sharded(root / "in", changed, Request([Edit("remove", train[0].id)]), tmp_path / "a",
                        base_model=base)
    with pytest.raises(RequestError, match="removes every example of every shard"):
        unlearn_sharded(root / "in", train, Request([Edit("remove", e.id) for e in train]), tmp_path / "a",
                        base_model=base)
    assert not (tmp_path / "a").exists()
    # a shard edited by hand, a manifest that lies
    import shutil

    shutil.copytree(root / "in", tmp_path / "edited")
    w = tmp_path / "edited" / "shard-01" / WEIGHTS
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    with pytest.raises(AdapterError, match="shard-01: the weights are not the ones"):
        ShardedAdapter.read(tmp_path / "edited")
    m = json.loads((root / "in" / "sharded.json").read_text())
    shutil.copytree(root / "in", tmp_path / "lying")
    (tmp_path / "lying" / "sharded.json").write_text(json.dumps({**m, "names": ["shard-00", "shard-01"]}))
    with pytest.raises(AdapterError, match="adapter_sha256"):
        ShardedAdapter.read(tmp_path / "lying")


def test_every_shard_loads_with_peft_by_subfolder(sharded):
    """The folder serves as it is: `PeftModel.from_pretrained(base, folder, subfolder=name)` per shard, and peft's
    named adapters side by side (multi-LoRA serving picks one per request)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, _, recipe = sharded
    names = ShardedAdapter.read(root / "in").names
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe["base_model"]), str(root / "in"),
                                      subfolder=names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(root / "in"), adapter_name=name, subfolder=name)
    assert set(model.peft_config) == set(names)
    stored = load_file(str(root / "in" / names[1] / WEIGHTS))
    model.set_adapter(names[1])
    loaded = {n: p for n, p in model.named_parameters() if f".{names[1]}." in n}
    assert len(loaded) == len(stored) > 0
    for key, value in stored.items():  # peft stores "…lora_A.weight", the model holds "…lora_A.<name>.weight"
        name = key.replace("lora_A.weight", f"lora_A.{names[1]}.weight").replace("lora_B.weight",
                                                                                  f"lora_B.{names[1]}.weight")
        assert torch.equal(dict(model.named_parameters())[name], value)


def test_the_command_line_trains_and_unlearns_a_sharded_adapter(sharded, tmp_path, capsys):
    from llmeraser.cli import main
    from llmeraser.data import save_examples

    root, train, recipe = sharded
    save_examples(train, tmp_path / "train.jsonl")
    common = ["--base-model", recipe["base_model"], "--quiet"]
    tune = ["finetune", *common, "--train", str(tmp_path / "train.jsonl"), "--epochs", "1", "--lora-r", "1",
            "--lora-targets", "q_proj", "--max-length", "24", "--shards", "2"]
    assert main([*tune, "--shard-by", "team", "--out", str(tmp_path / "x")]) == 2
    assert "has no field 'team'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*tune, "--shard-by", "user", "--out", str(tmp_path / "in")]) == 0
    assert "as 2 shards of 12, 12 examples, each 'user' in one shard" in capsys.readouterr().out
    (tmp_path / "r.json").write_text(json.dumps({"edits": [{"op": "remove", "id": train[0].id}]}))
    forget = ["unlearn", *common, "--adapter", str(tmp_path / "in"), "--train", str(tmp_path / "train.jsonl"),
              "--request", str(tmp_path / "r.json")]
    assert main([*forget, "--method", "path", "--out", str(tmp_path / "p")]) == 2
    assert "sharded adapter" in capsys.readouterr().err and not (tmp_path / "p").exists()
    book = ["--ledger", str(tmp_path / "ledger")]
    assert main([*forget, "--out", str(tmp_path / "out"), *book]) == 0
    assert "rewound 1 of 2 shards" in capsys.readouterr().out
    ShardedAdapter.read(tmp_path / "out").check_train(apply_request(train, Request([Edit("remove", train[0].id)])))
    # on record as for a single adapter: a repeat is a no-op, the next request applies to the head with the ORIGINAL
    # training set, the input is refused once it is no longer the head, and verify checks every file
    assert main([*forget, "--out", str(tmp_path / "again"), *book]) == 0
    assert "already applied" in capsys.readouterr().out and not (tmp_path / "again").exists()
    (tmp_path / "r2.json").write_text(json.dumps({"edits": [{"op": "remove", "id": train[1].id}]}))
    second = [a if a != str(tmp_path / "r.json") else str(tmp_path / "r2.json") for a in forget]
    assert main([*second, "--out", str(tmp_path / "x"), *book]) == 2
    assert "not the head" in capsys.readouterr().err
    second[second.index("--adapter") + 1] = str(tmp_path / "out")
    assert main([*second, "--out", str(tmp_path / "out2"), *book]) == 0
    assert main(["ledger", "verify", str(tmp_path / "ledger")]) == 0
    capsys.readouterr()
    router = tmp_path / "out2" / "router.safetensors"
    router.write_bytes(router.read_bytes() + b" ")
    assert main(["ledger", "verify", str(tmp_path / "ledger")]) != 0
    assert "router.safetensors" in capsys.readouterr().out


def test_the_router_sends_each_training_prompt_to_its_own_shard_and_is_checked(sharded, tmp_path):
    """Every training prompt's nearest stored prompt is itself (cosine 1, up to rounding), so top-1 routing of the
    training prompts reaches a shard holding an identical prompt; weights are a distribution over shards. A router
    file that is changed or does not match the partition is refused."""
    import shutil

    from llmeraser.router import ROUTER, Router

    root, train, recipe = sharded
    whole = ShardedAdapter.read(root / "in")
    router = whole.router()
    model, task = _base_and_task(recipe["base_model"], "float32", "cpu", 24)
    queries = embed_prompts(model, task, train, batch_size=5)  # other batches than the router's: rounding differs
    sims = router.similarities(queries)
    own = torch.tensor([whole.partition.shard(e.id) for e in train])
    assert (sims.gather(1, own[:, None]).squeeze(1) > 1 - 1e-4).all()
    assert torch.allclose(router.weights(queries).sum(1), torch.ones(len(train)))
    for e, shard in zip(train, router.route(queries).tolist(), strict=True):  # a shard with the same prompt
        assert any(x.prompt == e.prompt for x in whole.partition.members(shard, train))
    shutil.copytree(root / "in", tmp_path / "r")
    Router(router.ids[1:], router.shards[1:], router.vectors[1:], router.n_shards).save(tmp_path)
    shutil.copy(tmp_path / ROUTER, tmp_path / "r" / ROUTER)
    with pytest.raises(AdapterError, match="not the router the manifest recorded"):
        ShardedAdapter.read(tmp_path / "r")


def test_k_batched_requests_rewind_each_touched_shard_once_and_equal_applying_them_one_by_one(sharded, tmp_path):
    """Both are exact retraining of the touched shards on the set after all requests (same recipe, same batches),
    so the batched folder's weights equal, bit for bit, those of the requests applied one after another — at one
    replay of each touched shard instead of k."""
    root, train, recipe = sharded
    base = recipe["base_model"]
    whole = ShardedAdapter.read(root / "in")
    shard = whole.partition.members(1, train)
    first = Request([Edit("remove", shard[-1].id)])
    second = Request([Edit("correct_response", shard[-2].id, response=" Maybe"), Edit("remove", shard[-3].id)])
    batched = unlearn_sharded(root / "in", train, [first, second], tmp_path / "batched", base_model=base)
    one = unlearn_sharded(root / "in", train, first, tmp_path / "one", base_model=base)
    two = unlearn_sharded(tmp_path / "one", apply_request(train, first), second, tmp_path / "two", base_model=base)
    assert batched["touched_shards"] == [whole.names[1]] and batched["requests_sha256"] == [first.hash, second.hash]
    assert batched["replayed_steps"] <= one["replayed_steps"] + two["replayed_steps"]
    for name in whole.names:
        a, b = (load_file(str(tmp_path / f / name / WEIGHTS)) for f in ("batched", "two"))
        assert all(torch.equal(a[t], b[t]) for t in a)
    assert json.loads((tmp_path / "batched" / "requests.json").read_text()) == [first.to_dict(), second.to_dict()]
    # with a ledger: the same update, each request on its own row, verify passing
    from llmeraser.ledger import Ledger

    booked = unlearn_sharded(root / "in", train, [first, second], tmp_path / "booked", base_model=base,
                             ledger=tmp_path / "book")
    assert booked["seqs"] == [1, 2] and booked["replayed_steps"] == batched["replayed_steps"]
    a, b = (load_file(str(tmp_path / f / whole.names[1] / WEIGHTS)) for f in ("batched", "booked"))
    assert all(torch.equal(a[t], b[t]) for t in a)
    with Ledger(tmp_path / "book", create=False) as book:
        assert len(book.updates()) == 1 and [e.status for e in book.entries()] == ["applied"] * 2
        assert book.verify() == []


def test_evaluate_answers_each_example_with_the_shard_its_router_picks(sharded, tmp_path, capsys):
    """A sharded folder's evaluation equals evaluating each routed group with its own shard adapter alone (the
    same losses up to float rounding: the batches differ, so the padding and summation order do)."""
    from llmeraser.cli import main
    from llmeraser.data import save_examples
    from llmeraser.job import AdapterJob
    from llmeraser.serving import evaluate_sharded

    root, train, recipe = sharded
    base = recipe["base_model"]
    result = evaluate_sharded(root / "in", train, base_model=base, device="cpu")
    whole = ShardedAdapter.read(root / "in")
    routed = result["routing"]["shard_of"]
    assert result["n"] == len(train) and sum(result["routing"]["examples_per_shard"].values()) == len(train)
    for k, name in enumerate(whole.names):
        group = [e for e in train if routed[e.id] == name]
        if not group:
            continue
        alone = AdapterJob.evaluate(whole.shard_dir(k), group, base_model=base, device="cpu")
        for e in group:
            assert abs(alone["losses"][e.id] - result["losses"][e.id]) <= 1e-5 * max(1.0, alone["losses"][e.id])
    save_examples(train, tmp_path / "data.jsonl")
    assert main(["evaluate", "--base-model", base, "--adapter", str(root / "in"), "--data",
                 str(tmp_path / "data.jsonl"), "--quiet", "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["routing"]["shard_of"] == routed


def test_a_request_that_empties_a_shard_drops_it(sharded, tmp_path):
    """Retraining a shard on nothing leaves no adapter: the shard is dropped (no folder, no hash, no router row), no
    step is run for it, and every query goes to the shards that remain; the folder still reads, evaluates and takes
    the next request. A manifest that keeps an adapter for an empty shard is refused."""
    from llmeraser.serving import evaluate_sharded

    root, train, recipe = sharded
    base = recipe["base_model"]
    whole = ShardedAdapter.read(root / "in")
    shard0 = [e.id for e in whole.partition.members(0, train)]
    report = unlearn_sharded(root / "in", train, Request([Edit("remove", i) for i in shard0]), tmp_path / "out",
                             base_model=base)
    assert report["emptied_shards"] == [whole.names[0]] and report["replayed_steps"] == 0
    after = ShardedAdapter.read(tmp_path / "out")
    assert after.live == [1, 2] and not (tmp_path / "out" / whole.names[0]).exists()
    assert after.manifest["adapter_sha256"][whole.names[0]] is None and 0 not in after.router().shards.tolist()
    edited = apply_request(train, Request([Edit("remove", i) for i in shard0]))
    result = evaluate_sharded(tmp_path / "out", train, base_model=base, device="cpu")
    assert result["routing"]["examples_per_shard"][whole.names[0]] == 0 and result["n"] == len(train)
    again = unlearn_sharded(tmp_path / "out", edited, Request([Edit("remove", edited[0].id)]), tmp_path / "out2",
                            base_model=base)
    assert len(again["touched_shards"]) == 1
    import shutil

    shutil.copytree(root / "in" / whole.names[0], tmp_path / "out" / whole.names[0])
    with pytest.raises(AdapterError, match="holds no example in the partition"):
        ShardedAdapter.read(tmp_path / "out")


def test_a_holdout_gives_the_request_its_membership_test_as_the_folder_serves_it(sharded, tmp_path, monkeypatch):
    """With a holdout, the report's evidence is the membership test of the removed examples against it before and
    after, each example scored by the shard the router sends it to (`sharded.membership`): the numbers are those of
    scoring each example with that shard alone. Before and after share one base-model load, and give exactly the
    tests each folder gives on its own load. A holdout that overlaps the training set is refused before any work."""
    from llmeraser import sharded as module
    from llmeraser.evidence import CALIBRATED, Comparison, HoldoutError, membership_scores, report_entry

    root, train, recipe = sharded
    whole = ShardedAdapter.read(root / "in")
    seen = {(e.prompt, e.response) for e in train}
    holdout = [dataclasses.replace(e, id=f"h{i}") for i, e in enumerate(fact_examples(60, seed=7))
               if (e.prompt, e.response) not in seen][:12]
    prompts = [e.prompt for e in train]
    user = next(u for u in sorted({e.extra["user"] for e in train})  # one subject whose prompts no one else has
                if all(prompts.count(e.prompt) == 1 for e in train if e.extra["user"] == u))
    gone = [e for e in train if e.extra["user"] == user]  # four examples, one shard
    request = Request([Edit("remove", e.id) for e in gone])
    with pytest.raises(HoldoutError, match="in the training set"):
        unlearn_sharded(root / "in", train, request, tmp_path / "x", base_model=recipe["base_model"],
                        holdout=[*holdout, train[0]])
    assert not (tmp_path / "x").exists()
    loads = []  # the base-model loads of the sharded code (the rewinds' own are AdapterJob's)
    monkeypatch.setattr(module, "_base_and_task", lambda *a: loads.append(a) or _base_and_task(*a))
    report = unlearn_sharded(root / "in", train, request, tmp_path / "out", base_model=recipe["base_model"],
                             holdout=holdout)
    assert len(loads) == 1  # a removal leaves the router's rows as they were: the evidence's one load is all
    # each folder's test alone, on its own load, is the report's: the same inputs, batches and arithmetic (the other
    # folder's adapters sit inactive beside them and the routing embeds with every adapter off), so equal exactly
    job = {"base_model": recipe["base_model"]}
    alone = [module.membership([f], gone, holdout, job)[0] for f in (root / "in", tmp_path / "out")]
    assert report["evidence"] == report_entry(*alone, holdout)
    proof = Comparison.from_dict(report["evidence"])
    assert report["evidence"]["status"] == "measured" and proof.before.n_members == len(gone) == 4
    assert json.loads((tmp_path / "out" / "report.json").read_text())["evidence"] == report["evidence"]
    # before: each removed example goes to its own shard (its prompt is stored there alone); its score is that shard's
    model, task = _base_and_task(recipe["base_model"], "float32", "cpu", 24)
    served = whole.load(model)
    own = whole.names[whole.partition.shard(gone[0].id)]
    assert whole.route(served, task, gone) == [own] * 4
    served.set_adapter(own)
    alone = membership_scores(served, task, gone)
    with served.disable_adapter():  # the test is calibrated: each score minus the base model's
        base = membership_scores(served, task, gone)
    # the same arithmetic on the same inputs, up to the batch it ran in (float32 rounding)
    change = sum(a - b for a, b in zip(alone.loss, base.loss, strict=True)) / 4
    assert proof.before.calibration == CALIBRATED
    assert proof.before.score("loss").mean_members == pytest.approx(change, rel=1e-4, abs=1e-5)


def test_verify_tests_a_sharded_adapter_as_it_serves_the_examples(sharded, tmp_path, capsys):
    """`llmeraser verify --adapter FOLDER` on a sharded folder is `sharded.membership` of it (each example scored by
    the shard its router picks; the same inputs and arithmetic, so the JSON equals the library's test exactly), with
    verify's options passed through (--k, --alpha, --uncalibrated); --max-length is refused (the shards' recorded
    length decides)."""
    from llmeraser.cli import main
    from llmeraser.data import save_examples
    from llmeraser.sharded import membership

    root, train, recipe = sharded
    seen = {(e.prompt, e.response) for e in train}
    holdout = [dataclasses.replace(e, id=f"h{i}") for i, e in enumerate(fact_examples(60, seed=7))
               if (e.prompt, e.response) not in seen][:12]
    save_examples(train[:4], tmp_path / "members.jsonl")
    save_examples(holdout, tmp_path / "holdout.jsonl")
    common = ["verify", "--base-model", recipe["base_model"], "--quiet", "--adapter", str(root / "in"),
              "--data", str(tmp_path / "members.jsonl"), "--holdout", str(tmp_path / "holdout.jsonl")]
    for extra, job in ((["--k", "0.5", "--alpha", "0.1"], {"k": 0.5, "alpha": 0.1}),
                       (["--uncalibrated"], {"calibrated": False})):
        out = tmp_path / f"v{len(extra)}.json"
        assert main([*common, *extra, "--json", str(out)]) == 0
        assert "membership test: 4 examples against a holdout of 12" in capsys.readouterr().out
        mine = membership([root / "in"], train[:4], holdout, {"base_model": recipe["base_model"], **job})[0]
        got = json.loads(out.read_text())
        assert {k: got[k] for k in mine.to_dict()} == json.loads(json.dumps(mine.to_dict()))
    assert json.loads((tmp_path / "v4.json").read_text())["calibration"] != got["calibration"] == "uncalibrated"
    assert main([*common, "--max-length", "16"]) == 2
    assert "recorded length" in capsys.readouterr().err
