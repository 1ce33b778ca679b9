"""Fit seconds against one training epoch's seconds, in one run (issue 26, "fits at the device's speed").

A tiny float32 Llama (llmeraser.testing) with LoRA on q_proj/v_proj: one un-recorded Adam epoch (`finetune`, no
final check) is timed (wall and process CPU seconds), then `fit_factors` for each kind on the same examples; the
ratio fit / epoch is what the issue's goal ("every fit ≤ 0.5 of a training epoch") is about. Each timing is the best
of `--repeats` runs (the machine is shared). Runs against whichever llmeraser is on PYTHONPATH, so the same script
measures before and after a change:

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/fit_speed.py --n 400 --hidden 64 --layers 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llmeraser.factors import FactorArguments, fit_factors
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.task import CausalLMTask
from llmeraser.testing import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer


def best(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds, each the best of `repeats`: on a shared machine the process's CPU seconds vary far less
    than its wall time (other processes' load stretches the wall clock, not this process's work)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kinds", nargs="+", default=["kfac", "ekfac", "woodbury", "datainf"])
    p.add_argument("--device", default="cpu", help="where the model lives (cuda: a GPU run of the same measurement)")
    a = p.parse_args()
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_lora(tiny_llama(len(tok), hidden=a.hidden, layers=a.layers, dtype=torch.float32, init_std=0.3),
                      r=a.r).to(a.device)
    task = CausalLMTask(tok, max_length=24)
    examples = fact_examples(a.n, seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    epoch = best(lambda: (model.load_state_dict(state), finetune(model, task, examples, FinetuneArguments(
        epochs=1, batch_size=a.batch_size, record=False, final_check=False))), a.repeats)
    model.load_state_dict(state)
    row = {"device": a.device, "n": a.n, "hidden": a.hidden, "layers": a.layers, "r": a.r, "batch_size": a.batch_size,
           "epoch_s": round(epoch[0], 3), "epoch_cpu_s": round(epoch[1], 3)}
    for kind in a.kinds:
        fit = best(lambda k=kind: fit_factors(model, task, examples, (k,), FactorArguments(batch_size=a.batch_size)),
                   a.repeats)
        row[f"{kind}_s"] = round(fit[0], 3)
        row[f"{kind}_epochs"] = round(fit[0] / epoch[0], 3)
        row[f"{kind}_cpu_epochs"] = round(fit[1] / epoch[1], 3)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
