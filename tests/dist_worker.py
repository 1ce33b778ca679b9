"""Worker for tests/test_distributed.py: the same computations in one process (`python tests/dist_worker.py OUT`)
or data-parallel (`torchrun --nproc-per-node 2 tests/dist_worker.py OUT`); rank 0 saves every result to OUT.

Float64 tiny LoRA LM, 29 training examples (an odd count, so the ranks' shards differ in size) in batches of 4:
Δθ for each op (remove / modify_query / correct_response) × each solver (dense, cg, lissa, sqp, paper, kfac,
ekfac, woodbury, datainf), newton with cg, a curvature sample, per-example gradients, and Adam and L-BFGS
fine-tunes.
"""

from __future__ import annotations

import copy
import sys

import torch
from fixtures.tiny import tiny_lora_lm

from llmeraser import distributed
from llmeraser.curvature import per_example_gradients
from llmeraser.eraser import EraserArguments, compute_update
from llmeraser.factors import KINDS, FactorArguments, fit_factors
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.params import ParamView
from llmeraser.request import Request
from llmeraser.solvers.api import solver_arguments

ITERATIVE = ("dense", "cg", "lissa", "sqp", "paper")
REQUESTS = {
    "remove": {"edits": [{"op": "remove", "id": "ex0"}, {"op": "remove", "id": "ex5"}]},
    "modify_query": {"edits": [{"op": "modify_query", "id": "ex2", "prompt": "Does the yak like gold?"}]},
    "correct_response": {"edits": [{"op": "correct_response", "id": "ex3", "response": " Maybe"}]},
}


def run() -> dict[str, torch.Tensor]:
    model, task, train = tiny_lora_lm(n=29)
    out: dict[str, torch.Tensor] = {}
    fits = fit_factors(model, task, train, KINDS, FactorArguments(batch_size=4, seed=3))
    for op, req in REQUESTS.items():
        request = Request.from_dict(req)
        for solver in ITERATIVE:
            sargs = None if solver == "dense" else solver_arguments(solver, tol=1e-13, max_iters=300) \
                if solver == "cg" else solver_arguments(solver, max_iters=30, batch_size=6)
            args = EraserArguments(damping=0.05, batch_size=4, solver=solver, solver_args=sargs)
            out[f"{op}/{solver}"] = compute_update(model, task, train, request, args).delta
        for kind in KINDS:
            args = EraserArguments(damping=0.05, batch_size=4, solver=kind)
            out[f"{op}/{kind}"] = compute_update(model, task, train, request, args, fits[kind]).delta
        converged_cg = solver_arguments("cg", tol=1e-13, max_iters=300)
        out[f"{op}/newton-cg"] = compute_update(model, task, train, request, EraserArguments(
            method="newton", damping=0.05, batch_size=4, solver_args=converged_cg)).delta
    removal = Request.from_dict(REQUESTS["remove"])
    # stopped early: an unconverged CG's iterates amplify the ranks' summation order (see test_distributed.py)
    out["remove/cg-sampled"] = compute_update(model, task, train, removal, EraserArguments(
        damping=0.05, batch_size=4, curvature_samples=11, solver_args=solver_arguments("cg", max_iters=30))).delta
    out["ekfac-fit-fresh"] = compute_update(model, task, train, removal,
                                            EraserArguments(damping=0.05, batch_size=4, solver="ekfac")).delta
    out["per-example"] = per_example_gradients(model, task, train[:7], chunk_size=2)
    for opt, kw in (("adam", {"epochs": 2, "lr": 1e-2, "batch_size": 5}), ("lbfgs", {"max_iters": 3})):
        m = copy.deepcopy(model)
        finetune(m, task, train, FinetuneArguments(optimizer=opt, l2=1e-3, **kw))
        out[f"finetune-{opt}"] = ParamView(m).vector()
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init_from_env()
    results = run()
    if distributed.rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in results.items()}, sys.argv[1],
                  metadata={"world_size": str(distributed.world_size())})
    distributed.shutdown()
