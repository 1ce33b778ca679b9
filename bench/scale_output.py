"""bench/scale.py's outputs: rows.json, rows.csv, table.md (one markdown table per model, LoRA and N) and scale.png
(log-log seconds vs N). Columns: docs/benchmarks.md#the-scale-benchmark."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

FIELDS = ["mode", "model", "base_params", "lora", "params", "n", "tokens", "device", "dtype", "operation", "status",
          "seconds", "epochs", "retrain_over", "gradients_s", "solve_s", "rss_mib", "gpu_mib", "recording_bytes",
          "detail", "note"]


def write_results(rows: list[dict], meta: dict, out: Path) -> None:
    """Every output, from the rows and the run's description (`meta`: arguments, commit, versions, device)."""
    (out / "rows.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    with open(out / "rows.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(tables(rows, meta), encoding="utf-8")
    plot(rows, out / "scale.png")


COLUMNS = [("operation", "operation", ""), ("status", "status", ""), ("seconds", "seconds", ".3g"),
           ("epochs", "epochs", ".3g"), ("retrain_over", "retrain ÷ this", ".3g"),
           ("gradients_s", "gradients s", ".3g"), ("solve_s", "solve s", ".3g"), ("rss_mib", "host MiB", ".0f"),
           ("gpu_mib", "GPU MiB", ".0f"), ("detail", "detail", ""), ("note", "note", "")]


def tables(rows: list[dict], meta: dict) -> str:
    """One markdown table per (model, LoRA, N)."""
    out = [f"# Scale benchmark\n\ncommit {meta['commit'][:12]}, torch {meta['torch']}, transformers "
           f"{meta['transformers']}, peft {meta['peft']}, device {meta['device']}\n"]
    for key in dict.fromkeys((r["model"], r["lora"], r["n"]) for r in rows):
        group = [r for r in rows if (r["model"], r["lora"], r["n"]) == key]
        g = group[0]
        out.append(f"## {g['model']} ({_count(g.get('base_params'))} base parameters), LoRA {g['lora']} "
                   f"({_count(g.get('params'))} trainable), N = {g['n']:,}, {g.get('tokens', '?')} tokens an "
                   f"example, {g['device']} {g['dtype']}\n")
        recording = next((r["recording_bytes"] for r in group if r.get("recording_bytes")), None)
        if recording:
            out.append(f"recording: {recording / 2**20:.1f} MiB\n")
        lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in COLUMNS) + " |" for r in group]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _cell(value, spec: str) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = format(value, spec) if isinstance(value, int | float) and spec else str(value)
    return text.replace("|", "/")


def _count(n) -> str:
    if not isinstance(n, int):
        return "?"
    return next(f"{n / d:.3g}{s}" for d, s in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, "")) if n >= d or d == 1)


def plot(rows: list[dict], path: Path) -> None:
    """Log-log seconds vs N, one line per operation (dashed: estimated; a hollow triangle: stopped at --max-seconds,
    a lower bound), one panel per (model, LoRA)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = list(dict.fromkeys((r["model"], r["lora"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.5), squeeze=False)
    for ax, (model, lora) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if (r["model"], r["lora"]) == (model, lora) and r["status"] in ("ok", "estimated",
                "stopped") and isinstance(r.get("seconds"), float) and r["seconds"] > 0]
        for i, name in enumerate(dict.fromkeys(r["operation"] for r in mine)):
            cut = [(r["n"], r["seconds"]) for r in mine if r["operation"] == name and r["status"] == "stopped"]
            if cut:  # a lower bound: ran past --max-seconds
                ax.scatter(*zip(*cut, strict=True), marker="^", facecolors="none", color=plt.cm.tab20(i % 20), s=60,
                           label=f"{name} stopped (≥)")
            pts = sorted((r["n"], r["seconds"], r["status"]) for r in mine if r["operation"] == name
                         and r["status"] != "stopped")
            if not pts:
                continue
            style = "--" if any(p[2] == "estimated" for p in pts) else \
                {"fit": "-.", "request": ":"}.get(name.split()[0], "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vD<>"[i % 7], linestyle=style,
                    color=plt.cm.tab20(i % 20), label=name + (" (estimated)" if style == "--" else ""))
        ax.set(xscale="log", yscale="log", xlabel="training examples N", ylabel="seconds", title=f"{model}, {lora}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
