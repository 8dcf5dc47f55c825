"""Method x budget tables (Markdown, CSV, LaTeX) of each task's main metric with its cost."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tabulate import tabulate

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
        f"prefill_{unit.lower()}": flops.round(4),
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


HEADINGS = {  # comparisons.md: what each kind of comparisons.csv answers, in this order
    "best training-free": "The learned methods against the best training-free method at the same budget",
    "question": ("Does the question matter? The best method that sees the question against the best that does not, "
                 "at the same budget (training-free, then learned)"),
    "equal prefill FLOPs": "Each method that acts before the LLM against each in-LLM method at equal prefill FLOPs",
    "learned": "The learned methods against each other",
    "re-prune": ("Prune once, ask again: each method's later answers on its first turn's selection (prune once) "
                 "against the same method reducing the whole conversation again (re-prune)"),
    "headroom": "The oracle's headroom: the reference row against the best method at the same budget",
}


def comparison_tables(res: Results) -> str:
    """comparisons.csv's comparisons beyond the main table's (which has `vs full` and `vs best other`), as Markdown:
    one section per kind of `HEADINGS`, rows by task and budget, differences in points with their paired 95 %
    interval and `*` where significant. Empty when there are none."""
    c = res.comparisons
    if c.empty or "reference_budget" not in c:
        return ""
    c = c.assign(kind=c["reference_kind"].where(~((c["reference_kind"] == "best other") & (c["method"] == UPPER)),
                                                 "headroom"))
    parts = []
    for kind, heading in HEADINGS.items():
        rows = c[c["kind"] == kind].copy()
        if rows.empty:
            continue
        rows["order"] = pd.to_numeric(rows["budget"], errors="coerce")
        rows = rows.sort_values(["task", "order", "method", "reference"], kind="stable")
        table = pd.DataFrame({
            "task": rows["task"], "budget": rows["budget"], "method": rows["method"], "against": rows["reference"],
            "its budget": rows["reference_budget"], "difference (pt)": [
                f"{d:+.1f}{'*' if sig else ''}" for d, sig in zip(rows["difference_pts"], rows["significant"],
                                                                   strict=True)],
            "95 % interval (pt)": [f"{lo:+.1f} to {hi:+.1f}" for lo, hi in
                                   zip(rows["difference_ci95_low_pts"], rows["difference_ci95_high_pts"],
                                       strict=True)],
            "questions": rows["n_paired"],
            "p, FDR-adjusted": [("" if pd.isna(p) else f"{p:.3g}") for p in
                                rows.get("p_adjusted_bh", pd.Series(float("nan"), index=rows.index))]})
        parts.append(f"## {heading}\n\n{to_markdown(table)}")
    if not parts:
        return ""
    return ("# Paired comparisons (from comparisons.csv)\n\nDifferences in points, method minus the one it is "
            "against, on the questions both answered; `*`: significant at 95 % (McNemar's exact test for two "
            "0/1 cells, otherwise the paired bootstrap interval). `p, FDR-adjusted`: McNemar's p-value after "
            "Benjamini-Hochberg's false-discovery control over every McNemar test of the sweep (below 0.05: still "
            "significant). Learned methods: the mean over their controllers per question.\n\n" + "\n".join(parts))


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table (tabulate): every value as the table holds it, blanks where missing."""
    return tabulate(_text(df), headers="keys", tablefmt="pipe", showindex=False, disable_numparse=True) + "\n"


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs tabular (pandas; needs \\usepackage{booktabs}): two text columns, then numbers right-aligned."""
    return _text(df).to_latex(index=False, escape=True, column_format="ll" + "r" * (len(df.columns) - 2))


def _text(df: pd.DataFrame) -> pd.DataFrame:
    """Each value as its `str`, blank where missing (so 71.8 stays 71.8, not 71.800000)."""
    return df.astype(object).map(lambda v: "" if pd.isna(v) else str(v))


def write_tables(res: Results, out: Path) -> list[Path]:
    df = table(res)
    paths = [out / "table.md", out / "table.csv", out / "table.tex"]
    paths[0].write_text(to_markdown(df))
    df.to_csv(paths[1], index=False)
    paths[2].write_text(to_latex(df))
    text = comparison_tables(res)
    if text:
        paths.append(out / "comparisons.md")
        paths[-1].write_text(text)
    return paths
