"""Run the benchmarks: the paper's three experiments against retraining and other unlearning methods.

    make bench         # python bench/run.py          the embedded model: the full suite (about 2 h on 2 cores)
    make bench-quick   # python bench/run.py --quick  a tiny offline model, every setting and method, 3 seeds (minutes)
    python bench/run.py --settings IR-1 RC-10 --seeds 0 1 2 --methods original retrain first-order/cg --out DIR

The full suite: every setting with the core methods on seed 0, IR-1 (the cheap setting) on seeds 1 and 2 too, and
the solver/baseline study (newton, lissa, sqp, NPO) on IR-1 seed 0. Results are rewritten after every
(setting, seed), so a run that stops keeps what it finished.

Writes OUT/results.json (every number, the git commit, all arguments), OUT/tables.md (one table per setting,
mean ± std over seeds) and OUT/utility_vs_time.png, OUT/mia.png. Hyper-parameters (damping, baseline learning
rates) are chosen on the validation split by KL to the retrained model; every reported metric is on the test split
or on the edited examples. What the columns mean: `llmeraser_experiments.benchmark` and docs/benchmarks.md#columns.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

import torch

from llmeraser.errors import ConfigError
from llmeraser_experiments.benchmark import CORE, METHODS, PEERS, SETTINGS, STUDY, BenchArguments, run_benchmark

RESULTS = Path(__file__).parent / "results"


def quick_model():
    """A tiny random Llama and a byte-level BPE tokenizer trained on MovieLens-style text, built offline."""
    from llmeraser.testing import tiny_llama, tiny_tokenizer

    corpus = ["The user liked Heat, Fargo, Alien. The user disliked Babe. Will the user like Titanic? Yes No"] * 20
    tok = tiny_tokenizer(corpus, vocab_size=400)
    return tiny_llama(len(tok), hidden=32, layers=2, seed=0, init_std=0.3, dtype=torch.float32), tok


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny offline model, small splits, 3 seeds")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), help="IR-p / QM-p / RC-p (p in percent)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (full), 0 1 2 (quick)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                   help=f"for every setting and seed; default: {' '.join(CORE)} (quick: all). "
                        f"Known: {' '.join(METHODS)}")
    p.add_argument("--study-settings", nargs="*", default=None, metavar="SETTING",
                   help="settings whose first seed also runs --study-methods; default: IR-1 (quick: none)")
    p.add_argument("--study-methods", nargs="*", default=list(STUDY), choices=list(METHODS), metavar="METHOD",
                   help=f"default: {' '.join(STUDY)}")
    p.add_argument("--more-seeds", nargs="*", default=None, metavar="SETTING=S,S",
                   help="extra seeds (core methods) for cheap settings; default: IR-1=1,2 (quick: none)")
    p.add_argument("--n-train", type=int, default=None, help="default 400 (full), 80 (quick)")
    p.add_argument("--out", default=None, help="output folder (new); default bench/results/<full|quick>-<time>")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _more_seeds(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, seeds = text.partition("=")
    try:
        return name, tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise SystemExit(f"--more-seeds takes SETTING=SEED,SEED (e.g. IR-1=1,2), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(1 if a.quick else torch.get_num_threads())
    kind = "quick" if a.quick else "full"
    out = Path(a.out or RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    sizes = {"n_train": a.n_train or 80, "n_valid": 30, "n_test": 60} if a.quick else \
        {"n_train": a.n_train or 400, "n_valid": 100, "n_test": 200}
    every = [m for m in METHODS if m not in PEERS or importlib.util.find_spec(m.split("/")[0])]  # peers if installed
    plan = {"methods": tuple(a.methods or (every if a.quick else CORE)), "study_methods": tuple(a.study_methods)}
    if a.quick or a.study_settings is not None:
        plan["study_settings"] = tuple(a.study_settings or ())
    if a.quick or a.more_seeds is not None:
        plan["more_seeds"] = dict(_more_seeds(x) for x in a.more_seeds or ())
    try:
        args = BenchArguments(settings=tuple(a.settings), seeds=tuple(a.seeds or ((0, 1, 2) if a.quick else (0,))),
                              progress=not a.quiet, **plan, **sizes,
                              **({"max_length": 48, "lr": 1e-2, "curvature_samples": 16, "factor_samples": 0,
                                  "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
                                 if a.quick else {}))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tok = quick_model() if a.quick else (None, None)
    result = run_benchmark(args, out, base_model=model, tokenizer=tok)
    print((out / "tables.md").read_text(encoding="utf-8"))
    print(f"{len(result['rows'])} rows in {result['seconds']:.0f} s; results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
