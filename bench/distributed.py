"""Data-parallel scaling: wall time of the same unlearn request and factor fit with 1 process and with 2 (torchrun,
gloo), on the embedded model (SmolLM2-135M-Instruct + the demo's LoRA adapter, MovieLens-100k, 400 examples).

    python bench/distributed.py                    # about 10 minutes on 2 cores; writes bench/results/distributed/
    python bench/distributed.py --samples 16 --iters 2 --out /tmp/d   # a smaller run

Every run is the command line a user types: `llmeraser unlearn ...` and `llmeraser fit-curvature ...` in 1 process
(torch's default 2 threads, and pinned to 1 thread) and under `torchrun --standalone --nproc-per-node 2 -m llmeraser`
(torchrun pins each rank to 1 thread). `wall s` is the whole command (start-up, model load, work); `work s` is the
report's own seconds (gradients + solve; for fit-curvature the fit). Speed-up = the 1-process, 2-thread time / this
time, all in one run.
The adapters of the 1- and 2-process runs are compared (max |Δ| of the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmeraser.table import format_table

RESULTS = Path(__file__).parent / "results" / "distributed"


def run(cmd: list[str], threads: int | None) -> float:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32, help="curvature examples of the cg request")
    p.add_argument("--iters", type=int, default=4, help="cg iterations (each one curvature product)")
    p.add_argument("--fit-samples", type=int, default=64, help="examples of the EK-FAC fit")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    from safetensors.torch import load_file

    from llmeraser.data import save_examples
    from llmeraser_experiments.demo import MovieLensJob

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmeraser-dist-"))  # MovieLens may not be redistributed: not in the repo
    job = MovieLensJob.build(progress=False)
    adapter = job.adapter("default")
    save_examples(job.splits["train"], work / "train.jsonl")
    (work / "request.json").write_text(json.dumps(job.request.to_dict()))
    llm = [sys.executable, "-m", "llmeraser"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmeraser"]
    common = ["--adapter", str(adapter), "--train", str(work / "train.jsonl"), "--quiet"]
    unlearn = ["unlearn", *common, "--request", str(work / "request.json"), "--solver", "cg", "--damping", "0.3",
               "--curvature-samples", str(args.samples), "--solver-max-iters", str(args.iters), "--solver-tol", "0"]
    fit = ["fit-curvature", *common, "--kind", "ekfac", "--samples", str(args.fit_samples)]
    configs = [("1 process, 2 threads", llm, None), ("1 process, 1 thread", llm, 1),
               ("2 processes (torchrun)", two, None)]
    rows = []
    for job_name, cmd in (("unlearn cg", unlearn), ("fit-curvature ekfac", fit)):
        for name, launcher, threads in configs:
            tag = f"{job_name.split()[0]}-{len(rows)}"
            dest = ["--out", str(work / tag)] if job_name.startswith("unlearn") else ["--factors", str(work / tag)]
            wall = run([*launcher, *cmd, *dest], threads)
            if job_name.startswith("unlearn"):
                report = json.loads((work / tag / "report.json").read_text())
                seconds = report["seconds"]["total"]
            else:
                seconds = json.loads((work / tag / "ekfac" / "meta.json").read_text())["seconds"]["total"]
            rows.append({"job": job_name, "config": name, "wall": wall, "work": seconds, "tag": tag})
            print(f"{job_name:20s} {name:24s} wall {wall:7.1f} s  work {seconds:7.1f} s", flush=True)
    for job_name in ("unlearn cg", "fit-curvature ekfac"):
        mine = [r for r in rows if r["job"] == job_name]
        ref = mine[0]
        for r in mine:
            r["speedup_wall"], r["speedup_work"] = ref["wall"] / r["wall"], ref["work"] / r["work"]
        if job_name.startswith("unlearn"):
            w0 = load_file(str(work / mine[0]["tag"] / "adapter_model.safetensors"))
            w2 = load_file(str(work / mine[-1]["tag"] / "adapter_model.safetensors"))
            mine[-1]["max_diff"] = max(float((w0[k] - w2[k]).abs().max()) for k in w0)
    table = format_table(rows, [("job", "job", ""), ("config", "launch", ""), ("wall", "wall s", ".1f"),
                                ("work", "work s", ".1f"), ("speedup_wall", "speed-up (wall)", ".2f"),
                                ("speedup_work", "speed-up (work)", ".2f")])
    print(table)
    meta = {"args": vars(args), "n_train": len(job.splits["train"]), "edits": len(job.request.edits),
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "cpus": os.cpu_count()}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "table.md").write_text(f"```\n{table}\n```\n")


if __name__ == "__main__":
    main()
