"""Rows without a recording in the people benchmark and the TRL chat removal (issue 28, item 4; docs/forget.md).

The library's unlearners that need no recording (`llmeraser.updates.forget`: `npo`, `simnpo`,
`gradient-difference`) run through the update-method registry exactly as `llmeraser unlearn --method NAME --holdout
FILE` runs them: `get_method(name).run(ctx, UnlearnOptions(forget=ForgetArguments(...)))` with a `RequestContext`
that holds the holdout — here the benchmark's held-out people's facts, in the training format, never trained on. A
row is named `NAME/stop` (the library's defaults: the stop rule decides when to end) to tell it apart from the
benchmark's own fixed-learning-rate baselines (`npo lr=…`, `gradient-ascent lr=…`); `npo/stop:b0.5-rw3` is the one
other setting docs/forget.md's tiny table points to (β 0.5, retain weight 3), declared before any run.

Evidence beside every row (`evidence_entry`): the report's membership test (`llmeraser.evidence.evidence`) of the
forget set against the holdout at the row's θ — loss AUC, min-k%++ AUC, their p-values and the verdict — and, once
the split's rows are in (`add_gaps`), each AUC's distance to the retrain's own: the goal is ≤ GAP on every row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from llmeraser.data import Example
from llmeraser.evidence import LESS, LIKE, MORE, evidence
from llmeraser.request import Request
from llmeraser.updates import RequestContext, UnlearnOptions, get_method
from llmeraser.updates.stop import ForgetArguments

NORECORD = {"npo/stop": ("npo", {}), "simnpo/stop": ("simnpo", {}),
            "gradient-difference/stop": ("gradient-difference", {}),
            "npo/stop:b0.5-rw3": ("npo", {"beta": 0.5, "retain_weight": 3.0}),
            # the people benchmark's fine-tune ran at lr 2e-3: a tenth of it, to see whether smaller steps let the
            # retain term keep utility (docs/forget.md#measured-the-people-benchmark-and-the-trl-chat-removal)
            "npo/stop:lr2e-4": ("npo", {"lr": 2e-4}), "simnpo/stop:lr2e-4": ("simnpo", {"lr": 2e-4}),
            "gradient-difference/stop:lr2e-4": ("gradient-difference", {"lr": 2e-4}),
            # the retain term's kept examples in random order (the default before retain_order "overlap"), to
            # measure what taking the kept facts that share tokens with the forgotten ones first does for utility
            "npo/stop:random": ("npo", {"retain_order": "random"}),
            "simnpo/stop:random": ("simnpo", {"retain_order": "random"}),
            "gradient-difference/stop:random": ("gradient-difference", {"retain_order": "random"}),
            # the retain term as the NLL of the kept examples (TOFU's and the SimNPO paper's) where it was the KL to the
            # original: on people forget05 SimNPO kept utility 0.636 with it against 0.602 (one run, docs/forget.md);
            # the default since, so these rows now equal the plain ones (kept: bench/results/people-norecord/final)
            "npo/stop:nll": ("npo", {"retain": "nll"}), "simnpo/stop:nll": ("simnpo", {"retain": "nll"}),
            "gradient-difference/stop:nll": ("gradient-difference", {"retain": "nll"})}
DECLARED = ("npo/stop", "simnpo/stop", "gradient-difference/stop", "npo/stop:b0.5-rw3")  # every bench's rows
GAP = 0.05  # the goal: every row's membership AUC within this of the retrain's own (issue 28)
SHORT = {LIKE: "like", MORE: "more", LESS: "less"}
GOALS = {"forget_quality": 0.05, "utility_vs_retrain": 0.95, "time_ratio": 0.2}


def run_forget(model: torch.nn.Module, task, view, theta: torch.Tensor, train: Sequence[Example], request: Request,
               holdout: Sequence[Example], name: str, *, report: dict | None = None) -> tuple[torch.Tensor, dict]:
    """The library's unlearner `name` (a NORECORD label) from θ on `request`, the holdout in its context, the
    defaults but what the label sets; (θ after, what the row reports: seconds, the stop report, the resolved knobs).
    `report`: what the request's context carries (an adapter's training record: where the defaults come from)."""
    method, overrides = NORECORD[name]
    view.set_vector(theta)
    start = time.perf_counter()
    ctx = RequestContext.build(model, task, train, request, holdout=list(holdout))
    ctx.report.update(report or {})
    update = get_method(method).run(ctx, UnlearnOptions(method=method, forget=ForgetArguments(**overrides)))
    seconds = time.perf_counter() - start
    after = update.theta if update.theta is not None else theta + update.delta
    return after.to(theta.dtype), {"total": seconds, **stop_info(update.report[method])}


def stop_info(r: dict) -> dict:
    """What a row keeps of an unlearner's report (`updates.forget`; `path_update` files it under the method's
    name): the resolved knobs and where they came from, the stop rule's outcome and last check, the kept loss, and
    where the run's seconds went (checks, the kept-loss check, steps and set-up); of the checks, how many skipped the
    holdout and the most its drift moved an AUC between two full ones (`updates.stop.HoldoutStop`)."""
    last = r["stop"]["checks"][-1] if r["stop"]["checks"] else {}
    return {"lr": r["lr"], "max_steps": r["max_steps"], "check_every": r["check_every"],
            "defaults_from": r["defaults_from"], "steps": r["returned_step"], "steps_taken": r["steps_taken"],
            "stop": {"met": r["stop"]["met"], "why": r["stop"]["why"], "checks": len(r["stop"]["checks"]),
                     "last_check": last, "holdout_skipped": sum(not c.get("holdout_scored", True)
                                                                for c in r["stop"]["checks"]),
                     "holdout_drift": max((c.get("holdout_drift", 0.0) for c in r["stop"]["checks"]), default=0.0)},
            "kept_loss_check": r["kept_loss_check"], "kept_warning": r.get("kept_warning"),
            "seconds_in": r.get("seconds")}


def fixed_rate(model: torch.nn.Module, task, view, theta: torch.Tensor, forget: Sequence[Example], objective: str,
               lr: float, epochs: int, *, batch_size: int = 8, beta: float = 0.1) -> tuple[torch.Tensor, float]:
    """The fixed-learning-rate baselines (gradient ascent: `gradient-difference` without its retain term; NPO):
    `epochs` passes of Adam at `lr` over the forget set on the library's objective (`updates.forget.forget_loss`),
    no retain term, no stop rule — the recipe the stop rule replaces. (θ after, seconds); the model left at θ."""
    from llmeraser.trajectory import Adam, AdamConfig
    from llmeraser.updates.forget import forget_loss
    from llmeraser.updates.stop import token_nll

    start = time.perf_counter()
    batches = [task.collate(list(forget[i:i + batch_size])) for i in range(0, len(forget), batch_size)]
    view.set_vector(theta)
    with torch.no_grad():  # NPO's reference: −log π_ref(y|x) at θ
        references = [token_nll(task, model, b)[2] for b in batches]
    x, adam = theta.clone(), Adam(AdamConfig(lr=lr), theta)
    for _ in range(epochs):
        for batch, reference in zip(batches, references, strict=True):
            view.set_vector(x)
            loss, mean, total, _ = token_nll(task, model, batch)
            value = forget_loss(objective, loss, mean, total, reference, beta, 0.0).mean()
            x = adam.step(x, view.flatten(list(torch.autograd.grad(value, view.params, allow_unused=True))))
    view.set_vector(theta)
    return x, time.perf_counter() - start


def evidence_entry(model: torch.nn.Module, task, members: Sequence[Example], holdout: Sequence[Example],
                   batch_size: int = 8) -> dict:
    """The membership test of `members` against `holdout` at the model's current θ, as a row's columns."""
    test = evidence(model, task, list(members), list(holdout), batch_size=batch_size)
    loss, mink = test.score("loss"), test.score("min_k_pp")
    return {"loss_auc": loss.auc, "loss_p": loss.p_auc, "min_k_pp_auc": mink.auc, "min_k_pp_p": mink.p_auc,
            "verdict": test.verdict, "says": SHORT[test.verdict], "members": test.n_members,
            "holdout": test.n_holdout, "resolution": test.resolution, "calibration": test.calibration,
            "raw_loss_auc": (test.raw_auc or {}).get("loss"), "raw_min_k_pp_auc": (test.raw_auc or {}).get("min_k_pp")}


def add_gaps(rows: list[dict], reference: str = "retrain") -> None:
    """Each row's evidence: |AUC − the retrain's AUC| per score, their max (`gap`) and whether it is ≤ GAP."""
    ref = next((r for r in rows if r.get("method") == reference and "evidence" in r), None)
    if ref is None:
        return
    for r in rows:
        e = r.get("evidence")
        if e is None:
            continue
        e["loss_gap"] = abs(e["loss_auc"] - ref["evidence"]["loss_auc"])
        e["min_k_pp_gap"] = abs(e["min_k_pp_auc"] - ref["evidence"]["min_k_pp_auc"])
        e["gap"] = max(e["loss_gap"], e["min_k_pp_gap"])
        e["within"] = e["gap"] <= GAP


def goals(rows: list[dict], names: Sequence[str] = tuple(NORECORD), utility: str = "model_utility") -> dict:
    """Per split, each no-recording row against the issue's goals: forget quality ≥ 0.05, utility ≥ 0.95 of the
    retrain's, time ≤ 0.2 of the retrain's; and whether every row's evidence is within GAP of the retrain's AUC."""
    out: dict = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        sub = [r for r in rows if r["split"] == split and "failed" not in r]
        ref = next((r for r in sub if r["method"] == "retrain"), None)
        if ref is None:
            continue
        entry = {"evidence_within_every_row": all(r["evidence"].get("within", False) for r in sub if "evidence" in r),
                 "evidence_outside": [r["method"] for r in sub if not r.get("evidence", {}).get("within", True)]}
        for r in sub:
            if r["method"] not in names:
                continue
            ratio = r[utility] / ref[utility] if ref[utility] else None
            checks = {"forget_quality": r["forget_quality"], "utility_vs_retrain": ratio,
                      "time_ratio": r["time_ratio"]}
            met = {k: v is not None and (v <= GOALS[k] if k == "time_ratio" else v >= GOALS[k])
                   for k, v in checks.items()}
            entry[r["method"]] = {**checks, "met": met, "all_met": all(met.values())}
        out[split] = entry
    return out


COLUMNS = (("evidence.loss_auc", "ev loss AUC", ".2f"), ("evidence.raw_loss_auc", "ev loss AUC uncalibrated", ".2f"),
           ("evidence.min_k_pp_auc", "ev min-k%++ AUC", ".2f"),
           ("evidence.says", "ev verdict", ""), ("evidence.gap", "|ΔAUC| vs retrain", ".2f"),
           ("steps", "steps", ".4g"), ("stop.met", "stop met", ""))
