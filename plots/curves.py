"""Accuracy against compute: per task against prefill FLOPs and against measured prefill latency, and the average
over tasks relative to `full`. One line per method, points labelled with their budget, the Pareto frontier marked
(the points no other point beats on both accuracy and cost), `full` as a dashed reference line, and the `oracle`
reference row (the question's relevant patches first: not a method) as a dotted black line off the frontier.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402

from plots.data import Results, file_part  # noqa: E402

REFERENCE = "full"
UPPER = "oracle"  # a reference row, not a method: drawn apart, never on the frontier


# every registered method's own colour, fixed here so that it never changes with the methods a figure or a run has,
# nor when a method is registered (tests/test_plots.py fails until a new one is given a colour): tab10's ten, then
# darker or stronger ones; a name not listed takes the spare colours after them, sorted
METHOD_COLOURS = {
    "fastv": "#1f77b4", "pdrop": "#ff7f0e", "sparsevlm": "#2ca02c", "dart": "#d62728", "cdpruner": "#9467bd",
    "divprune": "#8c564b", "visionzip": "#e377c2", "random": "#7f7f7f", "vispruner": "#bcbd22", "fastervlm": "#17becf",
    "prumerge": "#e6ab02", "prumerge_plus": "#b15928", "adaptive_a": "#00665e", "adaptive_b": "#a6005c",
    "adaptive_q": "#08306b", "budget_blind": "#4d7a00",
}
SPARE_COLOURS = ("#6b3d00", "#800000", "#3f007d", "#737373", "#00a087", "#f39b7f", "#4dbbd5", "#91d1c2")


# the registry as data (the catalogue file): what kind each method is, for its marker
CATALOGUE = Path(__file__).resolve().parent.parent / "methods" / "catalogue.json"


@functools.cache
def catalogue() -> dict[str, dict]:
    """The registry's entries by name, from the catalogue file (plots import nothing from `methods`); {} without it."""
    return json.loads(CATALOGUE.read_text()) if CATALOGUE.is_file() else {}


def colours(methods) -> dict[str, tuple]:
    """One fixed colour per method name, the same in every figure and every run (`METHOD_COLOURS`); names it does
    not hold take `SPARE_COLOURS`, sorted; `full` and `oracle` are black."""
    spare = sorted(set(methods) - set(METHOD_COLOURS) - {REFERENCE, UPPER})
    named = METHOD_COLOURS | {m: SPARE_COLOURS[i % len(SPARE_COLOURS)] for i, m in enumerate(spare)}
    return {m: (*matplotlib.colors.to_rgb(c), 1.0) for m, c in named.items()} | {REFERENCE: (0, 0, 0, 1),
                                                                                 UPPER: (0, 0, 0, 1)}


def marker_style(method: str) -> dict:
    """Marker and line of a method, by its kind in the registry: learned methods dashed lines with squares (diamonds
    when they also read the question), training-free ones that read the question triangles, the others circles."""
    entry = catalogue().get(method, {})
    learned, question = bool(entry.get("learned")), bool(entry.get("question"))
    marker = ("D" if question else "s") if learned else ("^" if question else "o")
    return {"marker": marker, "linestyle": "--" if learned else "-"}


def save(fig, path: Path) -> Path:
    """Write a figure and free it."""
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto(x: pd.Series, y: pd.Series) -> list[int]:
    """Index labels of the points on the frontier: lowest cost first, each more accurate than every cheaper one."""
    best, front = float("-inf"), []
    for i in sorted(x.index, key=lambda i: (x[i], -y[i])):
        if y[i] > best:
            best = y[i]
            front.append(i)
    return front


def flops_axis(df: pd.DataFrame, column: str = "prefill_gflops_mean") -> tuple[pd.Series, str]:
    """Prefill FLOPs per sample and their unit: GFLOPs, the one unit of every column, table and figure."""
    return df[column], "GFLOPs"


def _draw(ax, df: pd.DataFrame, x: pd.Series, y: pd.Series, colour: dict, timed: bool = False) -> None:
    """Method lines with budget labels, the reference line, the Pareto frontier (`timed`: x is a measured time, and
    points whose timing is not to be trusted do not enter the frontier)."""
    labels = []
    for j, (method, rows) in enumerate(df[df["method"] != REFERENCE].groupby("method")):
        idx = rows.sort_values("budget_tokens").index
        style = {"linestyle": ":", "marker": "^", "label": f"{UPPER} (reference: relevant patches first; not a method)"
                 } if method == UPPER else {**marker_style(method), "label": method}
        ax.plot(x[idx], y[idx], color=colour[method], linewidth=1.6, markersize=5, **style)
        _error_bars(ax, df.loc[idx], x[idx], y[idx], colour[method])
        labels += [(x[i], y[i], str(df.at[i, "budget"]), colour[method], j) for i in idx]
    for i in df.index[df["method"] == REFERENCE]:
        whole = df.at[i, "budget_tokens"]  # a count, or 1.0 where images differ in size
        kept = f"{df.at[i, 'budget']} tokens" if whole > 1 else "every token"
        ax.axhline(y[i], color="black", linestyle="--", linewidth=1, label=f"{REFERENCE} ({kept})")
        if "ci95_low" in df.columns and pd.notna(df.at[i, "ci95_low"]) and pd.notna(df.at[i, "ci95_high"]):
            # full's 95 % interval, as a band
            ax.axhspan(100 * df.at[i, "ci95_low"], 100 * df.at[i, "ci95_high"], color="black", alpha=0.06, zorder=0,
                       label=f"{REFERENCE}'s 95 % interval")
        ax.plot([x[i]], [y[i]], marker="*", color="black", markersize=12, linestyle="none")
    methods = df.index[df["method"] != UPPER]
    if timed:
        methods = methods[~untrusted(df.loc[methods])]
    front = pareto(x[methods], y[methods])
    ax.plot(x[front], y[front], color="grey", linewidth=4, alpha=0.25, drawstyle="steps-post", zorder=0,
            label="Pareto frontier")
    ax.scatter(x[front], y[front], s=110, facecolors="none", edgecolors="grey", linewidths=1.2, zorder=3)
    _budget_labels(ax, labels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the data


# where a budget label may sit beside its point: (x, y) offset in points and the text's alignment
LABEL_SPOTS = ((4, 4, "left"), (4, -11, "left"), (-4, 4, "right"), (-4, -11, "right"), (4, 13, "left"),
               (4, -20, "left"), (-4, 13, "right"), (-4, -20, "right"),
               *((dx, dy, ha) for dy in (22, -29, 31, -38) for dx, ha in ((4, "left"), (-4, "right"))),
               *((dx, dy, ha) for dy in (4, -11, 13, -20) for dx, ha in ((16, "left"), (-16, "right"))))


def _budget_labels(ax, labels: list[tuple[float, float, str, str, int]], size: float = 8) -> None:
    """(x, y, text, colour, curve) labels beside their points, each at the first spot (its curve's turn first) inside
    the axes where it covers no label placed before it and no point; its curve's first spot where none is free."""
    ax.autoscale_view()  # the limits the figure will have, so data maps to the points it will be drawn at
    per_pt = ax.figure.dpi / 72
    marks = [ax.transData.transform((x, y)) / per_pt for x, y, *_ in labels]  # in points
    (left, bottom), (right, top) = ax.bbox.get_points() / per_pt  # the axes, in points
    boxes: list[tuple[float, float, float, float]] = []

    def free(box) -> bool:
        x0, y0, x1, y1 = box
        clear = left <= x0 and x1 <= right and bottom <= y0 and y1 <= top
        clear = clear and all(x1 <= a or b <= x0 or y1 <= c or d <= y0 for a, c, b, d in boxes)
        return clear and not any(x0 - 2 < mx < x1 + 2 and y0 - 2 < my < y1 + 2 for mx, my in marks)

    renderer, font = ax.figure.canvas.get_renderer(), FontProperties(size=size)
    for (x, y, text, colour, curve), (mx, my) in zip(labels, marks, strict=True):
        width, height, _ = (v / per_pt for v in renderer.get_text_width_height_descent(text, font, ismath=False))
        order = [LABEL_SPOTS[(curve + k) % 4] for k in range(4)] + list(LABEL_SPOTS[4:])
        spots = [(dx, dy, ha, (mx + dx - width * (ha == "right"), my + dy, mx + dx + width * (ha == "left"),
                               my + dy + height)) for dx, dy, ha in order]
        dx, dy, ha, box = next((s for s in spots if free(s[3])), spots[0])
        boxes.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va="bottom", fontsize=size,
                    color=colour)


def _error_bars(ax, df: pd.DataFrame, x: pd.Series, y: pd.Series, colour) -> None:
    """Each point's 95 % interval over questions (`ci95_low`, `ci95_high` in summary.csv), where it has one."""
    if "ci95_low" not in df.columns:  # the average over tasks has none
        return
    seeds = df["seeds"] > 1 if "seeds" in df.columns else pd.Series(False, index=df.index)
    low = (100 * df["ci95_low"]).where(~seeds, 100 * df.get("seed_min", df["value"]))
    high = (100 * df["ci95_high"]).where(~seeds, 100 * df.get("seed_max", df["value"]))
    has = low.notna() & high.notna()
    if has.any():  # a mean over training seeds shows their range (dashed), one controller its 95 % interval
        for part, style in ((has & ~seeds, "-"), (has & seeds, "--")):
            if part.any():
                bars = ax.errorbar(x[part], y[part], yerr=[(y[part] - low[part]).clip(lower=0),
                                   (high[part] - y[part]).clip(lower=0)], fmt="none", ecolor=colour, elinewidth=1,
                                   capsize=2.5, alpha=0.6)
                bars[2][0].set_linestyle(style)


def untrusted(df: pd.DataFrame) -> pd.Series:
    """Rows whose timing is not to be trusted (`timing_reliable` False); none in results written before the column."""
    if "timing_reliable" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["timing_reliable"].astype(str).isin(["False", "false"])


def _timing_spread(ax, df: pd.DataFrame, x: pd.Series, y: pd.Series, colour: dict, turns: bool) -> None:
    """Each point's timing spread, as a horizontal bar of its interquartile range over batches centred on the median
    (`prefill_ms_iqr`; a conversation's turns' ranges added), and a red ring round a point whose timing is not to be
    trusted (`timing_reliable` False: that spread or other processes' load was high)."""
    iqr = df.get("prefill_ms_iqr")
    if iqr is not None and turns and "follow_up_prefill_ms_iqr" in df.columns:
        iqr = iqr + df["follow_up_prefill_ms_iqr"].fillna(0)
    if iqr is not None and iqr.notna().any():
        for method, rows in df.groupby("method"):
            has = rows.index[iqr[rows.index].notna()]
            ax.errorbar(x[has], y[has], xerr=iqr[has] / 2, fmt="none", ecolor=colour.get(method, "black"),
                        elinewidth=1, capsize=2.5, alpha=0.6)
    bad = df.index[untrusted(df)]
    if len(bad):
        ax.scatter(x[bad], y[bad], s=160, facecolors="none", edgecolors="red", linewidths=1.4, zorder=4,
                   label="timing not trusted (spread or machine load): --retime")


def _footer(fig, df: pd.DataFrame) -> None:
    first = df.iloc[0]
    where = f"{first.get('device', '?')}, {first.get('dtype', '?')}, batch {first.get('batch_size', '?')}"
    model = "/".join(Path(str(first.get("model", "?"))).parts[-2:])
    bars = "; bars: 95 % intervals over questions (bootstrap)" if df.get("ci95_low", pd.Series()).notna().any() else ""
    if "seeds" in df.columns and (df["seeds"] > 1).any():
        bars += f"; learned: mean of {int(df['seeds'].max())} seeds, dashed bars their range"
    fig.text(0.01, 0.01, f"{model} on {where}; n = {int(df['n'].max())} per point{bars}", wrap=True,
             fontsize=7, color="grey")


def accuracy_curves(res: Results, out: Path) -> list[Path]:
    """Per task: accuracy vs prefill FLOPs and vs measured prefill latency (two PNGs)."""
    written = []
    for task, metric in res.primary.items():
        df = res.main_rows(task)
        colour = colours(res.summary["method"])
        y = 100 * df["value"]
        turns = "follow_up_prefill_gflops_mean" in df.columns and df["follow_up_prefill_gflops_mean"].notna().all()
        if turns:  # a conversation: every turn's prefill (re-prune's second prefill included) and its time
            df = df.assign(conversation_gflops=df["prefill_gflops_mean"] + df["follow_up_prefill_gflops_mean"],
                           conversation_ms=df["prefill_ms_median"] + df.get("follow_up_prefill_ms_median", 0))
        axes = [("flops", *flops_axis(df, "conversation_gflops" if turns else "prefill_gflops_mean")),
                ("latency", df.get("conversation_ms" if turns else "prefill_ms_median"), "ms")]
        for kind, x, unit in axes:
            if x is None or x.isna().all():
                continue
            keep = x.notna()
            fig, ax = plt.subplots(figsize=(10, 4.8), dpi=130)
            if kind == "latency":  # before `_draw`, so the legend lists its marks
                _timing_spread(ax, df[keep], x[keep], y[keep], colour, turns)
            _draw(ax, df[keep], x[keep], y[keep], colour, timed=kind == "latency")
            per = "per conversation, all turns" if turns else "per sample"
            what = (f"prefill {unit} {per} (vision + reducer + projector + LLM prefill)" if kind == "flops" else
                    f"measured prefill time {per} (ms, median over batches; bars: interquartile range)")
            ax.set_xlabel(what)
            ax.set_ylabel(f"{metric} (%)")
            labels = "budgets: shares of each image's tokens" if (df["budget_tokens"] < 1).any() else "visual tokens"
            ax.set_title(f"{task}: {metric} vs {'compute' if kind == 'flops' else 'latency'} (labels: {labels})",
                         fontsize=10)
            _footer(fig, df)
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            written.append(save(fig, out / f"accuracy_vs_{kind}_{file_part(task)}.png"))
    return written


def relative_average(res: Results, out: Path) -> Path | None:
    """Mean over tasks of accuracy / full's accuracy (%), against mean prefill FLOPs / full's (%).

    Only tasks with a `full` row count; a (method, budget) enters the average only if it ran on all of them. A
    conversation task counts once, by its prune-once cells (the mode a serving engine runs).
    """
    rows = res.main_rows()
    rows = rows[~rows["task"].str.endswith("(re-prune)")]
    full = rows[rows["method"] == REFERENCE].drop_duplicates("task").set_index("task")
    rows = rows[rows["task"].isin(full.index)]
    if rows.empty:
        return None
    rel = rows.assign(acc_rel=100 * rows["value"] / rows["task"].map(full["value"]),
                      flops_rel=100 * rows["prefill_gflops_mean"] / rows["task"].map(full["prefill_gflops_mean"]))
    n_tasks = len(full)
    agg = rel.groupby(["method", "budget"], as_index=False).agg(
        acc_rel=("acc_rel", "mean"), flops_rel=("flops_rel", "mean"), tasks=("task", "nunique"),
        budget_tokens=("budget_tokens", "first"))
    agg = agg[agg["tasks"] == n_tasks].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=130)
    _draw(ax, agg, agg["flops_rel"], agg["acc_rel"], colours(res.summary["method"]))
    ax.set_xlabel(f"prefill FLOPs relative to {REFERENCE} (%)")
    ax.set_ylabel(f"accuracy relative to {REFERENCE} (%), mean over tasks")
    ax.set_title(f"average over {n_tasks} task(s): {', '.join(full.index)}", fontsize=10)
    fig.tight_layout()
    return save(fig, out / "relative_to_full.png")


def tokens_per_layer(res: Results, out: Path) -> list[Path]:
    """Per task: mean visual tokens at each LLM layer, for the methods whose count changes inside the LLM."""
    written = []
    for task in res.primary:
        series = {k: v for k, v in res.layers.items() if k[0] == task}
        inside = {k: v for k, v in series.items() if max(v) != min(v)}
        if not inside:
            continue
        colour = colours(res.summary["method"])
        fig, ax = plt.subplots(figsize=(10, 4.5), dpi=130)
        styles = ["-", "--", ":", "-."]
        for (_, method, _), v in series.items():
            if method == REFERENCE:
                ax.plot(range(len(v)), v, color="black", linestyle="--", linewidth=1, drawstyle="steps-mid",
                        label=REFERENCE)
        for j, ((_, method, budget), v) in enumerate(sorted(inside.items(), key=lambda kv: (kv[0][1], kv[1][-1]))):
            ax.plot(range(len(v)), v, marker="o", color=colour[method], linestyle=styles[j % len(styles)],
                    drawstyle="steps-mid", label=f"{method}, budget {budget}")
        ax.set_xlabel("LLM decoder layer")
        ax.set_ylabel("visual tokens entering the layer (mean per sample)")
        ax.set_title(f"{task}: visual tokens through the LLM (prefill)", fontsize=10)
        ax.set_xticks(range(len(next(iter(inside.values())))))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the data
        fig.tight_layout()
        written.append(save(fig, out / f"tokens_per_layer_{file_part(task)}.png"))
    return written


QUESTION_COLOURS = {True: "#c0392b", False: "#2471a3"}  # methods that see the question, those that do not
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "d", "p")  # 12: no two methods of a side alike


def sees_question(methods) -> dict[str, bool]:
    """Which of `methods` see the question, from the catalogue's `question` field (a name it lacks: no)."""
    known = catalogue()
    return {m: bool(known.get(m, {}).get("question")) for m in methods}


def question_families(res: Results, out: Path) -> list[Path]:
    """Per task where methods of both kinds ran: accuracy vs prefill FLOPs with each method coloured by whether it
    sees the question (red) or not (blue), each its own marker; `full`'s line and the `oracle` row (dotted) as the
    references. Written as `accuracy_vs_flops_by_question_<task>.png`."""
    written = []
    for task, metric in res.primary.items():
        df = res.main_rows(task)
        methods = [m for m in df["method"].unique() if m not in (REFERENCE, UPPER)]
        aware = sees_question(methods)
        if len(set(aware.values())) < 2:
            continue
        x, unit = flops_axis(df)
        y = 100 * df["value"]
        fig, ax = plt.subplots(figsize=(10, 4.8), dpi=130)
        for family in (True, False):
            ax.plot([], [], color=QUESTION_COLOURS[family], linewidth=3,
                    label="sees the question:" if family else "does not see it:")
            for j, method in enumerate(sorted(m for m in methods if aware[m] == family)):
                idx = df[df["method"] == method].sort_values("budget_tokens").index
                ax.plot(x[idx], y[idx], color=QUESTION_COLOURS[family], marker=MARKERS[j % len(MARKERS)],
                        linestyle="-" if family else "--", linewidth=1.4, markersize=6, label=f"  {method}")
        idx = df[df["method"] == UPPER].sort_values("budget_tokens").index
        if len(idx):
            ax.plot(x[idx], y[idx], color="black", linestyle=":", marker="^", markersize=5,
                    label=f"{UPPER} (reference: relevant patches first)")
        for i in df.index[df["method"] == REFERENCE]:
            ax.axhline(y[i], color="black", linestyle="--", linewidth=1, label=f"{REFERENCE} (every token)")
        ax.set_xlabel(f"prefill {unit} per sample (vision + reducer + projector + LLM prefill)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{task}: does the question matter? red: the method sees it, blue: it does not", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the data
        _footer(fig, df)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        written.append(save(fig, out / f"accuracy_vs_flops_by_question_{file_part(task)}.png"))
    return written
