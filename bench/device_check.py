"""The accelerator path end to end, with timings: a prepared script for when a GPU is at hand (nothing in CI needs one).

    python bench/device_check.py                        # the embedded SmolLM2-135M on cuda, bf16 base (minutes)
    python bench/device_check.py --device cpu --tiny    # the same path on a tiny offline model (seconds; tested)
    python bench/device_check.py --shape tinyllama-1.1b --n-train 1000   # a random-weight TinyLlama on cuda (bf16)

Steps, each timed: load the base on the device in the chosen dtype; fine-tune LoRA with Adam, recording the
trajectory; write the adapter; unlearn a removal of 2% of the examples with every update method (auto, first-order,
newton, refine, path, rewind) at its defaults, and with the one-step update under every solver (iterative and fitted,
the fitted ones on a sample); check that the adapters are float32 whatever the base, that every output is finite and
loads back, and that rewind moved the removed examples' loss up. Prints a table and the GPU's peak memory, and exits
non-zero naming the first failure (the case and its error). Sized to run in well under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmeraser.data import save_examples
from llmeraser.eraser import EraserArguments
from llmeraser.errors import UserInputError
from llmeraser.finetune import FinetuneArguments, finetune_adapter
from llmeraser.job import AdapterJob
from llmeraser.metrics import evaluate
from llmeraser.models import load_base_model, resolve_device
from llmeraser.params import ParamView, load_adapter
from llmeraser.record import LoraSettings
from llmeraser.request import Request
from llmeraser.solvers.api import is_fitted, solver_names
from llmeraser.table import format_table
from llmeraser.updates import UnlearnOptions, get_method, method_names
from llmeraser.updates.stop import ForgetArguments

HOLDOUT = 40  # holdout examples for the unlearners without a recording (enough for the test at 2+ removed examples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="bfloat16", help="of the base model (the adapter stays float32)")
    p.add_argument("--tiny", action="store_true", help="a tiny offline model and data instead of the embedded ones")
    p.add_argument("--shape", default=None, choices=["tiny", "tinyllama-1.1b", "llama-2-7b"],
                   help="a random-weight Llama in this shape with synthetic 128-token examples (bench/scale.py's), "
                        "instead of the embedded model: nothing to download or carry to a GPU machine")
    p.add_argument("--n-train", type=int, default=400, help="training examples")
    p.add_argument("--out", default=None, help="keep the adapters and timings.json here (default: a temp folder)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    root = Path(a.out or tempfile.mkdtemp(prefix="llmeraser-device-"))
    rows, checks = [], []

    def timed(step: str, fn):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        rows.append({"step": step, "seconds": time.perf_counter() - start})
        return out

    if a.shape:  # a random-weight Llama in a real model's shape (costs do not depend on the weights' values)
        from scale import random_base, synthetic

        base_name = random_base(a.shape, root / "base", dtype=a.dtype, device=str(device))
        train, max_length, lora = synthetic(a.n_train, 128), 128, LoraSettings()
        unseen = synthetic(HOLDOUT, 128, seed=1)
    elif a.tiny:
        from llmeraser.testing import fact_examples, tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        tiny_llama(len(tok), hidden=32, layers=2, dtype=torch.float32, init_std=0.1).save_pretrained(root / "base")
        tok.save_pretrained(root / "base")
        base_name, train, max_length = str(root / "base"), fact_examples(min(a.n_train, 60), seed=1), 24
        lora = LoraSettings(r=2)  # p = 512: the dense solver's p products stay seconds on a CPU
        unseen = fact_examples(400, seed=9)
    else:
        from llmeraser_experiments.movielens import build_splits

        splits = build_splits(n_train=a.n_train)
        base_name, train, max_length, unseen = "default", splits["train"], 64, splits["valid"]
        lora = LoraSettings()
    save_examples(train, root / "train.jsonl")
    labels = {"fine-tune": "fine-tune (1 epoch, recorded)", "write adapter": "write adapter + trajectory"}
    # the tiny adapter (r 2) takes a larger step, so the removal moves its losses visibly in a bf16 evaluation
    ft = FinetuneArguments(epochs=1, lr=1e-2 if a.tiny else 1e-3, batch_size=8, record=True, final_check=False)
    made = finetune_adapter(train, root / "adapter", base_model=base_name, dtype=a.dtype, device=str(device),
                            args=ft, lora=lora, max_length=max_length,
                            step=lambda name, fn: timed(labels.get(name, name), fn))
    view, task = ParamView(made.model), made.task
    checks.append(("adapter is float32 on the device", view.dtype == torch.float32 and view.device.type == device.type))
    removed = [e.id for e in train[:: max(1, len(train) // max(2, len(train) // 50))]][: max(2, len(train) // 50)]
    request = Request.remove(*removed)
    (root / "request.json").write_text(json.dumps(request.to_dict()))
    holdout = holdout_from(train, unseen)  # for the unlearners that need one (updates.forget)
    failures = []
    quick = a.tiny or a.shape == "tiny"  # a CPU check of where tensors live, not of convergence
    for label, options in cases(len(train), **({"max_iters": 10, "samples": 8} if quick else {})):
        job = AdapterJob(root / "adapter", root / "train.jsonl", base_model=base_name, dtype=a.dtype,
                         device=str(device))
        out = root / f"unlearned-{label.replace('/', '-')}"
        try:
            given = holdout if "holdout" in get_method(options.method).needs else None
            done = timed(f"unlearn: {label}", lambda job=job, out=out, o=options, h=given: job.unlearn(
                request, out, o, holdout=h))
        except UserInputError as e:  # refused with a reason (e.g. dense past --solver-max-dense-dim): not a failure
            checks.append((f"{label}: refused, naming why: {str(e).splitlines()[0][:100]}", True))
            continue
        except Exception as e:  # noqa: BLE001 — every case runs; the first failure is named at the end
            checks.append((f"{label}: runs on {device.type}", False))
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        delta, report = done.update.delta, done.update.report
        declined = done.status == "declined"
        # an unlearner that stepped (steps_taken) and found θ̂ itself the closest to the holdout rightly returns it
        w = report.get(report["method"], {})
        settled = w.get("returned_step") == 0 and w.get("steps_taken", 0) > 0
        note = (" (declined)" if declined else
                f" (stepped {w['steps_taken']}; θ̂ was the closest to the holdout)" if settled else "")
        if "steps_taken" in w:  # the unlearner's loop ran here
            checks.append((f"{label}: {w['steps_taken']} steps on {device.type}", w["steps_taken"] >= 4))
        checks.append((f"{label}: finite update on {device.type}{note}",
                       bool(torch.isfinite(delta).all()) and (declined or settled or float(delta.norm()) > 0)))
    forget = [e for e in train if e.id in set(removed)]
    losses = {}
    for name in ("adapter", "unlearned-rewind"):
        if not (root / name).exists():
            continue
        b, _ = load_base_model(base_name, dtype=a.dtype, device=str(device))
        m = load_adapter(b, root / name, trainable=False)
        losses[name] = timed(f"evaluate {name}", lambda m=m: evaluate(m, task, forget, batch_size=8)["loss"])
    if not a.shape:  # a random-weight model's LoRA barely moves its losses (below bf16's resolution): no signal
        checks.append(("rewind raised the removed examples' loss",
                       losses.get("unlearned-rewind", -math.inf) > losses["adapter"]))
    print(format_table(rows, [("step", "step", ""), ("seconds", "seconds", ".2f")]))
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on "
              f"{torch.cuda.get_device_name(device)}")
    if "unlearned-rewind" in losses:
        print(f"removed examples' loss: {losses['adapter']:.4f} → {losses['unlearned-rewind']:.4f} (rewind)")
    (root / "timings.json").write_text(json.dumps({"rows": rows, "checks": checks, "losses": losses}, indent=2))
    failed = [name for name, ok in checks if not ok]
    for name, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"outputs in {root}")
    if failed:
        print(f"first failure: {failures[0] if failures else failed[0]}", file=sys.stderr)
    return 1 if failed else 0


def holdout_from(train: list, unseen: list) -> list:
    """Up to HOLDOUT examples of the same kind as `train` that it does not hold (by content), with ids of their own."""
    seen, out = {(e.prompt, e.response) for e in train}, []
    for e in unseen:
        if (e.prompt, e.response) not in seen and len(out) < HOLDOUT:
            seen.add((e.prompt, e.response))
            out.append(dataclasses.replace(e, id=f"holdout-{len(out)}"))
    return out


def cases(n_train: int, max_iters: int | None = None, samples: int = 32) -> list[tuple[str, UnlearnOptions]]:
    """Every update method with its default solver, and the one-step update with every solver (the fitted ones fit
    their factors on a sample first): each must run where the model lives, with the defaults a user gets (`max_iters`
    and `samples` cap the iterative solvers' products and the curvature sample, for a quick check on a CPU)."""
    sample = min(samples, n_train)
    cap = {"max_iters": max_iters} if max_iters else {}
    first = EraserArguments(curvature_samples=sample) if max_iters else EraserArguments()
    # the unlearners without a recording step whatever the evidence (min_steps), so their loop runs where the model
    # lives: a one-epoch adapter has memorised nothing, and its removed examples look like the holdout at θ̂ already
    steps = ForgetArguments(min_steps=4, max_steps=4, check_every=2)
    out = [(m, UnlearnOptions(method=m, eraser=first, forget=steps)) for m in method_names()]
    for solver in solver_names():
        out.append((f"first-order/{solver}", UnlearnOptions(method="first-order",
                                                            solver_options={} if is_fitted(solver) else dict(cap),
                                                            eraser=EraserArguments(solver=solver,
                                                                                   curvature_samples=sample))))
    return out


if __name__ == "__main__":
    sys.exit(main())
