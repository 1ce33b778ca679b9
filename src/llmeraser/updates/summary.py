"""What an update did, in the few lines `unlearn` prints (`summarise`): one line per method family, from its report."""

from __future__ import annotations

from pathlib import Path

from llmeraser.eraser import Update
from llmeraser.evidence import summary


def summarise(update: Update, out: str, ledger, seqs: list[int] | None) -> str:
    """What `unlearn` prints: auto's choice, what the method did (each family its own line), the evidence, the output
    and its report, and the ledger's request numbers."""
    r = update.report
    numbers = ", ".join(f"#{k}" for k in seqs or [])
    tail = (f"\nevidence: {summary(r.get('evidence', {}))}\nadapter: {out}\nreport:  {Path(out) / 'report.json'}"
            + (f"\nledger:  {ledger} (request{'s' if len(seqs or []) > 1 else ''} {numbers})" if ledger else ""))
    if r.get("decision") == "declined":
        return f"declined: {r['reason']}" + tail
    choice = f"{r['update_choice']}\n" if "update_choice" in r else ""
    w, edits = r.get(r["method"], {}), f"{sum(r['ops'].values())} edits {r['ops']}"
    done = {"rewind": lambda: f"rewound {edits}: replayed {w['replayed_steps']} of {w['steps']} steps from step "
                              f"{w['rewound_to']} (exact: this is retraining)",
            "path": lambda: f"replayed the path without {edits}: {w['exact_steps']} exact and "
                            f"{w['predicted_steps']} predicted of {w['replayed_steps']} replayed steps "
                            f"(~{w['gradient_cost_vs_retraining']:.2f} of retraining's gradients)",
            "refine": lambda: f"refined {r['start']['method']}/{r['start']['solver']} with {len(w['history']) - 1} "
                              f"Newton-CG step(s): ‖∇R′‖ {w['residual_at_original']:.3g} at the original, "
                              f"{w['residual_at_start']:.3g} after the one step, {w['residual_final']:.3g} now"}
    if "stop" in w:  # an unlearner without a recording (updates.forget), stopped by the holdout's test
        done[r["method"]] = lambda: (f"{r['method']} on {edits} with a retain term: "
                                     f"{'stopped' if w['stop']['met'] else 'gave up'} at step {w['returned_step']} of "
                                     f"{w['steps_taken']} ({w['stop']['why']})")
    if r["method"] in done:
        return (choice + done[r["method"]]() + f", ‖Δθ‖ = {r['delta_norm']:.4g}, {r['seconds']['total']:.1f} s"
                + tail)
    status = "converged" if r["converged"] else "NOT converged (see report)"
    rule = r.get("damping_rule", {})
    how = (f" ({rule['relative_damping']:g} × curvature scale {rule['scale']:.3g})"
           if rule.get("rule") == "relative" else "")
    return (choice + f"unlearned {sum(r['ops'].values())} edits {r['ops']} with {r['method']}/{r['solver']}, damping "
            f"{r['damping']:.3g}{how}: residual {r['solve']['residual']:.2e} ({status}), ‖Δθ‖ = "
            f"{r['delta_norm']:.4g}, {r['seconds']['total']:.1f} s" + tail)
