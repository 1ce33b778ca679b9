"""Path replay's accuracy against its cost on memorised facts: the variants of `PathArguments`, in one run.

    python bench/path_study.py                 # the table of docs/path.md#what-was-tried (about 2 minutes, 2 cores)
    python bench/path_study.py --out DIR       # also results.json
    python bench/path_study.py --case-seed 1 --retrain-seeds 1 2 3 --variants default   # another memorised group,
        # retraining's own spread (retrains with other seeds of the example order), the default replay only

Retraining's spread: "moved" of a retrain with another seed (its example order) against the seed-0 retrain's —
how far retraining is from itself on this measure; a path replay inside that range forgets as retraining does.
Auto's forecast: for rewind and the default path replay, the seconds `choose.forecast_seconds` predicts from costs
measured at θ̂ (`choose.measure_costs`), against the seconds each took in this run ("forecast / time").

The case is the test suite's (`llmeraser_experiments.memorised.memorised_people`: a tiny Llama pre-trained on the
question templates, LoRA fine-tuned 30 epochs until it memorises 5 facts about each of 16 people; one whole person
removed), in float64. Each row replays the recorded fine-tune with one setting and reports how far the removed person's
loss moved toward retraining's ("moved": 1 = as far as retraining), the kept facts' loss against the original's, the
cosine of Δθ to retraining's, and the share of retraining's gradients it computed ("cost"). Rewind is exact (moved 1,
cost = the replayed share) and is listed for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmeraser.data import load_examples
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.metrics import evaluate
from llmeraser.models import load_base_model
from llmeraser.params import ParamView
from llmeraser.record import LoraSettings, lora_model
from llmeraser.replay import KEPT_CHECK, PathArguments, first_edited_step
from llmeraser.request import apply_request, load_request
from llmeraser.table import format_table
from llmeraser.task import CausalLMTask
from llmeraser.updates import RequestContext
from llmeraser.updates.along_path import path_replay, rewind
from llmeraser.updates.choose import forecast_seconds, measure_costs
from llmeraser_experiments.memorised import PEOPLE_TARGETS, memorised_people

DEFAULT = "frozen, exact every 8th + last 50% (default)"
VARIANTS = {  # name → PathArguments overrides
    "no prediction error at all: every step exact": {"exact_every": 1, "exact_tail": 0.0},
    "frozen, no exact step": {"exact_every": 10**6, "exact_tail": 0.0},
    "frozen, exact every 8th": {"exact_every": 8, "exact_tail": 0.0},
    "frozen, exact last 20%": {"exact_every": 10**6, "exact_tail": 0.2},
    "frozen, exact last 50%": {"exact_every": 10**6, "exact_tail": 0.5},
    "frozen, exact every 16th + last 10% (path/short)": {"exact_every": 16, "exact_tail": 0.1},
    "frozen, exact every 8th + last 34%": {"exact_every": 8, "exact_tail": 0.34},
    "frozen, exact every 8th + last 50% (default)": {},
    "secant (5 pairs), exact every 4th, 8 burn-in": {"exact_every": 4, "exact_tail": 0.0, "burn_in": 8,
                                                     "history": 5},
    "secant (5 pairs), exact every 8th + last 50%": {"history": 5},
    "secant (20 pairs), exact every 8th + last 50%": {"history": 20},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write results.json here (a new folder)")
    p.add_argument("--case-seed", type=int, default=0, help="memorised_people's seed: another group of people")
    p.add_argument("--retrain-seeds", type=int, nargs="*", default=[], help="also retrain with these order seeds")
    p.add_argument("--variants", nargs="*", default=None,
                   help="only these rows of VARIANTS ('default' for the default replay; all by default)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the documented tables: 2)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = list(VARIANTS) if a.variants is None else [DEFAULT if v == "default" else v for v in a.variants]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        case = memorised_people(Path(tmp), seed=a.case_seed)
        base, tok = load_base_model(str(case["base"]), dtype="float64")
        model = lora_model(base, LoraSettings(r=4, alpha=8, targets=PEOPLE_TARGETS), seed=0)
        train = load_examples(case["train"])
        request = load_request(case["request"])
    task, view = CausalLMTask(tok, max_length=32), ParamView(model)
    edited = apply_request(train, request)
    forget = [e for e in train if e.id in set(case["removed"])]
    args = FinetuneArguments(epochs=30, lr=1e-2, batch_size=8, final_check=False)
    theta0 = view.vector()

    def losses(theta: torch.Tensor) -> tuple[float, float]:
        view.set_vector(theta)
        return evaluate(model, task, forget)["loss"], evaluate(model, task, edited)["loss"]

    result = finetune(model, task, train, args)
    theta, trajectory = view.vector(), result.trajectory
    retrains = {}
    for seed in [0, *a.retrain_seeds]:
        view.set_vector(theta0)
        start = time.perf_counter()
        finetune(model, task, edited, dataclasses.replace(args, seed=seed, record=False))
        retrains[seed] = (view.vector(), time.perf_counter() - start)
    theta_retrain, retrain_seconds = retrains[0]
    (f0, k0), (fr, kr) = losses(theta), losses(theta_retrain)
    nan = float("nan")
    rows = [{"update": "original", "moved": 0.0, "kept": 1.0, "cosine": nan, "cost": 0.0, "time": 0.0, "forecast": nan},
            {"update": "retraining", "moved": 1.0, "kept": kr / k0, "cosine": 1.0, "cost": 1.0, "time": 1.0,
             "forecast": nan}]
    target = theta_retrain - theta

    def row(name: str, new_theta: torch.Tensor, cost: float, seconds: float, forecast: float | None = None) -> dict:
        f, k = losses(new_theta)
        cos = float(torch.nn.functional.cosine_similarity(new_theta - theta, target, dim=0))
        return {"update": name, "moved": (f - f0) / (fr - f0), "kept": k / k0, "cosine": cos, "cost": cost,
                "time": seconds / retrain_seconds, "forecast": float("nan") if forecast is None else forecast / seconds}

    rows += [row(f"retraining, order seed {s}", th, 1.0, sec) for s, (th, sec) in retrains.items() if s]
    view.set_vector(theta)
    ctx = RequestContext.build(model, task, train, request)
    forecast = _forecast(ctx, trajectory)
    start = time.perf_counter()
    up = rewind(ctx, trajectory)
    rows.append(row("rewind (exact)", up.theta, up.report["rewind"]["replayed_fraction"], time.perf_counter() - start,
                    forecast["rewind"]))
    for name in names:
        view.set_vector(theta)
        start = time.perf_counter()
        up = path_replay(ctx, trajectory, PathArguments(**VARIANTS[name]))
        rows.append(row(name, up.theta, up.report["path"]["gradient_cost_vs_retraining"],
                        time.perf_counter() - start, forecast["path"] if name == DEFAULT else None))
    print(f"case seed {a.case_seed}: forgotten facts' loss: original {f0:.3f}, retrained {fr:.3f}; kept facts' loss: "
          f"original {k0:.3f}, retrained {kr:.3f}\n")
    print(format_table(rows, [("update", "update", "s"), ("moved", "moved (1 = retraining)", ".2f"),
                              ("kept", "kept loss / original's", ".2f"), ("cosine", "cos(Δθ, retrain − θ̂)", ".2f"),
                              ("cost", "exact gradients / retraining's", ".2f"), ("time", "time / retraining", ".2f"),
                              ("forecast", "forecast / time", ".2f")]))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=False)
        (out / "results.json").write_text(json.dumps({"losses": {"forget": [f0, fr], "kept": [k0, kr]},
                                                      "case_seed": a.case_seed, "rows": rows}, indent=1))
    return 0


def _forecast(ctx: RequestContext, trajectory) -> dict[str, float]:
    """auto's forecast in seconds of a rewind and of the default path replay (costs measured now, at θ̂)."""
    args = PathArguments()
    steps, first = first_edited_step(trajectory, ctx.train, set(ctx.edits))
    costs = measure_costs(ctx, trajectory, steps[first])
    n_kept = len(ctx.effective) - sum(new is not None for new in ctx.edits.values())
    return forecast_seconds(costs, args.plan(steps, first, ctx.train, ctx.edits), len(steps),
                            [len(b) for b in trajectory.schedule(ctx.effective)], trajectory.start_before(first),
                            False, min(KEPT_CHECK, n_kept))


if __name__ == "__main__":
    sys.exit(main())
