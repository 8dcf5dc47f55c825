"""Method x budget tables (Markdown, CSV, LaTeX) of each task's main metric with its cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from plots.curves import REFERENCE, UPPER, flops_axis
from plots.data import Results


def table(res: Results) -> pd.DataFrame:
    """One row per (task, method, budget): accuracy, accuracy relative to `full`, cost columns with units;
    `reference_row` marks the `oracle` reference (the question's relevant patches first), which is not a method."""
    rows = res.main_rows()
    full = rows[rows["method"] == REFERENCE].drop_duplicates("task").set_index("task")["value"]
    flops, unit = flops_axis(rows)
    out = pd.DataFrame({
        "task": rows["task"], "metric": rows["metric"], "method": rows["method"], "budget": rows["budget"],
        "reference_row": rows["method"] == UPPER, "accuracy_pct": (100 * rows["value"]).round(1),
        "relative_to_full_pct": (100 * rows["value"] / rows["task"].map(full)).round(1),
        f"prefill_{unit.lower()}": flops.round(4 if unit == "GFLOPs" else 3),
        "visual_tokens": rows["visual_tokens_mean"].round(1),
        "prefill_ms": rows.get("prefill_ms_median", pd.Series(index=rows.index, dtype=float)).round(2),
    })
    if "relevant_precision_mean" in rows and rows["relevant_precision_mean"].notna().any():
        out["kept_on_objects_pct"] = (100 * rows["relevant_precision_mean"]).round(1)
    out.insert(6, "accuracy_ci95_low_pct", (100 * rows["ci95_low"]).round(1).to_numpy())
    out.insert(7, "accuracy_ci95_high_pct", (100 * rows["ci95_high"]).round(1).to_numpy())
    if (rows["seeds"] > 1).any():  # learned methods with controllers of several training seeds: mean and range
        out.insert(8, "seeds", rows["seeds"].to_numpy())
        out.insert(9, "seed_min_pct", (100 * rows["seed_min"]).round(1).to_numpy())
        out.insert(10, "seed_max_pct", (100 * rows["seed_max"]).round(1).to_numpy())
    return _with_comparisons(out.reset_index(drop=True), res.comparisons)


def _with_comparisons(out: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """The paired comparisons beside each row: the difference from `full` and from the best other method at the
    same budget, in points, with the paired 95 % interval and whether it excludes 0 (`significant`)."""
    columns = {"difference_pts": "_pts", "difference_ci95_low_pts": "_ci95_low_pts",
               "difference_ci95_high_pts": "_ci95_high_pts", "significant": "_significant"}
    if comparisons.empty:
        return out
    for kind, prefix in (("full", "vs_full"), ("best other", "vs_best_other")):
        c = comparisons[comparisons["reference_kind"] == kind]
        c = c.rename(columns={k: prefix + v for k, v in columns.items()} | {"reference": "best_other"})
        keep = ["task", "method", "budget", *(prefix + v for v in columns.values())]
        keep += ["best_other"] if kind == "best other" else []
        out = out.merge(c[keep], on=["task", "method", "budget"], how="left")
    return out


def at_equal_compute(res: Results, reference: str = "fastv") -> pd.DataFrame:
    """Every other method's points next to `reference`'s accuracy at the same prefill FLOPs.

    The reference's accuracy is interpolated linearly along its budget curve (its points sorted by FLOPs); a point
    outside the curve's FLOPs range gets no comparison (NaN) rather than an extrapolation. Methods that keep every
    token for the first layers (FastV) cost more than pre-LLM methods at the same budget, so equal compute, not
    equal budget, is the fair comparison.
    """
    out = []
    for task, rows in res.main_rows().groupby("task", sort=False):
        ref = rows[rows["method"] == reference].sort_values("prefill_tflops_mean")
        if len(ref) < 1:
            continue
        flops, unit = flops_axis(rows)
        rx, ry = flops[ref.index].to_numpy(), 100 * ref["value"].to_numpy()
        for i, r in rows[~rows["method"].isin([reference, REFERENCE, UPPER])].iterrows():
            x = flops[i]
            inside = rx.min() <= x <= rx.max()
            y_ref = float(np.interp(x, rx, ry)) if inside else float("nan")
            out.append({"task": task, "method": r["method"], "budget": r["budget"],
                        f"prefill_{unit.lower()}": round(x, 4), "accuracy_pct": round(100 * r["value"], 1),
                        f"{reference}_accuracy_pct_at_equal_flops": round(y_ref, 1),
                        "difference_pts": round(100 * r["value"] - y_ref, 1)})
    return pd.DataFrame(out)


def to_markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(v) for v in r) + " |\n" for r in df.itertuples(index=False))


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs})."""
    esc = str.maketrans({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#"})
    cols = "ll" + "r" * (len(df.columns) - 2)
    lines = [rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(c.translate(esc) for c in df.columns) + r" \\",
             r"\midrule"]
    lines += [" & ".join(_cell(v).translate(esc) for v in r) + r" \\" for r in df.itertuples(index=False)]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


def _cell(v) -> str:
    return "" if pd.isna(v) else str(v)


def write_tables(res: Results, out: Path) -> list[Path]:
    df = table(res)
    paths = [out / "table.md", out / "table.csv", out / "table.tex"]
    paths[0].write_text(to_markdown(df))
    df.to_csv(paths[1], index=False)
    paths[2].write_text(to_latex(df))
    eq = at_equal_compute(res)
    if not eq.empty:
        paths.append(out / "equal_compute_vs_fastv.md")
        paths[-1].write_text(to_markdown(eq))
    return paths
