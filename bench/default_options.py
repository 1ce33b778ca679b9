"""`llmeraser unlearn` with default options on the embedded demo's request: is the default safe?

The demo's setting (MovieLens-100k, SmolLM2-135M-Instruct + LoRA, remove every example of the 3 users with the most
training examples; the original and the retrain are the demo's cached fine-tunes). The request goes through the
command line exactly as a user types it, with nothing but the required flags, then with the flags of each variant
below. Each output is scored on the VALIDATION split by the mean KL divergence of its yes/no answers from the
retrained model's, against doing nothing (the original adapter).

    python bench/default_options.py            # ~10 min on 2 cores once the demo's fine-tunes are cached

Writes bench/results/default_options.json (every number, the reports' damping rules, the git commit) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmeraser.cli import main as cli
from llmeraser.data import save_examples
from llmeraser.io import atomic_write_json
from llmeraser.metrics import binary_kl, yes_no_probabilities
from llmeraser.models import load_base_model
from llmeraser.params import load_adapter
from llmeraser.table import format_table
from llmeraser.task import CausalLMTask
from llmeraser_experiments.benchmark import git_commit
from llmeraser_experiments.demo import MovieLensJob

RESULTS = Path(__file__).parent / "results"
VARIANTS = {  # name → extra flags (the first is the default: no flags at all)
    "default options": [],
    "--solver cg --curvature-samples 8 --solver-max-iters 8": ["--solver", "cg", "--curvature-samples", "8",
                                                                "--solver-max-iters", "8"],
    "--solver ekfac": ["--solver", "ekfac"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(RESULTS / "default_options.json"))
    args = parser.parse_args()
    job = MovieLensJob.build(progress=False)
    original, retrained = job.adapter("default"), job.adapter("default", retrain=True)
    base, tokenizer = load_base_model("default")
    task = CausalLMTask(tokenizer, max_length=job.max_length)
    valid = job.splits["valid"]

    def p_yes(adapter: Path):
        return yes_no_probabilities(load_adapter(load_base_model("default")[0], adapter, trainable=False), task,
                                    valid)

    reference = p_yes(retrained)
    rows = [{"method": "original (no update)", "kl": binary_kl(reference, p_yes(original)), "damping": float("nan"),
             "rule": "—", "solver": "—", "delta_norm": 0.0, "seconds": float("nan")}]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_examples(job.splits["train"], work / "train.jsonl")
        (work / "request.json").write_text(json.dumps(job.request.to_dict()))
        for i, name in enumerate(args.variants):
            out = work / f"out{i}"
            start = time.perf_counter()
            code = cli(["unlearn", "--adapter", str(original), "--train", str(work / "train.jsonl"), "--request",
                        str(work / "request.json"), "--out", str(out), "--factors", str(work / "factors"), "--quiet",
                        *VARIANTS[name]])
            if code != 0:
                raise SystemExit(f"{name}: llmeraser unlearn exited {code}")
            report = json.loads((out / "report.json").read_text())
            rule = report.get("damping_rule", {})
            rows.append({"method": name, "kl": binary_kl(reference, p_yes(out)), "damping": report["damping"],
                         "rule": (f"{rule['relative_damping']:g} × {rule['scale']:.3g}"
                                  if rule.get("rule") == "relative" else rule.get("rule", "—")),
                         "solver": report["solver"], "delta_norm": report["delta_norm"],
                         "seconds": time.perf_counter() - start, "report": report})
    print(format_table(rows, [("method", "unlearn flags", ""), ("solver", "solver", ""), ("rule", "λ rule", ""),
                              ("damping", "λ", ".3g"), ("kl", "valid KL→retrain", ".5f"), ("delta_norm", "‖Δθ‖", ".4f"),
                              ("seconds", "wall s", ".0f")]))
    atomic_write_json(args.out, {"commit": git_commit(), "rows": rows, "variants": args.variants,
                                 "n_valid": len(valid), "removed": len(job.forget)})


if __name__ == "__main__":
    main()
