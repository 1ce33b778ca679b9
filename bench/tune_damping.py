"""Choose the embedded demo's damping λ (and curvature sample) on validation data, against retraining.

For the demo's request (remove every example of the 3 users with the most examples), retrain without them (cached),
then for each curvature sample size compute the unlearning update for every λ of a grid from one Krylov run
(`eraser.damping_path`) and score it on the VALIDATION split — never the test split — by the mean KL divergence of
its yes/no answers from the retrained model's. The λ with the smallest KL is the demo's default (`DEMO_DAMPING`).

    python bench/tune_damping.py                 # ~10 min on 2 cores (the retrain is cached after the first run)
    python bench/tune_damping.py --dampings 1 0.1 --samples 8

Writes bench/results/tune_damping.json (every number, the git commit, the arguments) and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmeraser.eraser import EraserArguments, damping_path
from llmeraser.io import atomic_write_json
from llmeraser.metrics import binary_kl, evaluate
from llmeraser.models import load_base_model
from llmeraser.params import ParamView, load_adapter
from llmeraser.solvers.api import solver_arguments
from llmeraser.table import format_table
from llmeraser.task import CausalLMTask
from llmeraser_experiments.benchmark import git_commit
from llmeraser_experiments.demo import MovieLensJob

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dampings", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03, 0.01, 0.003])
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 32], help="curvature sample sizes")
    parser.add_argument("--max-iters", type=int, default=8, help="Lanczos/CG steps (the demo uses 8)")
    parser.add_argument("--base-model", default="default")
    parser.add_argument("--out", default=str(RESULTS / "tune_damping.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    job = MovieLensJob.build()
    train, valid = job.splits["train"], job.splits["valid"]
    original_dir, retrain_dir = job.adapter(args.base_model), job.adapter(args.base_model, retrain=True)
    base, tokenizer = load_base_model(args.base_model)
    task = CausalLMTask(tokenizer, max_length=job.max_length)
    retrained = load_adapter(load_base_model(args.base_model)[0], retrain_dir)
    reference = evaluate(retrained, task, valid, progress=True)
    ref_p = list(reference["p_yes"].values())
    model = load_adapter(base, original_dir)
    view = ParamView(model)
    theta = view.vector()

    def score(name: str, extra: dict) -> dict:
        ev_valid, ev_forget = evaluate(model, task, valid, progress=True), evaluate(model, task, job.forget)
        return {"method": name, **extra, "valid_kl": binary_kl(ref_p, list(ev_valid["p_yes"].values())),
                "valid_auc": ev_valid["auc"], "valid_loss": ev_valid["loss"], "forget_loss": ev_forget["loss"]}

    rows = [score("original (no update)", {"damping": float("nan"), "samples": 0, "delta_norm": 0.0,
                                           "residual": float("nan"), "seconds": 0.0})]
    ref_forget = evaluate(retrained, task, job.forget)["loss"]
    for samples in args.samples:
        eraser = EraserArguments(method="first-order", solver="cg", curvature="ggn", curvature_samples=samples,
                                 progress=True, solver_args=solver_arguments("cg", max_iters=args.max_iters, tol=1e-3))
        start = time.perf_counter()
        path = damping_path(model, task, train, job.request, eraser, args.dampings)
        seconds = time.perf_counter() - start
        for update in path:
            view.set_vector(theta + update.delta)
            rows.append(score("first-order + cg", {"damping": update.report["damping"], "samples": samples,
                                                   "delta_norm": update.report["delta_norm"],
                                                   "residual": update.solve.residual, "seconds": seconds}))
        view.set_vector(theta)
    candidates = [r for r in rows if r["samples"]]
    best = min(candidates, key=lambda r: r["valid_kl"])
    rows.append({"method": "retrain (reference)", "damping": float("nan"), "samples": 0, "valid_kl": 0.0,
                 "valid_auc": reference["auc"], "valid_loss": reference["loss"], "forget_loss": ref_forget,
                 "delta_norm": float((ParamView(retrained).vector() - theta).norm()), "residual": float("nan"),
                 "seconds": float("nan")})
    columns = [("method", "method", ""), ("samples", "curv. samples", "d"), ("damping", "λ", "g"),
               ("valid_kl", "valid KL→retrain", ".5f"), ("valid_auc", "valid AUC", ".4f"),
               ("valid_loss", "valid loss", ".4f"), ("forget_loss", "forget loss", ".4f"),
               ("delta_norm", "‖Δθ‖", ".4f"), ("residual", "residual", ".1e"), ("seconds", "path s", ".1f")]
    table = format_table(rows, columns)
    print(table)
    print(f"\nchosen on validation data: λ = {best['damping']:g} with {best['samples']} curvature samples "
          f"(valid KL to retrain {best['valid_kl']:.5f}; doing nothing: {rows[0]['valid_kl']:.5f})")
    atomic_write_json(args.out, {"commit": git_commit(), "arguments": vars(args), "rows": rows, "best": best,
                                 "request": job.request.to_dict(), "users": job.users, "table": table})


if __name__ == "__main__":
    main()
