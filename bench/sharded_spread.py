"""The sharded model's own spread over training seeds, against the single adapter's retrain-vs-retrain spread (issue
27's MovieLens goal; docs/sharded.md#measured-movielens).

One sharded fine-tune is one draw: its LoRA initialisation and batch order come from a seed, as a retrain's do. So the
goal's comparison is read here draw against draw: the sharded folder fine-tuned from each of `--seeds` (same partition:
it depends on the users only), the setting's request applied (`unlearn_sharded`; the request is the setting's, drawn
with seed 0 as in bench/movielens_sharded.py), each served top-1, weighted and ensemble (`serving.evaluate_sharded`,
temperature 0.05); and the single adapter retrained on the cleaned set from each of `--retrain-seeds`. The summary per
aggregation: mean, SD, min and max of the test AUC, and the difference of means with its standard error (Welch).

    python bench/sharded_spread.py --seeds 0 1 2 3 4 5 --retrain-seeds 0 1 2 3 4 5 6 7 8 9 10 \\
        --work /tmp/shm-work --out bench/results/movielens-sharded/spread-s4-ir1
    python bench/sharded_spread.py --tiny --out DIR     a tiny random model, seconds

`--work` keeps every folder (bench/movielens_sharded.py's names: a rerun or the main bench's work reuses them);
retrain seed 0 is the S = 1 rewind of the main bench, bit for bit (fine-tuned here when absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmeraser.errors import ConfigError, DataError
from llmeraser.io import atomic_write_json, atomic_write_text, check_new_output
from llmeraser.serving import evaluate_sharded
from llmeraser_experiments.benchmark import git_commit, make_setting
from llmeraser_experiments.movielens import build_splits
from llmeraser_experiments.sharded_movielens import (
    Runner,
    ShardedMovieLensArguments,
    base_model_path,
    seeded,
    with_user,
)

AGGREGATES = ("top1", "weighted", "ensemble")


def summary(aucs: list[float]) -> dict:
    return {"n": len(aucs), "mean": statistics.fmean(aucs), "sd": statistics.stdev(aucs) if len(aucs) > 1 else None,
            "min": min(aucs), "max": max(aucs)}


def welch(a: list[float], b: list[float]) -> dict | None:
    """mean(a) − mean(b), its standard error (Welch: unequal variances) and the two-sided p of Welch's t-test."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return {"difference": statistics.fmean(a) - statistics.fmean(b), "se": se,
            "p": float(stats.ttest_ind(a, b, equal_var=False).pvalue)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="IR-1")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5], help="sharded fine-tunes' seeds")
    p.add_argument("--retrain-seeds", nargs="+", type=int, default=list(range(11)), help="single retrains' seeds")
    p.add_argument("--aggregates", nargs="+", default=list(AGGREGATES), choices=AGGREGATES)
    p.add_argument("--lr", type=float, default=None,
                   help="the recipe's learning rate for every fine-tune here (default: the suite's, 1e-3); another "
                        "keeps its folders under WORK/lr<LR>")
    p.add_argument("--split", default="test", choices=["test", "valid"],
                   help="where the AUC is measured: the suite's test split, or its validation split (to choose a "
                        "recipe on without looking at the test)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and 48 training examples: seconds")
    p.add_argument("--work", default=None, metavar="DIR", help="keep every folder here, reused by a rerun")
    p.add_argument("--out", required=True, help="output folder (new): results.json, table.md")
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        check_new_output(out)
        make = ShardedMovieLensArguments.tiny if a.tiny else ShardedMovieLensArguments
        args, recipe_lr = make(**({} if a.lr is None else {"lr": a.lr})), make().lr
        if a.shards < 2:
            raise ConfigError("--shards must be ≥ 2 (S = 1 is the single adapter: its spread is the retrains')")
        splits = build_splits(n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test, seed=0)
        train, test = with_user(splits["train"]), with_user(splits[a.split])
        setting = make_setting(a.setting, args.seed, train)
        original, clean = with_user(setting.train), with_user(setting.clean)
        with tempfile.TemporaryDirectory(prefix="llmeraser-spread-") as tmp:
            work = Path(a.work or tmp) / (f"lr{args.lr:g}" if args.lr != recipe_lr else "")  # folders don't name lr
            work.mkdir(parents=True, exist_ok=True)
            base = base_model_path(args.base_model, train, work)
            run = Runner(args, base, test, work)
            started, rows = time.perf_counter(), []
            for seed in a.seeds:
                folder, _ = run.sharded(original, a.shards, seed=seed)
                after, _ = run.unlearn(folder, original, setting.request,
                                       f"{a.setting}-{a.shards}{seeded(seed, args.seed)}")
                for aggregate in a.aggregates:
                    r = evaluate_sharded(after, test, base_model=base, aggregate=aggregate, device="cpu",
                                         batch_size=args.batch_size, temperature=0.05)
                    rows.append({"model": f"S = {a.shards}", "seed": seed, "aggregate": aggregate, "auc": r["auc"]})
                    print(json.dumps(rows[-1]), flush=True)
            for seed in a.retrain_seeds:
                folder, _ = run.retrain(clean, seed)
                rows.append({"model": "retrain", "seed": seed, "aggregate": None,
                             "auc": run.score(folder)["test_auc"]})
                print(json.dumps(rows[-1]), flush=True)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    retrains = [r["auc"] for r in rows if r["model"] == "retrain"]
    compared = {g: {**summary(x), "vs_retrain": welch(x, retrains)} for g in a.aggregates
                if (x := [r["auc"] for r in rows if r["aggregate"] == g])}
    result = {"commit": git_commit(), "command": " ".join(sys.argv), "setting": a.setting, "shards": a.shards,
              "split": a.split,
              "arguments": dataclasses.asdict(args), "rows": rows, "retrain": summary(retrains),
              "sharded": compared, "seconds": time.perf_counter() - started}
    out.mkdir(parents=True)
    atomic_write_json(out / "results.json", result)
    lines = [f"{a.setting}, {a.split} AUC over seeds | n | mean | SD | min | max | mean − retrains' (SE) | Welch p",
             "---|---:|---:|---:|---:|---:|---:|---:"]
    for name, s in [("single adapter retrained", result["retrain"]), *(
            (f"S = {a.shards}, unlearned, {g}", v) for g, v in compared.items())]:
        vs = s.get("vs_retrain")
        sd = "—" if s["sd"] is None else f"{s['sd']:.4f}"
        lines.append(f"{name} | {s['n']} | {s['mean']:.4f} | {sd} | {s['min']:.4f} | {s['max']:.4f} | "
                     + (f"{vs['difference']:+.4f} ({vs['se']:.4f}) | {vs['p']:.2g}" if vs else "— | —"))
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
