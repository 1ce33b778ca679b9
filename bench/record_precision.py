"""Path replay from a bfloat16 recording against a full-precision one, on memorised facts, in one run.

    python bench/record_precision.py              # docs/path.md's numbers: tiny facts (~1 min, 1 core)
    python bench/record_precision.py --memorised  # bench/path_study.py's memorised people (~10 min, 1 core)

The tiny case: the test suite's tiny float64 LoRA Llama on 40 facts, 3 epochs, two facts removed. The memorised
case: bench/path_study.py's (`llmeraser_experiments.memorised.memorised_people`, float64, 30 epochs, one whole
person removed). The fine-tune is recorded twice, once per precision (the training is the same: recording does not
change it); path replay (default options) and rewind run on each. Reported, as fractions of the distance path
replay moves from θ̂: how far the bfloat16 recording's path replay lands from the full one's, and how far each
lands from rewind (= retraining over the recorded schedule, bit for bit); also whether the two rewinds agree bit
for bit, the removed examples' loss after each update, and each recording's bytes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from llmeraser.data import load_examples
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.metrics import evaluate
from llmeraser.models import load_base_model
from llmeraser.params import ParamView
from llmeraser.record import LoraSettings, lora_model
from llmeraser.request import Request, load_request
from llmeraser.task import CausalLMTask
from llmeraser.testing import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer
from llmeraser.updates import RequestContext
from llmeraser.updates.along_path import path_replay, rewind
from llmeraser_experiments.memorised import PEOPLE_TARGETS, memorised_people


def main() -> int:
    memorised = "--memorised" in sys.argv[1:]
    if memorised:
        with tempfile.TemporaryDirectory() as tmp:
            case = memorised_people(Path(tmp))
            base, tok = load_base_model(str(case["base"]), dtype="float64")
            model = lora_model(base, LoraSettings(r=4, alpha=8, targets=PEOPLE_TARGETS), seed=0)
            train = load_examples(case["train"])
            request = load_request(case["request"])
        task, removed, epochs, batch = CausalLMTask(tok, max_length=32), set(case["removed"]), 30, 8
    else:
        tok = tiny_tokenizer()
        model = tiny_lora(tiny_llama(len(tok), hidden=16, dtype=torch.float64, init_std=0.3), r=2)
        train, removed, epochs, batch = fact_examples(40, seed=3), {"ex9", "ex14"}, 3, 4
        request, task = Request.remove(*sorted(removed)), CausalLMTask(tok, max_length=24)
    view = ParamView(model)
    forget = [e for e in train if e.id in removed]
    theta0 = view.vector()
    out = {}
    for dtype in ("full", "bfloat16"):
        view.set_vector(theta0)
        args = FinetuneArguments(epochs=epochs, lr=1e-2, batch_size=batch, final_check=False, record_dtype=dtype)
        trajectory = finetune(model, task, train, args, announce=print).trajectory
        theta = view.vector()
        ctx = RequestContext.build(model, task, train, request)
        out[dtype] = {"theta": theta, "path": path_replay(ctx, trajectory).theta,
                      "rewind": rewind(ctx, trajectory).theta, "mib": trajectory.nbytes / 2**20}
    theta = out["full"]["theta"]
    assert torch.equal(theta, out["bfloat16"]["theta"])
    path, low, exact = out["full"]["path"], out["bfloat16"]["path"], out["full"]["rewind"]

    def loss(t: torch.Tensor) -> float:
        view.set_vector(t)
        return evaluate(model, task, forget)["loss"]

    moved = float((path - theta).norm())
    print(f"\nrecording: full {out['full']['mib']:.2f} MiB, bfloat16 {out['bfloat16']['mib']:.2f} MiB")
    print(f"rewinds equal bit for bit: {torch.equal(exact, out['bfloat16']['rewind'])}")
    print(f"path replay moves ‖Δθ‖ = {moved:.4g}; rewind moves {float((exact - theta).norm()):.4g}")
    print(f"‖path(bf16) − path(full)‖ / ‖path(full) − θ̂‖ = {float((low - path).norm()) / moved:.4f}")
    print(f"‖path(full) − rewind‖ / ‖path(full) − θ̂‖ = {float((path - exact).norm()) / moved:.4f}")
    print(f"‖path(bf16) − rewind‖ / ‖path(full) − θ̂‖ = {float((low - exact).norm()) / moved:.4f}")
    print(f"removed examples' loss: original {loss(theta):.4f}, rewind {loss(exact):.4f}, path(full) {loss(path):.4f}, "
          f"path(bf16) {loss(low):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
