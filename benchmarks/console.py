"""What a sweep prints: one line per finished cell, the plan of a dry run and the final table (tabulate; no torch).

Scores on a 0-1 scale (accuracies, exact match) are shown in percent and their differences from `full` in
percentage points; other scores (MME's 0-2000 totals) as they are, differences in their own units.
"""

from __future__ import annotations

from tabulate import tabulate

from benchmarks.defaults import reference_rows
from methods.budget import Budget


def _number(x: object) -> float | None:
    try:
        return None if x in (None, "") else float(x)
    except (TypeError, ValueError):
        return None


def _primary(rows: list[dict]) -> list[dict]:
    """The rows of each cell's primary metric (the first of its task's metric_list)."""
    return [r for r in rows if str(r.get("primary")) in ("True", "true", "1")]


def _fractions(rows: list[dict]) -> set[tuple[str, str]]:
    """(task, metric) pairs whose every value lies in [0, 1]: shown in percent."""
    seen: dict[tuple[str, str], bool] = {}
    for r in rows:
        v = _number(r["value"])
        key = (r["task"], r["metric"])
        seen[key] = seen.get(key, True) and v is not None and 0.0 <= v <= 1.0
    return {k for k, ok in seen.items() if ok}


def _score(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} %" if percent else f"{value:.4g}"


def cell_line(index: int, total: int, rows: list[dict]) -> str:
    """`[3/22] synth_vqa  fastv           16: exact_match 87.6 %, 16.0 visual tokens, 0.245 prefill GFLOPs, 6.9 s`."""
    main = (_primary(rows) or rows or [{}])[0]
    if not main:
        return f"[{index}/{total}] no results"
    value = _number(main["value"])
    percent = value is not None and 0.0 <= value <= 1.0
    gflops, tokens = _number(main.get("prefill_gflops_mean")), _number(main.get("visual_tokens_mean"))
    parts = [f"{main['metric']} {_score(value, percent)}",
             "-" if tokens is None else f"{tokens:.1f} visual tokens",
             "-" if gflops is None else f"{gflops:.4g} prefill GFLOPs",
             f"{_number(main.get('wall_s')) or 0:.1f} s"]
    seed = main.get("controller_seed")
    method = main["method"] + ("" if seed in (None, "") else f"[{seed}]")  # a learned method's training seed
    return f"[{index}/{total}] {_task(main)}  {method:<13} {main['budget']!s:>4}: " + ", ".join(parts)


def _task(row: dict) -> str:
    """A row's task as shown: a conversation task's with its mode, `synth_scenes_followup (re-prune)`."""
    return row["task"] + (f" ({row['conversation']})" if row.get("conversation") else "")


def results_table(rows: list[dict], comparisons: list[dict] | None = None) -> str:
    """Per task, one row per (method, budget): the primary metric with its 95 % interval, its difference from `full`
    and from the best other method at that budget (from `comparisons`, the rows of `benchmarks.stats.comparisons`;
    `*` marks a difference significant at 95 %), visual tokens, prefill GFLOPs and prefill ms,
    sorted by budget with `full` last; a conversation task's modes in blocks of their own. Fits 120 columns; per-type
    metrics are in summary.csv."""
    main = _over_seeds([{**r, "task": _task(r)} for r in _primary(rows)])
    comparisons = [{**c, "task": _task(c)} for c in comparisons or []]
    if not main:
        return "no results"
    percent = _fractions(main)
    paired = {(c["task"], str(c["budget"]), c["method"], c["reference_kind"]): c for c in comparisons or []}
    blocks, not_methods = [], reference_rows()
    for task in sorted({r["task"] for r in main}):
        cells = sorted((r for r in main if r["task"] == task),
                       key=lambda r: (r["method"] == "full", Budget.of(r["budget"]).order, r["method"]))
        ref = next((_number(r["value"]) for r in cells if r["method"] == "full"), None)
        metric = cells[0]["metric"]
        pct = (task, metric) in percent
        table = []
        for r in cells:
            value, scale = _number(r["value"]), 100 if pct else 1
            low, high = _number(r.get("ci95_low")), _number(r.get("ci95_high"))
            interval = "" if low is None or high is None else f"{scale * low:.1f}-{scale * high:.1f}"
            if r.get("seeds", 1) > 1:  # the range over training seeds
                interval = f"{scale * r['seed_min']:.1f}-{scale * r['seed_max']:.1f} s"
            vs_full = paired.get((task, str(r["budget"]), r["method"], "full"))
            best = paired.get((task, str(r["budget"]), r["method"], "best other"))
            delta = None if value is None or ref is None or r["method"] == "full" else (value - ref) * scale
            gflops, ms = _number(r.get("prefill_gflops_mean")), _number(r.get("prefill_ms_median"))
            tokens = _number(r.get("visual_tokens_mean"))
            name = r["method"] + (f" x{r['seeds']}" if r.get("seeds", 1) > 1 else "") + (
                " (ref)" if r["method"] in not_methods else "")
            table.append([name, r["budget"], _score(value, pct), interval,
                          _difference(vs_full) if vs_full else "" if delta is None else f"{delta:+.1f}" + (
                              " pt" if pct else ""),
                          f"{_difference(best, unit=False)} {best['reference']}" if best else "",
                          "-" if tokens is None else f"{tokens:.1f}",
                          "-" if gflops is None else f"{gflops:.4g}",
                          "-" if ms is None else f"{ms:.4g}" + ("" if _reliable(r) else "?")])
        headers = ["method", "budget", metric, "95 % CI", "vs full", "vs best other, pt", "tokens", "GFLOPs",
                   "prefill ms"]
        align = ["left", "right", "right", "right", "right", "left", "right", "right", "right"]
        shown = [j for j in range(len(headers)) if j < 3 or any(row[j] for row in table)]  # no empty columns
        blocks.append(f"{task}:\n" + tabulate([[row[j] for j in shown] for row in table],
                                              headers=[headers[j] for j in shown], tablefmt="simple",
                                              disable_numparse=True, colalign=[align[j] for j in shown]))
    seeded = any(r.get("seeds", 1) > 1 for r in main)
    note = ("xN: the mean of N controllers (training seeds); `s`: their range, in the CI column\n" if seeded else "")
    referenced = any(r["method"] in not_methods for r in main)
    if referenced:
        note += "(ref): a reference row, not a method (oracle: the question's relevant patches first)\n"
    note += ("* significant at 95 % on the same questions (McNemar's exact test for 0/1 scores, else the paired\n"
            "  bootstrap interval excludes 0); comparisons.csv has the intervals and p-values")
    tested = [c for c in comparisons if str(c.get("significant_bh")) in ("True", "true", "False", "false")]
    if tested:
        kept = sum(str(c["significant_bh"]) in ("True", "true") for c in tested)
        hits = sum(str(c["significant"]) in ("True", "true") for c in tested)
        note += (f"\n  of the sweep's {len(tested)} McNemar tests, {hits} are significant alone and {kept} after "
                 "Benjamini-Hochberg's\n  false-discovery control over all of them (comparisons.csv: p_adjusted_bh)")
    unreliable = [r for r in main if not _reliable(r)]
    if unreliable:
        note += (f"\n?: timing not to be trusted ({len(unreliable)} cells: its spread over batches or other processes' "
                 "load was high);\n  `--retime` measures it again on a quieter machine, keeping the results")
    return "\n\n".join(blocks) + (f"\n\n{note}" if paired or seeded or referenced or unreliable else "")


def _over_seeds(rows: list[dict]) -> list[dict]:
    """A learned method's rows of several controllers (`controller_seed`) as one row: their mean `value`, with
    `seeds`, `seed_min` and `seed_max` (the range over seeds); other rows unchanged."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], str(r["budget"])), []).append(r)
    out = []
    for group in groups.values():
        values = [_number(r["value"]) for r in group]
        if len(group) == 1 or any(v is None for v in values) or all(r.get("controller_seed") in (None, "")
                                                                     for r in group):
            out += group
            continue
        mean = {k: _mean_of([_number(r.get(k)) for r in group]) for k in
                ("prefill_gflops_mean", "prefill_ms_median", "visual_tokens_mean")}
        out.append({**group[0], **mean, "timing_reliable": all(_reliable(r) for r in group),
                    "value": sum(values) / len(values), "seeds": len(group),
                    "seed_min": min(values), "seed_max": max(values), "ci95_low": None, "ci95_high": None})
    return out


def _reliable(row: dict) -> bool:
    """Whether a row's timings can be trusted (`records.cell_times`); rows written before the column: yes."""
    return str(row.get("timing_reliable", True)) not in ("False", "false")


def _mean_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _difference(c: dict, unit: bool = True) -> str:
    """`-2.5 pt*`: a comparison's difference in points, starred when significant."""
    star = "*" if str(c["significant"]) in ("True", "true") else ""
    return f"{float(c['difference_pts']):+.1f}" + (" pt" if unit else "") + star


def plan_table(plan: list[dict]) -> str:
    """A dry run's cells with their estimated cost: [{task, method, budget, samples, gflops_per_sample}] (a
    conversation task's cells also `conversation`: priced by their first turn)."""
    table = []
    for p in plan:
        per = p["gflops_per_sample"]
        total = None if per is None or p["samples"] is None else per * p["samples"]
        table.append([_task(p), p["method"], p["budget"], "?" if p["samples"] is None else p["samples"],
                      "-" if per is None else f"{per:.4g}", "?" if total is None else f"{total:.4g}"])
    headers = ["task", "method", "budget", "samples", "prefill GFLOPs per sample", "prefill GFLOPs per cell"]
    return tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True,
                    colalign=("left", "left", "right", "right", "right", "right"))
