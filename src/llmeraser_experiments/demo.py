"""The quick demo: fine-tune a tiny LoRA Llama, remove a few examples, compare unlearning with retraining.

Everything is built offline in seconds (a byte-level BPE tokenizer trained here, a random 1-layer Llama). It shows
the whole path — data, fine-tuning on R(θ) = mean response NLL + (l2/2)‖θ‖², a removal request, the solvers, a
saved adapter with its report — and how close each method lands to retraining. The embedded-model demo replaces
it once the real model and data are wired in.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmeraser.eraser import EraserArguments, compute_update, save_unlearned
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.io import check_new_output
from llmeraser.params import ParamView, save_peft
from llmeraser.record import DEFAULT_MAX_LENGTH, LoraSettings
from llmeraser.request import Request, apply_request
from llmeraser.solvers.api import solver_arguments
from llmeraser.task import CausalLMTask, per_example_loss
from llmeraser.testing import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer

logger = logging.getLogger(__name__)

# λ of the embedded demo, chosen on validation data: `python bench/tune_damping.py` (docs/demo.md#choosing-the-damping).
DEMO_DAMPING = 0.3


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
    check_new_output(out)
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
    save_peft(model, out / "original")

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


def finetuned_adapter(base_model: str, train, ft_args: FinetuneArguments, lora: dict, max_length: int) -> Path:
    """A LoRA fine-tune of `base_model` on `train`, cached by everything that determines it (a rerun skips it).

    Its report.json holds the fine-tune's `result` (loss, ‖∇R‖, seconds), so a cached run can still say what
    fine-tuning cost.
    """
    from llmeraser.data import examples_hash
    from llmeraser.finetune import finetune_adapter
    from llmeraser.io import canonical_json, sha256_bytes
    from llmeraser.models import cache_dir

    key = {"recipe": 3, "base": base_model, "train": examples_hash(train),  # 2: data order by id hash; 3: recorded
           "finetune": {**{k: v for k, v in vars(ft_args).items() if k != "final_check"}, "progress": None},
           "lora": lora, "max_length": max_length}
    folder = cache_dir() / "demo" / sha256_bytes(canonical_json(key).encode())[:16]
    if (folder / "adapter_model.safetensors").is_file():
        logger.info("using the cached fine-tuned adapter %s", folder)
        return folder
    finetune_adapter(train, folder, base_model=base_model, lora=LoraSettings.from_peft(lora), args=ft_args,
                     max_length=max_length, report={"key": key})  # recorded: unlearn can rewind it
    return folder


@dataclass
class MovieLensJob:
    """The demo's fixed setting, shared with the benchmarks: data, request and fine-tuning recipe."""

    splits: dict  # train / valid / test examples
    users: list[int]  # whose examples are removed
    request: Request
    forget: list  # the removed examples
    ft_args: FinetuneArguments
    lora: dict = field(default_factory=lambda: LoraSettings().to_peft())  # in the fine-tune's cache key
    max_length: int = DEFAULT_MAX_LENGTH

    @classmethod
    def build(cls, *, n_train: int = 400, n_test: int = 200, users: int = 3, epochs: int = 1,
              progress: bool = True) -> MovieLensJob:
        from llmeraser_experiments.movielens import build_splits, user_ids

        splits = build_splits(n_train=n_train, n_valid=max(n_test // 2, 10), n_test=n_test, seed=0)
        by_user = user_ids(splits["train"])
        # The users with the most training examples: removing them is a visible, realistic erasure request.
        chosen = sorted(by_user, key=lambda u: (-len(by_user[u]), u))[:users]
        request = Request.remove(*[i for u in chosen for i in by_user[u]])
        removed = {edit.id for edit in request.edits}
        ft_args = FinetuneArguments(epochs=epochs, lr=1e-3, batch_size=8, seed=0, progress=progress,
                                    final_check=False)
        return cls(splits=splits, users=chosen, request=request,
                   forget=[e for e in splits["train"] if e.id in removed], ft_args=ft_args)

    def adapter(self, base_model: str, *, retrain: bool = False) -> Path:
        """The fine-tuned adapter on the training set, or (retrain) on the set without the request's examples."""
        train = apply_request(self.splits["train"], self.request) if retrain else self.splits["train"]
        return finetuned_adapter(base_model, train, self.ft_args, self.lora, self.max_length)


def run_movielens_demo(out: str | Path, *, base_model: str = "default", n_train: int = 400, n_test: int = 200,
                       users: int = 3, epochs: int = 1, curvature_samples: int = 8, max_iters: int = 8,
                       damping: float = DEMO_DAMPING, with_retrain: bool = False, progress: bool = True) -> dict:
    """The main job on the embedded model: MovieLens data, a cached, recorded LoRA fine-tune, the removal of every
    example of a few users, `llmeraser unlearn` with no options (auto: it rewinds or replays the recorded path, and
    says why) beside the paper's one-step update (first-order, Gauss-Newton, CG), and evaluation of original vs
    unlearned vs retrained (also cached, with the time the retraining took).

    Returns:
        {"rows": [...], "adapter": path, "report": path, "removed": ids, "users": [...]}
    """
    from llmeraser.eraser import unlearn
    from llmeraser.job import AdapterJob
    from llmeraser.metrics import evaluate
    from llmeraser.models import load_base_model
    from llmeraser.params import load_adapter

    out = Path(out)
    check_new_output(out)
    job = MovieLensJob.build(n_train=n_train, n_test=n_test, users=users, epochs=epochs, progress=progress)
    train, test = job.splits["train"], job.splits["test"]
    adapter = job.adapter(base_model)
    base, tokenizer = load_base_model(base_model)
    task = CausalLMTask(tokenizer, max_length=job.max_length)
    model = load_adapter(base, adapter)

    def row(name: str, m, seconds: float, delta_norm: float = 0.0, residual: float = float("nan")) -> dict:
        ev_test, ev_forget = evaluate(m, task, test, progress=progress), evaluate(m, task, job.forget)
        return {"method": name, "test_auc": ev_test["auc"], "test_acc": ev_test["accuracy"],
                "forget_loss": ev_forget["loss"], "delta_norm": delta_norm, "residual": residual,
                "seconds": seconds}

    rows = [row("original", model, float("nan"))]
    theta = ParamView(model).vector()
    # what `llmeraser unlearn` does with no options: the adapter is recorded, so auto rewinds or replays the path
    result = AdapterJob(adapter, train, base_model=base_model, progress=progress).unlearn(job.request,
                                                                                        out / "unlearned")
    report = result.report
    unlearned = load_adapter(load_base_model(base_model)[0], out / "unlearned")
    rows.append(row(f"llmeraser unlearn, no options ({report['method']})", unlearned, report["seconds"]["total"],
                    report["delta_norm"]))
    # the paper's one-step update, for comparison (cg with a budget of max_iters products: on this request it stops
    # at relative residual 0.002, inside tol)
    args = EraserArguments(method="first-order", solver="cg", curvature="ggn", damping=damping,
                           curvature_samples=curvature_samples, progress=progress,
                           solver_args=solver_arguments("cg", max_iters=max_iters, tol=5e-3))
    update = unlearn(model, task, train, request := job.request, args)
    rows.append(row("paper's one step (first-order + cg)", model, update.report["seconds"]["total"],
                    update.report["delta_norm"], update.solve.residual))
    if with_retrain:
        retrained_dir = job.adapter(base_model, retrain=True)
        retrained = load_adapter(load_base_model(base_model)[0], retrained_dir)
        seconds = json.loads((retrained_dir / "report.json").read_text())["result"]["seconds"]
        delta_norm = float((ParamView(retrained).vector() - theta).norm())
        rows.append(row("retrain (same init and recipe)", retrained, seconds, delta_norm))
    return {"rows": rows, "adapter": str(out / "unlearned"), "report": str(out / "unlearned" / "report.json"),
            "removed": [e.id for e in job.forget], "users": job.users, "n_train": len(train), "n_test": len(test),
            "original_adapter": str(adapter), "request": request.to_dict(), "choice": report.get("update_choice")}
