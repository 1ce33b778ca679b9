"""The unlearners without a recording (`llmeraser.updates.forget`) on the test suite's tiny memorised case: the table
of docs/forget.md#measured-tiny-memorised-case, in one run (about 30 s on one thread).

    python bench/forget_tiny.py                                   # the table's rows
    python bench/forget_tiny.py npo '{"beta": 0.5, "retain_weight": 3}'    # any METHOD '{ForgetArguments as JSON}'

The case (`tests/test_forget.py::memorised`): a float64 tiny Llama, LoRA r = 8 on every projection, fine-tuned for 100
epochs at lr 1e-2 on 60 facts answered by two random words; 12 of them forgotten, 40 unseen facts as the holdout.
Each row: its seconds and their ratio to the fine-tune's (measured in the same run), the steps taken, the
membership AUC at θ̂ and at the returned θ, and the mean loss of the forgotten, kept and holdout facts before →
after.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

ROWS = [("npo", {}), ("simnpo", {}), ("gradient-difference", {}), ("npo", {"check_every": 40}), ("npo", {"lr": 1e-3}),
        ("npo", {"beta": 0.5, "retain_weight": 3}), ("npo", {"beta": 0.5, "retain_weight": 3, "lr": 1e-3}),
        ("simnpo", {"beta": 1.0})]


def main(argv: list[str]) -> int:
    import test_forget as case

    torch.set_num_threads(1)
    rows = [(m, json.loads(kw)) for m, kw in zip(argv[::2], argv[1::2], strict=True)] if argv else ROWS
    t0 = time.perf_counter()
    memorised = case.memorised.__wrapped__()
    fine_tune = time.perf_counter() - t0  # the fixture's time: the fine-tune, and building the model
    print(f"fine-tune: {fine_tune:.2f} s")
    model, task, train, holdout, theta_hat = memorised
    forget, kept = train[:12], train[12:]
    for method, kw in rows:
        t0 = time.perf_counter()
        update, report = case.forgotten(memorised, method, **kw)
        seconds = time.perf_counter() - t0
        checks = report["stop"]["checks"]
        end = [c for c in checks if c["step"] == report["returned_step"]][-1]
        moved = " ".join(f"{name} {case.mean_loss(model, task, s, theta_hat):.3f}→"
                         f"{case.mean_loss(model, task, s, update.theta):.3f}"
                         for name, s in (("forgotten", forget), ("kept", kept), ("holdout", holdout)))
        print(f"{method} {json.dumps(kw)}: {seconds:.2f} s ({seconds / fine_tune:.3f} of the fine-tune's), met "
              f"{report['stop']['met']}, step "
              f"{report['returned_step']}, AUC {checks[0]['auc']:.3f}→{end['auc']:.3f} "
              f"(p {end['p']:.2g}, min-k%++ AUC {end['auc_min_k_pp']:.3f}); {moved}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
