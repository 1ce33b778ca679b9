"""The MovieLens sharded benchmark (`llmeraser_experiments.sharded_movielens`) on the tiny pipeline: what it runs and
what the math guarantees of it (unlearn_sharded's exactness itself is tested in tests/test_sharded.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from llmeraser.data import Example, examples_hash
from llmeraser.errors import ConfigError, DataError
from llmeraser.sharded import ShardedAdapter
from llmeraser_experiments.benchmark import BenchArguments, BenchRecipe, make_setting
from llmeraser_experiments.sharded_movielens import ShardedMovieLensArguments, router_accuracy, with_user

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("recbole")
    sys.path.insert(0, str(BENCH))
    try:
        import movielens_sharded
    finally:
        sys.path.remove(str(BENCH))
    tmp = tmp_path_factory.mktemp("ml-sharded")
    assert movielens_sharded.main(["--tiny", "--work", str(tmp / "work"), "--out", str(tmp / "out")]) == 0
    return json.loads((tmp / "out" / "results.json").read_text()), tmp


def _train(result):
    from llmeraser_experiments.movielens import build_splits

    a = result["arguments"]
    return with_user(build_splits(n_train=a["n_train"], n_valid=a["n_valid"], n_test=a["n_test"], seed=0)["train"])


def test_rows_and_files(run):
    result, tmp = run
    rows = result["rows"]
    a = result["arguments"]
    expected = [(s, k, m) for s in a["settings"] for k in a["shards"] for m in ("before", "unlearned")]
    expected.insert(2 * len(a["shards"]), (a["settings"][0], 1, "retrain@1"))
    assert [(r["setting"], r["shards"], r["method"]) for r in rows] == expected
    assert "| IR-5 | S = 4, unlearned |" in (tmp / "out" / "table.md").read_text()
    for r in rows:
        assert 0 <= r["test_auc"] <= 1 and 0 <= r["test_acc"] <= 1
        if r["method"] == "retrain@1":
            continue
        assert sum(r["per_shard"]) == a["n_test"] and len(r["per_shard"]) == r["shards"]
        assert r["router_accuracy"] is None or 0 <= r["router_accuracy"] <= 1
        if r["method"] == "unlearned":
            assert 0 < r["steps_vs_retrain"] <= 1 + 1e-9 and r["time_vs_retrain"] > 0 and r["edits"] > 0
            # every touched shard is replayed from its first edited step: no more than all shards' steps
            assert 0 < r["replayed_steps"] <= r["steps"]
    # the seed-0 retrain (S = 1's rewind) and retrain@1 are the spread; RC-10's rewind at S = 1 is, bit for bit,
    # the S = 1 fine-tune on the cleaned set (the IR setting's training set)
    ir = [r for r in rows if r["setting"] == "IR-5"]
    assert len(ir[0]["retrain_auc_spread"]) == 2
    rc1 = next(r for r in rows if r["setting"] == "RC-10" and r["shards"] == 1 and r["method"] == "unlearned")
    assert rc1["equals_single_on_clean"] is True and rc1["steps_vs_retrain"] == 1


def test_only_the_removed_users_shards_are_retrained_and_forget_them(run):
    from llmeraser.params import ADAPTER_WEIGHTS

    result, tmp = run
    train = _train(result)
    setting = make_setting("IR-5", 0, train)
    removed = {e.id for e in setting.request.edits}
    users = {e.extra["user"] for e in train if e.id in removed}
    assert removed and all(e.extra["user"] not in users for e in setting.clean)  # IR removes whole users
    rows = {(r["setting"], r["shards"], r["method"]): r for r in result["rows"]}
    for shards in result["arguments"]["shards"]:
        before = ShardedAdapter.read(tmp / "work" / f"sharded-{examples_hash(train)[:12]}-{shards}")
        after = ShardedAdapter.read(tmp / "work" / f"IR-5-{shards}")
        assert not removed & set(after.partition.shard_of) and not removed & set(after.router().ids)
        touched = sorted({before.names[before.partition.shard_of[i]] for i in removed})
        assert rows["IR-5", shards, "unlearned"]["touched_shards"] == touched
        assert len(touched) <= len(users)  # one user, one shard
        for k, name in enumerate(before.names):
            if name not in touched:  # copied as they were
                assert (before.shard_dir(k) / ADAPTER_WEIGHTS).read_bytes() == \
                    (after.shard_dir(k) / ADAPTER_WEIGHTS).read_bytes()


def test_a_trained_prompt_is_routed_to_its_users_shard(run):
    """Every training prompt's nearest stored prompt is itself (the prompts are distinct), so routing the training
    set itself sends each example to its user's shard: accuracy 1."""
    from llmeraser.models import load_base_model
    from llmeraser.router import embed_prompts
    from llmeraser.task import CausalLMTask

    result, tmp = run
    train = _train(result)
    assert len({e.prompt for e in train}) == len(train)
    sharded = ShardedAdapter.read(tmp / "work" / f"sharded-{examples_hash(train)[:12]}-4")
    model, tokenizer = load_base_model(str(tmp / "work" / "base"))
    task = CausalLMTask(tokenizer, max_length=result["arguments"]["max_length"])
    routes = sharded.router().route(embed_prompts(model, task, train)).tolist()
    out = router_accuracy(sharded, train, train, routes)
    assert out["router_accuracy"] == 1 and out["router_queries"] == len(train)


def test_bad_input():
    with pytest.raises(ConfigError, match="include 1"):
        ShardedMovieLensArguments(shards=(4, 8))
    with pytest.raises(DataError, match="u<user>-<item>"):
        with_user([Example("x-1", "p", " Yes")])
    with pytest.raises(DataError, match="not its id's user"):
        with_user([Example("u3-1", "p", " Yes", {"user": 4})])
    assert with_user([Example("u3-1", "p", " Yes")])[0].extra["user"] == 3


def test_the_recipe_is_the_suites_inherited_not_restated():
    """The data sizes and fine-tuning recipe are `BenchRecipe`'s, shared with the suite's `BenchArguments`: a field
    redeclared here (or there) with another default fails this, as does a recipe field one of them lacks."""
    recipe = [f.name for f in dataclasses.fields(BenchRecipe)]
    assert recipe == ["n_train", "n_valid", "n_test", "epochs", "lr", "batch_size", "max_length", "lora"]
    mine, suite, base = ShardedMovieLensArguments(), BenchArguments(), BenchRecipe()
    assert issubclass(ShardedMovieLensArguments, BenchRecipe) and issubclass(BenchArguments, BenchRecipe)
    assert {n: getattr(mine, n) for n in recipe} == {n: getattr(suite, n) for n in recipe} == dataclasses.asdict(base)
    assert (mine.n_train, mine.epochs, mine.lr, mine.batch_size) == (400, 1, 1e-3, 8)
    tiny = ShardedMovieLensArguments.tiny(n_test=12)  # tiny's own recipe, overrides on top
    assert (tiny.n_train, tiny.n_test, tiny.lr, tiny.max_length, tiny.lora["r"]) == (48, 12, 1e-2, 48, 2)


def test_the_spread_bench_reads_draw_against_draw(run):
    """bench/sharded_spread.py on the tiny pipeline, reusing the main bench's folders: its seed-0 top-1 row is the
    main bench's score of the same unlearned folder (same model, data, batching and routing: the scores are computed
    the same way, so equal; one tied-pair flip, 1/(pos·neg), is allowed for a last-bit difference between the two
    evaluation paths); another seed is another fine-tune; the summary's difference of means is the rows'."""
    import statistics

    sys.path.insert(0, str(BENCH))
    try:
        import sharded_spread
    finally:
        sys.path.remove(str(BENCH))
    result, tmp = run
    out = tmp / "spread"
    assert sharded_spread.main(["--tiny", "--setting", "IR-5", "--seeds", "0", "1", "--retrain-seeds", "0", "1",
                                "--aggregates", "top1", "ensemble", "--work", str(tmp / "work"),
                                "--out", str(out)]) == 0
    spread = json.loads((out / "results.json").read_text())
    top1 = {r["seed"]: r["auc"] for r in spread["rows"] if r["aggregate"] == "top1"}
    main = next(r for r in result["rows"] if (r["setting"], r["shards"], r["method"]) == ("IR-5", 4, "unlearned"))
    from llmeraser_experiments.movielens import build_splits

    a = result["arguments"]
    test = build_splits(n_train=a["n_train"], n_valid=a["n_valid"], n_test=a["n_test"], seed=0)["test"]
    positives = sum(e.response.strip() == "Yes" for e in test)
    assert 0 < positives < len(test)
    assert abs(top1[0] - main["test_auc"]) <= 1 / (positives * (len(test) - positives)) + 1e-12
    assert (tmp / "work" / "IR-5-4-s1").is_dir() and not (tmp / "work" / "IR-5-4-s0").exists()
    import torch
    from safetensors.torch import load_file

    w0 = load_file(str(tmp / "work" / "IR-5-4" / "shard-00" / "adapter_model.safetensors"))
    w1 = load_file(str(tmp / "work" / "IR-5-4-s1" / "shard-00" / "adapter_model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    retrains = [r["auc"] for r in spread["rows"] if r["model"] == "retrain"]
    for g in ("top1", "ensemble"):
        mine = [r["auc"] for r in spread["rows"] if r["aggregate"] == g]
        s = spread["sharded"][g]
        assert s["n"] == 2 and s["min"] <= s["mean"] <= s["max"]
        assert s["vs_retrain"]["difference"] == pytest.approx(statistics.fmean(mine) - statistics.fmean(retrains))
    assert "S = 4, unlearned, ensemble | 2 |" in (out / "table.md").read_text()
