"""Accuracy against prefill TFLOPs, one line per method, points labelled with their budget, `full` as a reference.

Reads only `summary.csv` (pandas + matplotlib; torch is never imported), so curves are redrawn without rerunning
any model.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_accuracy_flops(summary: Path, metric: str = "exact_match", x: str = "prefill_tflops_mean") -> list[Path]:
    """One PNG per task: `metric` against `x`. Returns the written paths (next to summary.csv)."""
    df = pd.read_csv(summary)
    df = df[df["metric"] == metric]
    if df.empty:
        raise ValueError(f"{summary} has no rows for metric {metric!r}")
    written = []
    for task, rows in df.groupby("task"):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        full = rows[rows["method"] == "full"]
        for method, r in rows[rows["method"] != "full"].groupby("method"):
            r = r.assign(order=pd.to_numeric(r["budget"], errors="coerce")).sort_values(x)
            ax.plot(r[x] * 1e3, 100 * r["value"], marker="o", label=method)
            for _, row in r.iterrows():
                ax.annotate(str(row["budget"]), (row[x] * 1e3, 100 * row["value"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
        if not full.empty:
            f = full.iloc[0]
            ax.axhline(100 * f["value"], color="black", linestyle="--", linewidth=1, label=f"full ({f['budget']} tokens)")
            ax.plot([f[x] * 1e3], [100 * f["value"]], marker="*", color="black", markersize=10)
        ax.set_xlabel("prefill GFLOPs per sample (vision + projector + LLM prefill)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{task}: accuracy vs compute (labels: visual-token budget)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = Path(summary).parent / f"accuracy_flops_{task}_{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
