"""The people benchmark's sharded rows (`llmeraser_experiments.sharded_bench`) on the tiny pipeline: what is run
and what the math guarantees of it (the exactness of unlearn_sharded itself is tested in tests/test_sharded.py)."""

from __future__ import annotations

import json

import pytest

from llmeraser.errors import ConfigError
from llmeraser.sharded import ShardedAdapter
from llmeraser_experiments.people import build_people
from llmeraser_experiments.people_bench import PeopleBenchArguments


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from llmeraser_experiments.sharded_bench import run_sharded_people_benchmark

    tmp = tmp_path_factory.mktemp("sharded")
    args = PeopleBenchArguments.tiny(splits=("forget10",), methods=("original", "retrain"))
    # 8 people, 8 shards: forget10 (one person) empties a shard, which is then dropped
    result = run_sharded_people_benchmark(args, (2, 4, 8), tmp / "out", work=tmp / "work")
    return args, result, tmp


def test_rows_measures_and_files(run):
    _, result, tmp = run
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["original", "retrain", "sharded S=2 before", "sharded S=2", "sharded S=4 before",
                          "sharded S=4", "sharded S=8 before", "sharded S=8"]
    assert json.loads((tmp / "out" / "results.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert "### sharded adapters" in (tmp / "out" / "table.md").read_text()
    for name in ("sharded S=2", "sharded S=4"):
        for r in (rows[name], rows[f"{name} before"]):
            for key in ("forget_quality", "model_utility", "mia_loss_auc", "mia_mink_auc"):
                assert 0 <= r[key] <= 1, (name, key)
            for key in ("forget", "retain", "unseen_kept", "unseen_forgotten"):
                assert 0 <= r["router"][key] <= 1, (name, key)
            for part in ("heldout", "general"):
                # the largest share of these questions sent to one shard: at least an even split's
                assert 1 / r["shards"] <= r["router"][part]["top_share"] <= 1
                assert 1 <= r["router"][part]["shards_used"] <= r["shards"]
        r = rows[name]
        assert 0 < r["replayed_share"] <= 1 and r["time_ratio"] > 0 and r["rewind_ratio"] > 0
        assert r["cost"]["queries"] > 0 and r["cost"]["route_s_per_query"] > 0
    # a request that empties a shard drops it (retraining on nothing: no adapter, no step run); the forgotten
    # person's questions go to the other shards
    emptied = rows["sharded S=8"]
    assert len(emptied["emptied_shards"]) == 1 and emptied["replayed_share"] == 0
    assert 0 <= emptied["forget_quality"] <= 1 and emptied["router"]["forget"] == 0


def test_only_the_forgotten_peoples_shards_are_retrained(run):
    args, result, tmp = run
    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.data_seed)
    forget = set(result["forget_people"]["forget10"])
    rows = {r["method"]: r for r in result["rows"]}
    for shards in (2, 4):
        before = ShardedAdapter.read(tmp / "work" / f"sharded-{shards}")
        after = ShardedAdapter.read(tmp / "work" / f"sharded-{shards}-forget10")
        # partitioned by person: each person's facts in one shard, and the touched shards are exactly theirs
        homes = {e.extra["person"]: set() for e in data.train}
        for e in data.train:
            homes[e.extra["person"]].add(before.partition.shard_of[e.id])
        assert all(len(h) == 1 for h in homes.values())
        touched = sorted({before.names[k] for p in forget for k in homes[p]})
        assert rows[f"sharded S={shards}"]["touched_shards"] == touched
        for name in before.names:  # the others are copied: the same bytes
            if name not in touched:
                assert after.manifest["adapter_sha256"][name] == before.manifest["adapter_sha256"][name]
        # the router after the request holds no row of a removed fact
        removed = {e.id for e in data.train if e.extra["person"] in forget}
        assert removed and not removed & set(after.router().ids)
        assert removed <= set(before.router().ids)


def test_shard_thetas_are_the_weights_peft_loads(run):
    """Scoring loads each shard's weights into the bench's one peft model; they must be the numbers
    `PeftModel.from_pretrained(base, folder, subfolder=name)` holds — a copy of the same float32 file, so equal."""
    from peft import PeftModel

    from llmeraser.models import load_base_model
    from llmeraser_experiments.people_bench import PeopleBench
    from llmeraser_experiments.sharded_bench import shard_thetas, tiny_base

    args, _, tmp = run
    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.data_seed)
    base, tokenizer, path = tiny_base(data, tmp / "base-again")
    bench = PeopleBench(args, data, base, tokenizer, path)
    folder = tmp / "work" / "sharded-2-forget10"
    names = ShardedAdapter.read(folder).names
    thetas = shard_thetas(bench, folder, names)
    assert not (thetas[0] == thetas[1]).all()
    for name, theta in zip(names, thetas, strict=True):
        fresh, _ = load_base_model(str(tmp / "work" / "base"))
        peft = PeftModel.from_pretrained(fresh, str(folder), subfolder=name)
        loaded = {k: p for k, p in peft.named_parameters() if "lora_" in k}
        bench.view.set_vector(theta)
        mine = {k: p for k, p in bench.model.named_parameters() if "lora_" in k}
        assert loaded.keys() == mine.keys() and loaded
        assert all((loaded[k] == mine[k]).all() for k in mine), name


def test_unseen_questions_ask_about_trained_people_in_new_words():
    from llmeraser_experiments.sharded_bench import unseen_questions

    data = build_people(8, facts=3, n_heldout=3)
    asked = unseen_questions(data)
    assert [q.extra["person"] for q in asked] == data.people
    trained = {e.prompt for e in data.train}
    assert all(q.extra["person"] in q.prompt and q.prompt not in trained for q in asked)


def test_sharded_rows_need_the_single_adapters_rows(tmp_path):
    from llmeraser_experiments.sharded_bench import run_sharded_people_benchmark

    with pytest.raises(ConfigError, match="original and retrain"):
        run_sharded_people_benchmark(PeopleBenchArguments.tiny(methods=("retrain",)), (2,), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_shard_is_rewound_from_its_first_step(tmp_path):
    """S = 1, the reference point: one adapter on the whole set by `finetune_sharded` (its own LoRA draw, so not the
    bench's single adapter θ, only the same recipe), and a request rewinds it from step 0 — every epoch sees every
    example —, i.e. retrains it: the whole recording replayed."""
    from llmeraser_experiments.sharded_bench import run_sharded_people_benchmark

    args = PeopleBenchArguments.tiny(splits=("forget10",), methods=("original", "retrain"))
    result = run_sharded_people_benchmark(args, (1,), tmp_path / "out", work=tmp_path / "work")
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["original", "retrain", "sharded S=1 before", "sharded S=1"]
    after = rows["sharded S=1"]
    assert after["touched_shards"] == ["shard-00"] and after["replayed_share"] == 1 and after["shards"] == 1
    assert 0 <= after["forget_quality"] <= 1 and after["router"]["forget"] == after["router"]["retain"] == 1
