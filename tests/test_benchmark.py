"""The benchmark harness: a smoke run of `bench/run.py --quick` on a tiny model, and its parts."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from llmeraser.errors import ConfigError
from llmeraser_experiments.benchmark import BenchArguments, PeakMemory, make_setting, parse_setting, tables

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("recbole")
    sys.path.insert(0, str(BENCH))
    try:
        import run as bench_run
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path_factory.mktemp("bench") / "quick"
    assert bench_run.main(["--quick", "--settings", "IR-5", "RC-10", "--seeds", "0", "--n-train", "40",
                           "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_bench_runs_every_method_and_writes_its_outputs(quick):
    out, result = quick
    rows = result["rows"]
    by = {(r["setting"], r["method"]): r for r in rows}
    peers = {"kronfluence/ekfac"} if importlib.util.find_spec("kronfluence") else set()
    assert {m for s, m in by if s == "IR-5"} == {"original", "retrain", "retrain@1", "retrain@2", "paper",
                                                 "first-order/cg", "newton/cg", "first-order/lissa", "newton/lissa",
                                                 "first-order/sqp", "newton/sqp", "first-order/ekfac",
                                                 "first-order/kfac", "first-order/woodbury", "first-order/datainf",
                                                 "gradient-ascent", "npo", "rewind", "path", "path/secant",
                                                 "path/short", "refine", *peers}
    for m in ("first-order/ekfac", "first-order/kfac", "first-order/woodbury", "first-order/datainf", *peers):
        row = by["IR-5", m]
        assert row["fit"] > 0 and row["fit_vs_epoch"] > 0 and row["grad_only"] > 0 and row["delta_norm"] > 0
        assert row["total"] == pytest.approx(row["gradients"] + row["solve"]) and row["request_vs_grad"] > 0
    assert by["IR-5", "retrain@1"]["delta_norm"] != by["IR-5", "retrain"]["delta_norm"]
    assert ("RC-10", "fine-tune-corrected") in by and ("IR-5", "fine-tune-corrected") not in by
    for setting in ("IR-5", "RC-10"):
        retrain, original = by[setting, "retrain"], by[setting, "original"]
        assert retrain["test_kl"] == pytest.approx(0, abs=1e-12) and retrain["cosine"] == pytest.approx(1)
        assert retrain["time_ratio"] == 1 and original["delta_norm"] == 0
        for m in ("first-order/cg", "newton/cg"):
            row = by[setting, m]
            assert row["damping"] in BenchArguments().dampings and row["delta_norm"] > 0
            assert math.isfinite(row["test_auc"]) and 0 <= row["mia_auc"] <= 1
            assert row["total"] >= row["gradients"] > 0
    assert "corrected_loss" in by["RC-10", "first-order/cg"] and "corrected_loss" not in by["IR-5", "original"]
    for setting in ("IR-5", "RC-10"):
        # exact rewind is retraining (bit for bit, tests/test_path.py); path replay and refine report their costs
        rewound = by[setting, "rewind"]
        assert rewound["test_kl"] == 0 and rewound["cosine"] == pytest.approx(1) and 0 < rewound["replayed_fraction"]
        assert 0 < by[setting, "path"]["gradient_cost"] and by[setting, "path"]["exact_steps"] > 0
        refined = by[setting, "refine"]
        assert refined["residual_final"] <= refined["residual_at_start"] and refined["residual_at_original"] > 0
    assert result["commit"] and result["arguments"]["settings"] == ["IR-5", "RC-10"]
    text = (out / "tables.md").read_text()
    assert "### IR-5: instance removal, 5%" in text and "| newton/cg |" in text
    if (out / "mia.png").exists():  # only with matplotlib
        assert (out / "utility_vs_time.png").stat().st_size > 1000


def test_damping_is_the_validation_argmin(quick):
    """Tuning reads validation KL only: the chosen λ is the argmin of the recorded validation KLs."""
    _, result = quick
    for r in result["rows"]:
        if r["method"] in ("first-order/cg", "newton/cg"):
            grid = result["arguments"]["dampings"]
            assert r["damping"] == grid[min(range(len(grid)), key=r["tuning_kl"].__getitem__)]


def test_settings():
    assert parse_setting("IR-5") == ("IR", 0.05) and parse_setting("RC-40") == ("RC", 0.4)
    for bad in ("XX-5", "IR-0", "IR-abc", "IR", "RC-150"):
        with pytest.raises(ConfigError, match="unknown setting"):
            parse_setting(bad)
    with pytest.raises(ConfigError, match="retrain"):
        BenchArguments(methods=("original",))
    with pytest.raises(ConfigError, match="unknown method"):
        BenchArguments(methods=("retrain", "magic"))
    from llmeraser_experiments.movielens import build_splits

    pytest.importorskip("recbole")
    train = build_splits(n_train=60, n_valid=10, n_test=10, seed=0)["train"]
    ir = make_setting("IR-10", 1, train)
    users = {e.id.split("-")[0] for e in ir.edited}
    assert all(e.id.split("-")[0] not in users for e in ir.clean)  # every example of the chosen users goes
    assert len(ir.clean) + len(ir.edited) == 60 and not ir.corrected
    rc = make_setting("RC-10", 1, train)
    assert len(rc.edited) == 6 and [e.response for e in rc.corrected] != [e.response for e in rc.edited]
    assert rc.clean == train  # correcting the flipped labels restores the clean set


def test_tables_mean_and_std_over_seeds():
    rows = [{"setting": "IR-1", "seed": s, "method": "retrain", "test_auc": v, "total": 10.0}
            for s, v in ((0, 0.6), (1, 0.8))]
    rows.append({"setting": "IR-1", "seed": 0, "method": "newton/lissa", "failed": "diverged"})
    rows.append({"setting": "IR-1", "seed": 1, "method": "newton/lissa", "test_auc": 0.5, "total": 1.0})
    text = tables(rows)
    assert "| retrain | 0.7000 ± 0.1414 |" in text and "### IR-1: instance removal, 1% (2 seeds)" in text
    assert "| newton/lissa (failed 1/2) | 0.5000 |" in text


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        del x
    assert mem.mib == pytest.approx(64, abs=16) or math.isnan(mem.mib)


def _tiny_bench(**overrides):
    from llmeraser.testing import tiny_llama, tiny_tokenizer
    from llmeraser_experiments.benchmark import Bench

    tok = tiny_tokenizer()
    args = BenchArguments(max_length=24, progress=False,
                          lora={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}, **overrides)
    return Bench(args, {}, tiny_llama(len(tok), init_std=0.3), tok)


def test_baseline_is_adam_over_minibatches_in_epoch_order():
    """_descend = `baseline_epochs` passes of Adam on mean objective over mini-batches in id-hash order (float64)."""
    from llmeraser.task import per_example_loss
    from llmeraser.testing import fact_examples
    from llmeraser.trajectory import epoch_order
    from llmeraser_experiments.benchmark import _descend

    bench = _tiny_bench(batch_size=2, baseline_epochs=2)
    examples = fact_examples(5, seed=1)
    theta0 = bench.init(0) + 0.1 * torch.randn(bench.view.dim, dtype=torch.float64)
    got, seconds = _descend(bench, theta0, examples, lambda loss, chunk: -loss, 1e-2, seed=3)
    bench.view.set_vector(theta0)
    opt = torch.optim.Adam(bench.view.params, lr=1e-2)
    for epoch in range(2):
        order = [examples[i] for i in epoch_order(examples, 3, epoch)]
        for batch in ([order[0], order[1]], [order[2], order[3]], [order[4]]):
            opt.zero_grad()
            (-per_example_loss(bench.task, bench.model, bench.task.collate(batch)).mean()).backward()
            opt.step()
    assert torch.allclose(got, bench.view.vector(), rtol=0, atol=1e-10) and seconds > 0
    assert not torch.allclose(got, theta0)


def test_npo_starts_as_gradient_ascent_then_fades():
    """NPO's gradient at θ̂ is gradient ascent's (one Adam step agrees); later steps are damped, so it moves less."""
    from llmeraser.request import Request
    from llmeraser.testing import fact_examples
    from llmeraser_experiments.benchmark import Run, Setting, _baseline, _descend, _objective

    train = fact_examples(8, seed=2)
    bench = _tiny_bench(batch_size=4, baseline_epochs=1, npo_beta=0.5)
    bench.splits = {"valid": train[:3]}
    theta = bench.init(0) + 0.1 * torch.randn(bench.view.dim, dtype=torch.float64)
    setting = Setting("IR-50", 0, train, Request.remove(*[e.id for e in train[4:]]))
    run = Run(setting, theta, theta, 1.0, 0.0, [0.5] * 3, [])
    (ex, ga), (_, npo) = _objective(bench, run, "gradient-ascent"), _objective(bench, run, "npo")
    assert ex == setting.edited and len(ex) == 4  # one mini-batch: one Adam step
    step_ga, _ = _descend(bench, theta, ex, ga, 1e-2, seed=0)
    step_npo, _ = _descend(bench, theta, ex, npo, 1e-2, seed=0)
    # the two gradients are equal only up to rounding (different expressions), and Adam's first step maps a gradient
    # g to lr·g/(|g| + ε): on near-zero components that amplifies rounding by lr/ε = 1e6, so 1e-16 becomes ≤ 1e-10
    assert torch.allclose(step_ga, step_npo, rtol=0, atol=1e-9)
    chunk = ex[:2]
    ref = torch.tensor([bench.evaluate(theta, ex)["losses"][e.id] for e in chunk], dtype=torch.float64)
    loss = ref + torch.tensor([10.0, -10.0], dtype=torch.float64)  # far above / below the reference
    weights = torch.sigmoid(0.5 * (ref - loss))  # d npo / d(−ℓ) = 2σ(β(ℓ_ref − ℓ))
    loss.requires_grad_(True)
    npo(loss, chunk).sum().backward()
    assert torch.allclose(-loss.grad, 2 * weights) and -loss.grad[0] < 0.1 < 1.9 < -loss.grad[1]
    bench.args.baseline_epochs = 3
    far_ga, far_npo = _descend(bench, theta, ex, ga, 1e-2, seed=0)[0], _descend(bench, theta, ex, npo, 1e-2, seed=0)[0]
    assert not torch.allclose(far_ga, far_npo)
    theta_npo, info = _baseline(bench, run, "npo")
    assert info["lr"] in bench.args.baseline_lrs["npo"] and len(info["tuning_kl"]) == 2


def test_plan_core_everywhere_study_and_more_seeds_once():
    from llmeraser_experiments.benchmark import CORE, STUDY, plan

    jobs = plan(BenchArguments(settings=("IR-1", "RC-10"), seeds=(0,)))
    assert [j[:2] for j in jobs] == [("IR-1", 0), ("RC-10", 0), ("IR-1", 1), ("IR-1", 2)]
    assert jobs[0][2] == (*CORE, *STUDY) and jobs[1][2] == jobs[2][2] == CORE
    jobs = plan(BenchArguments(settings=("QM-5",), seeds=(0, 1), more_seeds={"QM-5": (1, 7)}, study_settings=()))
    assert [j[:2] for j in jobs] == [("QM-5", 0), ("QM-5", 1), ("QM-5", 7)]
    with pytest.raises(ConfigError, match="unknown method"):
        BenchArguments(study_methods=("magic",))


# ------------------------------------------------------------------------------------------- bench/scale.py
def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_scale_smoke_writes_every_operation_and_its_fields(tmp_path):
    """A tiny run of bench/scale.py (N = 32, 32 tokens; seconds): every operation is a row with its fields, the
    ratios are taken within the run, and rows.json, rows.csv, table.md (and, with matplotlib, scale.png) exist."""
    import csv

    scale = _bench_module("scale")
    out = tmp_path / "scale"
    assert scale.main(["--cpu-tiny", "--n", "32", "--tokens", "32", "--kinds", "ekfac", "--cg-samples",
                       "8", "--cg-iters", "4", "--removed", "3", "--out", str(out),
                       "--work", str(tmp_path / "work")]) == 0
    result = json.loads((out / "rows.json").read_text())
    rows = {r["operation"]: r for r in result["rows"]}
    assert list(rows) == ["fine-tune (recorded)", "epoch", "retrain", "fit ekfac", "request ekfac", "request cg",
                          "rewind", "path"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r.get("note"))
        assert (r["mode"], r["model"], r["lora"], r["n"], r["device"]) == ("cpu-tiny", "tiny", "r8-qv", 32, "cpu")
        assert r["params"] > 0 and r["base_params"] > r["params"] and r["tokens"] == 32
        assert r["seconds"] > 0 and math.isfinite(r["epochs"]) and math.isfinite(r["retrain_over"])
        # the ratios are the run's own seconds over the epoch's and retraining's
        assert r["epochs"] == pytest.approx(r["seconds"] / rows["epoch"]["seconds"])
        assert r["retrain_over"] == pytest.approx(rows["retrain"]["seconds"] / r["seconds"])
    for name in ("request ekfac", "request cg"):
        # the report's gradients and solve happen inside the timed operation, so they cannot exceed its seconds
        r = rows[name]
        assert 0 < r["gradients_s"] and 0 <= r["solve_s"] and r["gradients_s"] + r["solve_s"] <= r["seconds"]
    assert rows["fine-tune (recorded)"]["recording_bytes"] > 0 and rows["fine-tune (recorded)"]["detail"] == "4 steps"
    assert "replayed_fraction" in rows["rewind"]["detail"] and "gradient_cost" in rows["path"]["detail"]
    assert rows["fine-tune (recorded)"]["rss_mib"] >= 0 or math.isnan(rows["fine-tune (recorded)"]["rss_mib"])
    with open(out / "rows.csv", encoding="utf-8") as f:
        assert next(csv.reader(f)) == scale.FIELDS
    table = (out / "table.md").read_text()
    assert "N = 32" in table and "| request cg | ok |" in table and "| retrain ÷ this |" in table
    if importlib.util.find_spec("matplotlib"):
        assert (out / "scale.png").stat().st_size > 1000


def test_scale_runner_records_failures_skips_forecasts_and_stops_at_the_limit(tmp_path):
    """One operation failing, forecast too long, or running past --max-seconds is a row saying so, not a crash."""
    import argparse
    import time

    scale = _bench_module("scale")
    runner = scale.Runner(argparse.Namespace(device="cpu", max_seconds=0.5, debug=False), tmp_path)
    cfg = {"mode": "cpu-tiny", "model": "tiny", "lora": "r8-qv", "n": 100, "device": "cpu", "dtype": "float32"}

    def fail():
        raise ValueError("no such thing\nsecond line")

    assert runner.op(cfg, "broken", fail)["status"] == "failed"
    assert runner.rows[-1]["note"] == "ValueError: no such thing"
    assert runner.op(cfg, "fine", lambda: {"detail": "x"})["status"] == "ok"
    assert runner.forecast({**cfg, "n": 1000}, "fine") == pytest.approx(10 * runner.rows[-1]["seconds"])
    skipped = runner.op(cfg, "long", lambda: {}, forecast=5.0)
    assert skipped["status"] == "skipped" and "forecast 5 s > --max-seconds 0.5" in skipped["note"]

    def forever():
        while True:
            time.sleep(0.01)

    stopped = runner.op(cfg, "forever", forever)
    assert stopped["status"] == "stopped" and "--max-seconds 0.5" in stopped["note"]
    # a stopped operation's seconds are a lower bound: a larger N is then forecast past the limit and skipped
    assert runner.op({**cfg, "n": 200}, "forever", forever)["status"] == "skipped"
    runner.write()
    assert [r["operation"] for r in json.loads((tmp_path / "rows.json").read_text())["rows"]] == [
        "broken", "fine", "long", "forever", "forever"]
