"""The accelerator path end to end, with timings: a prepared script for when a GPU is at hand (nothing in CI needs one).

    python bench/device_check.py                        # the embedded SmolLM2-135M on cuda, bf16 base (minutes)
    python bench/device_check.py --device cpu --tiny    # the same path on a tiny offline model (seconds; tested)

Steps, each timed: load the base on the device in the chosen dtype; fine-tune LoRA with Adam, recording the
trajectory; write the adapter; unlearn a removal of 2% of the examples by exact rewind and by the one-step update
(cg on a curvature sample); check that the adapters are float32 whatever the base, that every output is finite and
loads back, and that rewind moved the removed examples' loss up. Prints a table and the GPU's peak memory, and exits
non-zero naming the first check that fails. Sized to run in well under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmeraser.data import save_examples
from llmeraser.eraser import EraserArguments
from llmeraser.finetune import FinetuneArguments, finetune_adapter
from llmeraser.job import AdapterJob
from llmeraser.metrics import evaluate
from llmeraser.models import load_base_model, resolve_device
from llmeraser.params import ParamView, load_adapter
from llmeraser.request import Request
from llmeraser.table import format_table
from llmeraser.updates import UnlearnOptions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="bfloat16", help="of the base model (the adapter stays float32)")
    p.add_argument("--tiny", action="store_true", help="a tiny offline model and data instead of the embedded ones")
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

    if a.tiny:
        from llmeraser.testing import fact_examples, tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        tiny_llama(len(tok), hidden=32, layers=2, dtype=torch.float32, init_std=0.1).save_pretrained(root / "base")
        tok.save_pretrained(root / "base")
        base_name, train, max_length = str(root / "base"), fact_examples(min(a.n_train, 60), seed=1), 24
    else:
        from llmeraser_experiments.movielens import build_splits

        base_name, train, max_length = "default", build_splits(n_train=a.n_train)["train"], 64
    save_examples(train, root / "train.jsonl")
    labels = {"fine-tune": "fine-tune (1 epoch, recorded)", "write adapter": "write adapter + trajectory"}
    ft = FinetuneArguments(epochs=1, lr=1e-3, batch_size=8, record=True, final_check=False)
    made = finetune_adapter(train, root / "adapter", base_model=base_name, dtype=a.dtype, device=str(device),
                            args=ft, max_length=max_length, step=lambda name, fn: timed(labels.get(name, name), fn))
    view, task = ParamView(made.model), made.task
    checks.append(("adapter is float32 on the device", view.dtype == torch.float32 and view.device.type == device.type))
    removed = [e.id for e in train[:: max(1, len(train) // max(2, len(train) // 50))]][: max(2, len(train) // 50)]
    request = Request.remove(*removed)
    (root / "request.json").write_text(json.dumps(request.to_dict()))
    for method, args in (("rewind", UnlearnOptions(method="rewind")),
                         ("first-order", UnlearnOptions(method="first-order", eraser=EraserArguments(
                             solver="cg", curvature_samples=32)))):
        job = AdapterJob(root / "adapter", root / "train.jsonl", base_model=base_name, dtype=a.dtype,
                         device=str(device))
        out = root / f"unlearned-{method}"
        done = timed(f"unlearn: {method}", lambda job=job, out=out, args=args: job.unlearn(request, out, args))
        checks.append((f"{method}: finite, non-zero update", bool(torch.isfinite(done.update.delta).all())
                       and float(done.update.delta.norm()) > 0))
    forget = [e for e in train if e.id in set(removed)]
    losses = {}
    for name in ("adapter", "unlearned-rewind"):
        b, _ = load_base_model(base_name, dtype=a.dtype, device=str(device))
        m = load_adapter(b, root / name, trainable=False)
        losses[name] = timed(f"evaluate {name}", lambda m=m: evaluate(m, task, forget, batch_size=8)["loss"])
    checks.append(("rewind raised the removed examples' loss", losses["unlearned-rewind"] > losses["adapter"]))
    print(format_table(rows, [("step", "step", ""), ("seconds", "seconds", ".2f")]))
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on "
              f"{torch.cuda.get_device_name(device)}")
    print(f"removed examples' loss: {losses['adapter']:.4f} → {losses['unlearned-rewind']:.4f} (rewind)")
    (root / "timings.json").write_text(json.dumps({"rows": rows, "checks": checks, "losses": losses}, indent=2))
    failed = [name for name, ok in checks if not ok]
    for name, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"outputs in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
