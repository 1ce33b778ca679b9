"""What the fit's default sample (`factors.fit.FIT_SAMPLE`, used when `--samples` is 0) costs in accuracy, against
the noise the fit already has: on a tiny LoRA Llama with N synthetic examples, the solve (F + λI)⁻¹ b of a
10-example removal's gradient from a fit on the default sample, compared with the fit on all N — beside the same
comparison between two fits on all N that differ only in the seed of their sampled Fisher targets. A sample whose
difference is within that seed-to-seed spread loses nothing the full fit could be trusted for. With `--sketch K`
(woodbury) a rank-K Nyström sketch over all N is compared too.

    OMP_NUM_THREADS=1 python bench/fit_sample.py --n 10000                   # ekfac
    OMP_NUM_THREADS=2 python bench/fit_sample.py --n 10000 --kind woodbury --sketch 1024
    OMP_NUM_THREADS=2 python bench/fit_sample.py --n 10000 --kind datainf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llmeraser.curvature import gradient
from llmeraser.factors import FactorArguments, fit_factors
from llmeraser.factors.fit import FIT_SAMPLE
from llmeraser.params import ParamView
from llmeraser.task import CausalLMTask
from llmeraser.testing import tiny_llama, tiny_lora, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from scale import WORDS, synthetic  # noqa: E402


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = float(torch.nn.functional.cosine_similarity(x, ref, dim=0))
    return {"cosine": round(cos, 4), "relative_error": round(float((x - ref).norm() / ref.norm()), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--kind", default="ekfac", choices=["ekfac", "kfac", "woodbury", "datainf"])
    p.add_argument("--sketch", type=int, default=0, help="woodbury: also a rank-K Nyström sketch over all N")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--damping", type=float, nargs="+", default=[1e-1, 1e-2])
    a = p.parse_args()
    torch.manual_seed(0)
    tok = tiny_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], vocab_size=400)
    model = tiny_lora(tiny_llama(len(tok), hidden=64, layers=2, dtype=torch.float32, init_std=0.3), r=4)
    task = CausalLMTask(tok, max_length=a.tokens)
    examples = synthetic(a.n, a.tokens)
    view = ParamView(model)
    b = gradient(model, task, examples[:: max(1, a.n // 10)][:10]) / a.n
    fits, seconds = {}, {}
    runs = [("all, seed 0", FactorArguments(samples=a.n, seed=0)),
            ("all, seed 1", FactorArguments(samples=a.n, seed=1)),
            (f"default sample ({min(a.n, FIT_SAMPLE)}), seed 0", FactorArguments(seed=0))]
    if a.sketch:
        runs.append((f"Nyström rank {a.sketch} over all, seed 0",
                     FactorArguments(samples=a.n, seed=0, sketch=a.sketch)))
    for name, args in runs:
        start = time.perf_counter()
        fits[name] = fit_factors(model, task, examples, (a.kind,), args)[a.kind]
        seconds[name] = round(time.perf_counter() - start, 2)
    rows = []
    for lam in a.damping:
        ref = fits["all, seed 0"].solve(b, lam, view)
        for name in list(fits)[1:]:
            rows.append({"damping": lam, "fit": name, "examples": fits[name].meta["n_examples"],
                         "seconds": seconds[name], **compare(fits[name].solve(b, lam, view), ref)})
    print(json.dumps({"n": a.n, "kind": a.kind, "seconds": seconds, "against the fit on all, seed 0": rows},
                     indent=1))


if __name__ == "__main__":
    main()
