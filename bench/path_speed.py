"""Path replay's wall time against rewind's, in one run (issue 26's goal: "path replay's wall time ≤ its share of the
gradients × rewind's").

The setup is `bench/scale.py --cpu-tiny`'s: a tiny random-weight Llama (float32, LoRA r 8 on q_proj/v_proj), N
synthetic examples of --tokens tokens, one recorded epoch of batch 8, and a request removing --removed examples spread
over the data. Each `unlearn --method rewind` and `--method path` is a whole operation as a user runs it
(`AdapterJob.unlearn`: load the model, verify the recording, replay, write the adapter), timed wall and process-CPU,
the best of --repeats (interleaved). The goal ratio is path's seconds / (its share of retraining's gradients / the
share of steps rewind replays × rewind's seconds): ≤ 1 meets the goal; it is given for the best times and for each
repetition (a rewind and the path replay after it), with their median (the machine's load drifts). Runs against
whichever llmeraser is on PYTHONPATH, so the same command measures before and after a change:

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/path_speed.py --n 10000

--profile METHOD prints a cProfile of one more run of that method (not timed).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from scale import LORAS, random_base, synthetic

from llmeraser.finetune import FinetuneArguments, finetune_adapter
from llmeraser.job import AdapterJob
from llmeraser.request import Request
from llmeraser.updates import UnlearnOptions


def build(a: argparse.Namespace, work: Path) -> tuple[Path, list, Request, str]:
    """(the recorded adapter, the training set, the request, the base), the adapter reused when already in `work`."""
    base = random_base("tiny", work / "base-tiny", dtype="float32", device="cpu")
    train = synthetic(a.n, a.tokens, seed=0)
    k = min(a.removed, max(1, a.n // 10))
    request = Request.remove(*[train[(2 * i + 1) * a.n // (2 * k)].id for i in range(k)])
    adapter = work / f"adapter-{a.n}-{a.tokens}-{a.batch_size}"
    if not (adapter / "trajectory.safetensors").is_file():
        shutil.rmtree(adapter, ignore_errors=True)
        ft = FinetuneArguments(epochs=1, lr=1e-3, batch_size=a.batch_size, seed=0, record=True, final_check=False)
        t0 = time.perf_counter()
        finetune_adapter(train, adapter, lora=LORAS["r8-qv"], args=ft, max_length=a.tokens, base_model=base,
                         dtype="float32", device="cpu")
        print(f"recorded fine-tune: {time.perf_counter() - t0:.1f} s", flush=True)
    return adapter, train, request, base


def unlearn(adapter: Path, train, request: Request, base: str, method: str, work: Path) -> tuple[float, float, dict]:
    """(wall, CPU seconds, the method's report, with the update's own seconds under "replay_s") of one whole
    `unlearn --method METHOD`."""
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    done = AdapterJob(adapter, train, base_model=base, dtype="float32", device="cpu").unlearn(
        request, out, UnlearnOptions(method=method))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(out, ignore_errors=True)
    return wall, cpu, done.report[method] | {"replay_s": done.report["seconds"]["total"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--removed", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of each; the best is reported")
    p.add_argument("--work", default=None, help="keeps the base and the recorded adapter (default: a temp folder)")
    p.add_argument("--profile", choices=["rewind", "path"], default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="llmeraser-path-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    adapter, train, request, base = build(a, work)
    best: dict[str, tuple[float, float, dict]] = {}
    pairs = []  # each repetition's path seconds over its own goal: the machine's load drifts between repetitions
    for _ in range(a.repeats):
        runs = {}
        for method in ("rewind", "path"):
            runs[method] = run = unlearn(adapter, train, request, base, method, work)
            print(f"{method}: {run[0]:.2f} s wall, {run[1]:.2f} s CPU", flush=True)
            if method not in best or run[0] < best[method][0]:
                best[method] = run
        scale = runs["path"][2]["gradient_cost_vs_retraining"] / runs["rewind"][2]["replayed_fraction"]
        pairs.append(runs["path"][0] / (scale * runs["rewind"][0]))
    (rw, rc, rr), (pw, pc, pr) = best["rewind"], best["path"]
    share, replayed = pr["gradient_cost_vs_retraining"], rr["replayed_fraction"]
    goal = share / replayed * rw
    print(json.dumps({"n": a.n, "threads": torch.get_num_threads(), "rewind_s": rw, "rewind_cpu_s": rc,
                      "path_s": pw, "path_cpu_s": pc, "path_gradient_share": share, "rewind_replayed_share": replayed,
                      "goal_s": goal, "path_over_goal": pw / goal, "path_cpu_over_goal": pc / (share / replayed * rc),
                      "path_over_goal_each": pairs, "path_over_goal_median": statistics.median(pairs),
                      # the update's own seconds (its report's), and the rest of the command (load the model, hash
                      # and verify, write): the rest is paid whole by both, the goal scales it by the share
                      "rewind_replay_s": rr["replay_s"], "rewind_rest_s": rw - rr["replay_s"],
                      "path_replay_s": pr["replay_s"], "path_rest_s": pw - pr["replay_s"],
                      "path_steps": {k: pr[k] for k in ("exact_steps", "predicted_steps", "gradient_calls")}},
                     indent=1))
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        unlearn(adapter, train, request, base, a.profile, work)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
