"""The people benchmark's report: tables.md (one table per split, the columns some row has) and forget_quality.png
(forget quality against model utility, one point per method, per split)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmeraser_experiments import norecord as nr

logger = logging.getLogger(__name__)

COLUMNS = (("forget_quality", "forget quality", ".2g"), ("forget.value_recall", "forget facts said", ".2f"),
           ("forget.rouge", "forget ROUGE-L", ".3f"), ("forget.truth_ratio", "forget TR", ".3f"),
           ("corrected.value_recall", "new facts said", ".2f"), ("model_utility", "utility", ".3f"),
           ("retain.value_recall", "retain facts said", ".2f"), ("general.value_recall", "general facts said", ".2f"),
           ("mia_loss_auc", "MIA loss", ".2f"), ("mia_mink_auc", "MIA min-k", ".2f"),
           ("cosine", "cos→retrain", ".2f"), ("damping", "λ", ".2g"), ("residual", "residual", ".2g"),
           ("gradient_cost", "exact grads", ".2f"), ("time_ratio", "time/retrain", ".3f"),
           ("peak_mib", "peak MiB", ".0f"), *nr.COLUMNS)


def _get(row: dict, key: str):
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def tables(rows: list[dict]) -> str:
    parts = []
    for split in dict.fromkeys(r["split"] for r in rows):
        sub = [r for r in rows if r["split"] == split]
        columns = [c for c in COLUMNS if any(_get(r, c[0]) is not None for r in sub)]
        lines = [f"### {split}", "", "| method | " + " | ".join(h for _, h, _ in columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        for r in sub:
            cells = ["—" if _get(r, k) is None or "failed" in r else format(_get(r, k), f) for k, _, f in columns]
            lines.append(f"| {r['method']}{' (failed)' if 'failed' in r else ''} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot(rows: list[dict], out: Path) -> Path | None:
    """forget_quality.png: forget quality (log) against model utility, one point per method, per split."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    ok = [r for r in rows if "failed" not in r]
    splits = list(dict.fromkeys(r["split"] for r in ok))
    if not splits:
        return None
    methods = list(dict.fromkeys(r["method"] for r in ok))
    fixed = {"original": ("s", "black"), "retrain": ("*", "green"), "retrain@1": ("*", "limegreen")}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    others = [m for m in methods if m not in fixed]
    style = {**fixed, **{m: ("o^vDP"[i // len(cycle) % 5], cycle[i % len(cycle)]) for i, m in enumerate(others)}}
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits) + 3, 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for r in (r for r in ok if r["split"] == split):
            marker, color = style[r["method"]]
            ax.scatter(r["model_utility"], max(r["forget_quality"], 1e-12), marker=marker, color=color,
                       s=140 if r["method"] in fixed else 45, zorder=3 if r["method"] in fixed else 2,
                       alpha=0.85, label=r["method"])
        ax.axhline(0.05, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set(title=split, xlabel="model utility", ylabel="forget quality (KS p-value, log)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.collections}
    fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
               loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (4.2 * len(splits) + 3), 1))
    path = out / "forget_quality.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
