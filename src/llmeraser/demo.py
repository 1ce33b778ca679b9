"""The quick demo: fine-tune a tiny LoRA Llama, remove a few examples, compare unlearning with retraining.

Everything is built offline in seconds (a byte-level BPE tokenizer trained here, a random 1-layer Llama). It shows
the whole path — data, fine-tuning on R(θ) = mean response NLL + (l2/2)‖θ‖², a removal request, the solvers, a
saved adapter with its report — and how close each method lands to retraining. The embedded-model demo replaces
it once the real model and data are wired in.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from llmeraser.eraser import EraserArguments, compute_update, save_unlearned
from llmeraser.errors import UserInputError
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.params import ParamView
from llmeraser.request import Request, apply_request
from llmeraser.solvers.api import solver_arguments
from llmeraser.task import CausalLMTask, per_example_loss
from llmeraser.testing import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer

logger = logging.getLogger(__name__)


def _mean_loss(model, task, examples) -> float:
    with torch.no_grad():
        return float(per_example_loss(task, model, task.collate(examples)).mean())


def run_tiny_demo(out: str | Path, *, n: int = 60, remove: int = 2, l2: float = 1e-2, seed: int = 0,
                  progress: bool = True) -> dict:
    """Run the demo; return its rows and write the newton adapter + report under `out`.

    Returns:
        {"rows": [...], "adapter": path, "report": path}
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"output {str(out)!r} already exists and is not an empty folder; choose another --out")
    torch.set_num_threads(1)  # a model this small is all per-op overhead: extra threads only contend
    tok = tiny_tokenizer()
    task = CausalLMTask(tok, max_length=24)
    train = fact_examples(n, seed=seed)
    forget = train[:remove]
    request = Request.remove(*[e.id for e in forget])
    retain = apply_request(train, request)

    # init_std 0.3: with the usual 0.02 a random tiny model's logits are nearly flat and LoRA cannot move them.
    model = tiny_lora(tiny_llama(len(tok), hidden=16, seed=seed, init_std=0.3), r=2, seed=seed)
    ft_args = FinetuneArguments(optimizer="lbfgs", l2=l2, grad_tol=1e-5, max_iters=100, batch_size=n,
                                progress=progress)
    t = time.perf_counter()
    fit = finetune(model, task, train, ft_args)
    t_finetune = time.perf_counter() - t
    theta = ParamView(model).vector()
    model.save_pretrained(str(out / "original"))

    rows = [{"method": "original", "forget_loss": _mean_loss(model, task, forget),
             "retain_loss": _mean_loss(model, task, retain), "delta_norm": 0.0, "cosine": float("nan"),
             "residual": float("nan"), "seconds": t_finetune}]
    retrained = copy.deepcopy(model)
    t = time.perf_counter()
    finetune(retrained, task, retain, ft_args)
    t_retrain = time.perf_counter() - t
    target = ParamView(retrained).vector() - theta
    rows.append({"method": "retrain (warm start)", "forget_loss": _mean_loss(retrained, task, forget),
                 "retain_loss": _mean_loss(retrained, task, retain), "delta_norm": float(target.norm()),
                 "cosine": 1.0, "residual": float("nan"), "seconds": t_retrain})

    variants = {
        "llmeraser newton + cg": EraserArguments(method="newton", solver="cg", l2=l2, damping=0.0),
        "llmeraser first-order + cg": EraserArguments(method="first-order", solver="cg", l2=l2, damping=0.0),
        "paper preset (Adam, 20 steps)": EraserArguments(method="first-order", solver="paper", l2=l2, damping=0.0),
    }
    saved = None
    for name, args in variants.items():
        args.solver_args = args.solver_args if args.solver != "cg" else solver_arguments("cg", tol=1e-8)
        update = compute_update(model, task, train, request, args)
        edited = copy.deepcopy(model)
        ParamView(edited).add_(update.delta)
        rows.append({"method": name, "forget_loss": _mean_loss(edited, task, forget),
                     "retain_loss": _mean_loss(edited, task, retain), "delta_norm": float(update.delta.norm()),
                     "cosine": float(torch.nn.functional.cosine_similarity(update.delta, target, dim=0)),
                     "residual": update.solve.residual, "seconds": update.report["seconds"]["total"]})
        if saved is None:
            saved = out / "unlearned"
            save_unlearned(edited, str(saved), update, input_adapter=str(out / "original"))
    logger.info("fine-tune: %d steps, ‖∇R‖ = %.2g", fit.steps, fit.grad_norm)
    return {"rows": rows, "adapter": str(saved), "report": str(saved / "report.json"),
            "n_train": n, "removed": [e.id for e in forget], "grad_norm": fit.grad_norm}
