"""Worker for tests/test_distributed.py: the same computations in one process (`python tests/dist_worker.py OUT`)
or data-parallel (`torchrun --nproc-per-node 2 tests/dist_worker.py OUT`); rank 0 saves every result to OUT.

Float64 tiny LoRA LM, 29 training examples (an odd count, so the ranks' shards differ in size) in batches of 4:
Δθ for each op (remove / modify_query / correct_response) × each solver (dense, cg, lissa, sqp, paper, kfac,
ekfac, woodbury, datainf), newton with cg, a curvature sample, per-example gradients, an Adam fine-tune, and the
L-BFGS path twice: R(θ₀) of its sharded closure on the LM, and a ridge regression (strongly convex, 29 examples)
run to a gradient tolerance (test_distributed.py bounds the two launches' θ by ‖∇R‖/μ).
"""

from __future__ import annotations

import copy
import sys

import torch
from fixtures.tabular import TabularTask, linear_model, make_examples, regression_data
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
# R(w) = (1/n) Σ ½(xᵢᵀw − yᵢ)² + (l2/2)‖w‖²; grad_tol 1e-7 is 10x above the floor where L-BFGS's line search
# can no longer tell values of R apart (sqrt(2·eps·R·λ_max) ≈ 1e-8; see test_finetune.py)
RIDGE = {"n": 29, "d": 5, "seed": 2, "l2": 1e-2, "grad_tol": 1e-7}
CG_TOL = 1e-13


def ridge_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the ridge problem (seeded: the test regenerates it)."""
    return regression_data(RIDGE["n"], RIDGE["d"], seed=RIDGE["seed"])


def converged(update):
    """The Δθ of a solve that reached its tolerance: test_distributed.py's bound for CG assumes it."""
    assert update.solve.converged, update.solve.diagnostics()
    return update.delta


def run() -> dict[str, torch.Tensor]:
    model, task, train = tiny_lora_lm(n=29)
    out: dict[str, torch.Tensor] = {}
    fits = fit_factors(model, task, train, KINDS, FactorArguments(batch_size=4, seed=3))
    for op, req in REQUESTS.items():
        request = Request.from_dict(req)
        for solver in ITERATIVE:
            sargs = None if solver == "dense" else solver_arguments(solver, tol=CG_TOL, max_iters=300) \
                if solver == "cg" else solver_arguments(solver, max_iters=30, batch_size=6)
            args = EraserArguments(damping=0.05, batch_size=4, solver=solver, solver_args=sargs)
            update = compute_update(model, task, train, request, args)
            out[f"{op}/{solver}"] = converged(update) if solver == "cg" else update.delta
        for kind in KINDS:
            args = EraserArguments(damping=0.05, batch_size=4, solver=kind)
            out[f"{op}/{kind}"] = compute_update(model, task, train, request, args, fits[kind]).delta
        converged_cg = solver_arguments("cg", tol=CG_TOL, max_iters=300)
        out[f"{op}/newton-cg"] = converged(compute_update(model, task, train, request, EraserArguments(
            method="newton", damping=0.05, batch_size=4, solver_args=converged_cg)))
    removal = Request.from_dict(REQUESTS["remove"])
    # run to its tolerance too: a CG stopped at tol 1e-6 would leave the launches up to ~2e-6·‖b‖/λ apart (it
    # agreed bit for bit only because 3 batches on 2 ranks happen to be summed in the single-process order)
    out["remove/cg-sampled"] = converged(compute_update(model, task, train, removal, EraserArguments(
        damping=0.05, batch_size=4, curvature_samples=11, solver_args=solver_arguments("cg", tol=CG_TOL,
                                                                                       max_iters=300))))
    out["ekfac-fit-fresh"] = compute_update(model, task, train, removal,
                                            EraserArguments(damping=0.05, batch_size=4, solver="ekfac")).delta
    out["per-example"] = per_example_gradients(model, task, train[:7], chunk_size=2)
    m = copy.deepcopy(model)
    finetune(m, task, train, FinetuneArguments(optimizer="adam", l2=1e-3, epochs=2, lr=1e-2, batch_size=5))
    out["finetune-adam"] = ParamView(m).vector()
    # L-BFGS on the LM: only its first closure value, R(θ₀) at the fixed start (data part all-reduced, l2 once) — the
    # iterates after it are not comparable (the line search turns the ranks' summation order into other trial
    # steps on a non-convex R, with no bound on the gap)
    result = finetune(copy.deepcopy(model), task, train, FinetuneArguments(optimizer="lbfgs", l2=1e-3, max_iters=1))
    out["finetune-lbfgs-R0"] = torch.tensor([result.losses[0]], dtype=torch.float64)
    # L-BFGS's whole path on a strongly convex R, to a gradient tolerance
    x, y = ridge_data()
    m = linear_model(RIDGE["d"])
    finetune(m, TabularTask(), make_examples(x, y), FinetuneArguments(
        optimizer="lbfgs", l2=RIDGE["l2"], grad_tol=RIDGE["grad_tol"], batch_size=4, max_iters=50))
    out["finetune-lbfgs-ridge"] = ParamView(m).vector()
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
