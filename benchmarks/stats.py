"""Which differences are real: confidence intervals over questions and paired comparisons between methods (scipy).

* `mean_ci`: the 95 % interval of a metric that is a mean over questions, by the percentile bootstrap over
  questions (`scipy.stats.bootstrap`, 2,000 resamples, a fixed seed: the same numbers on every run).
* `paired_difference`: two methods scored on the same questions; the 95 % paired-bootstrap interval of the
  difference of their means (questions resampled together, `bootstrap_mean_ci`, 2,000 resamples drawn as counts of
  the distinct differences, a fixed seed), and for 0/1 scores McNemar's exact test (the two-sided
  binomial test of the discordant pairs, `scipy.stats.binomtest`).
* `comparisons`: for each task and budget, every method against `full`, against the best other method at that
  budget (never a reference row such as `oracle`; the oracle's own "best other" is the best method: its headroom),
  the learned methods against the best training-free one and against each other, and the methods that act before
  the LLM against each in-LLM method at equal prefill FLOPs, on the task's primary metric; a difference is
  significant when McNemar's exact p < 0.05 (0/1 scores) or else when its interval excludes 0.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats
from scipy.stats import false_discovery_control

from benchmarks.defaults import catalogue
from methods.budget import Budget

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
CI_METHOD = f"bootstrap over questions, percentile, {RESAMPLES} resamples, seed {SEED}"
REFERENCE = "full"


def mean_ci(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95 % percentile-bootstrap interval of the mean of `values` (one per question); None below 2 values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    if np.all(x == x[0]):  # every resample has the same mean
        return float(x[0]), float(x[0])
    r = stats.bootstrap((x,), np.mean, n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                        vectorized=True, rng=np.random.default_rng(SEED))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided exact McNemar p-value for paired 0/1 scores; None unless every score is 0 or 1."""
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        return None
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def bootstrap_mean_ci(d: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of the mean of `d` (one value per question; for a paired comparison the
    per-question differences, so the questions are resampled together), `RESAMPLES` resamples, seed `SEED`.

    Hand-written for a measured reason: resampling n questions with replacement draws each distinct value of `d` a
    multinomial number of times, so the resamples are drawn as those counts (`Generator.multinomial`), the same
    bootstrap distribution as drawing indices, at a cost that grows with the distinct values (3 for 0/1 scores, a
    few for means over seeds or an interpolated curve) instead of with n x resamples. A paper's sweep makes thousands
    of comparisons of thousands of questions: through `scipy.stats.bootstrap` (paired) one of 5,000 questions took
    0.22 s, 2,400 of them (500 cells) 9 minutes on 2 cores; drawn so, under a millisecond
    (`python -m benchmarks.tools.store_scale`)."""
    values, counts = np.unique(np.asarray(d, dtype=float), return_counts=True)
    draws = np.random.default_rng(SEED).multinomial(len(d), counts / len(d), size=RESAMPLES)  # (resamples, values)
    means = draws @ values / len(d)
    low, high = np.percentile(means, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return float(low), float(high)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """mean(a) - mean(b) over the same questions (a[i] and b[i] score question i), its 95 % paired-bootstrap
    interval, McNemar's exact p for 0/1 scores, and whether the difference is significant at 95 %: by the exact
    test for 0/1 scores (near p = 0.05 the percentile interval can exclude 0 while the exact test does not reject),
    otherwise when the interval excludes 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if a.size else float("nan")
    low = high = diff
    d = a - b
    if a.size >= 2 and not np.all(d == d[0]):
        low, high = bootstrap_mean_ci(d)
    p = mcnemar_exact(a, b)
    significant = a.size >= 2 and (p < 1 - CONFIDENCE if p is not None else (low > 0 or high < 0))
    return {"n_paired": int(a.size), "difference": diff, "ci95_low": low, "ci95_high": high, "mcnemar_p": p,
            "significant": bool(significant)}


def comparisons(samples: Iterable[dict], registry: dict[str, dict] | None = None) -> list[dict]:
    """Paired comparisons from sample records (`task`, `method`, `budget`, `doc_id`, `correct`: the primary metric of
    the doc; `prefill_gflops` for the equal-compute kind; read once, so a generator over cell files keeps only the
    scores in memory). Per task, one row per (cell, reference) of these kinds
    (`reference_kind`), over the questions both answered:

    * `full`: every cell against the task's `full` cell;
    * `best other`: against the best other method at the same budget (the highest mean; for the best itself, the
      runner-up; never a reference row such as `oracle`, whose own "best other" is the best method: its headroom);
    * `best training-free`: a learned method against the best method at its budget that is neither learned nor a
      reference row;
    * `learned`: each learned method against each other learned method at the same budget (once per pair, in name
      order);
    * `question`: the best method that sees the question (the catalogue's `question`) against the best that does not,
      at the same budget, once among the training-free methods and once among the learned ones (reference rows
      aside; a side with no such method gets no row);
    * `equal prefill FLOPs`: a method that acts before the LLM (learned or not) against each in-LLM method (site
      `llm`: FastV, DART, PyramidDrop, SparseVLM) at the same mean prefill FLOPs. The in-LLM method's curve over its
      numeric budgets is interpolated linearly in mean prefill MACs, per question (its two neighbouring cells'
      scores weighted, so the difference is still paired); `reference_budget` is the interpolated budget. A cell
      outside that curve's range of FLOPs gets no row (no extrapolation);
    * `re-prune`: on a conversation task, a method's prune-once cell against its own re-prune cell (what pruning
      once, for the first question, costs the later ones).

    A conversation task's cells of each mode (`conversation`) are compared apart, each mode's against its own `full`;
    its primary metric is its last turn's. A learned method with controllers of several training seeds is compared by
    its mean over seeds per question (then not 0/1: the paired bootstrap interval decides); so is an interpolated
    reference. Differences are in points (x 100): tasks whose primary scores are not all in [0, 1] get no comparison.
    `registry` (default the catalogue, `benchmarks.defaults.catalogue`) says which names are learned, in-LLM, see the
    question or are reference rows; others are none."""
    registry = catalogue() if registry is None else registry
    learned = {m for m, e in registry.items() if e.get("learned")}
    aware = {m for m, e in registry.items() if e.get("question")}
    in_llm = {m for m, e in registry.items() if e.get("site") == "llm"}
    not_methods = {m for m, e in registry.items() if e.get("reference")}
    per_seed: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    gflops: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for s in samples:
        if isinstance(s.get("correct"), (int, float)):
            key = (_task_key(s), s["method"], str(s["budget"]))
            per_seed[key][s["doc_id"]].append(float(s["correct"]))
            if isinstance(s.get("prefill_gflops"), (int, float)):
                gflops[key].append(float(s["prefill_gflops"]))
    # a learned method's cells of several controllers (training seeds): each question's score is their mean
    scores = {k: {d: float(np.mean(v)) for d, v in docs.items()} for k, docs in per_seed.items()}
    cost = {k: float(np.mean(v)) for k, v in gflops.items() if len(v) == sum(map(len, per_seed[k].values()))}
    fractions = {t for t, _, _ in scores} - {t for (t, _, _), v in scores.items() if not all(0 <= x <= 1
                                                                                           for x in v.values())}
    out = []

    def add(task, budget, method, mine, kind, name, theirs, reference_budget):
        task, _, mode = task.partition(MODE_MARK)
        out.append({"task": task, "conversation": mode or None, "budget": budget, "method": method, "reference": name,
                    "reference_kind": kind, "reference_budget": reference_budget,
                    **_scaled(paired_difference(*_paired(mine, theirs)))})

    for task in sorted(fractions):
        full = next(((b, v) for (t, m, b), v in scores.items() if t == task and m == REFERENCE), None)
        curves = {r: _curve(task, r, scores, cost) for r in sorted(in_llm)}
        budgets = {b for t, m, b in scores if t == task and m != REFERENCE}
        for budget in sorted(budgets, key=lambda b: Budget.of(b).order):
            cells = {m: v for (t, m, b), v in scores.items() if t == task and b == budget and m != REFERENCE}
            means = {m: float(np.mean(list(v.values()))) for m, v in cells.items()}
            ranked = sorted((m for m in cells if m not in not_methods), key=lambda m: (-means[m], m))
            for kind in (False, True):  # training-free, then learned: the best that sees the question vs the best not
                side = [m for m in ranked if (m in learned) == kind]
                sees, blind = ([m for m in side if (m in aware) == a] for a in (True, False))
                if sees and blind:
                    add(task, budget, sees[0], cells[sees[0]], "question", blind[0], cells[blind[0]], budget)
            for method, mine in sorted(cells.items()):
                if full:
                    add(task, budget, method, mine, "full", REFERENCE, full[1], full[0])
                others = [m for m in ranked if m != method]
                if others:
                    add(task, budget, method, mine, "best other", others[0], cells[others[0]], budget)
                if method in learned:
                    static = [m for m in others if m not in learned]
                    if static:
                        add(task, budget, method, mine, "best training-free", static[0], cells[static[0]], budget)
                    for other in sorted(m for m in others if m in learned and m > method):
                        add(task, budget, method, mine, "learned", other, cells[other], budget)
                again = task.replace(f"{MODE_MARK}prune-once", f"{MODE_MARK}re-prune")
                if again != task and (again, method, budget) in scores:  # a conversation: the same method re-pruned
                    add(task, budget, method, mine, "re-prune", method, scores[(again, method, budget)], budget)
                x = cost.get((task, method, budget))
                if method in in_llm or method in not_methods or x is None:
                    continue
                for r, curve in curves.items():
                    at = _at_flops(curve, x)
                    if at is not None:
                        add(task, budget, method, mine, "equal prefill FLOPs", r, at[1], f"{at[0]:.1f}")
    return with_fdr(out)


def with_fdr(rows: list[dict]) -> list[dict]:
    """Each comparison's McNemar p-value adjusted for the many a sweep makes (`p_adjusted_bh`: Benjamini-Hochberg's
    false discovery rate over every row with a McNemar p-value, through scipy's `false_discovery_control`), and
    whether it stays significant at 5 % (`significant_bh`); rows decided by the bootstrap interval (scores not 0/1)
    get neither."""
    tested = [i for i, r in enumerate(rows) if r.get("mcnemar_p") is not None]
    adjusted = false_discovery_control([rows[i]["mcnemar_p"] for i in tested], method="bh") if tested else []
    for r in rows:
        r["p_adjusted_bh"], r["significant_bh"] = None, None
    for i, p in zip(tested, adjusted, strict=True):
        rows[i]["p_adjusted_bh"] = round(float(p), 6)
        rows[i]["significant_bh"] = bool(p < 1 - CONFIDENCE)
    return rows


MODE_MARK = "\x1f"  # joins a conversation task's name and its mode in the comparisons' grouping key


def _task_key(s: dict) -> str:
    """A sample's task as the comparisons group it: a conversation task's cells of each mode apart."""
    return s["task"] if not s.get("conversation") else f"{s['task']}{MODE_MARK}{s['conversation']}"


def _curve(task: str, method: str, scores: dict, cost: dict) -> list[tuple[float, float, dict[int, float]]]:
    """(mean prefill GFLOPs, budget, per-question scores) of `method`'s cells with a numeric budget, cheapest first."""
    pts = []
    for (t, m, b), v in scores.items():
        if t != task or m != method or (t, m, b) not in cost:
            continue
        budget = Budget.of(b)
        if budget.is_number:
            pts.append((cost[(t, m, b)], float(budget.record), v))
    return sorted(pts, key=lambda p: p[0])


def _at_flops(curve: list, x: float) -> tuple[float, dict[int, float]] | None:
    """The curve's (budget, per-question scores) at mean prefill GFLOPs `x`, linearly between its two neighbouring
    cells (questions both answered); None outside its range or with fewer than two cells unless one sits at `x`."""
    for (x0, b0, s0), (x1, b1, s1) in itertools.pairwise(curve):
        if x0 <= x <= x1 and x1 > x0:
            w = (x - x0) / (x1 - x0)
            return b0 + w * (b1 - b0), {d: (1 - w) * s0[d] + w * s1[d] for d in s0.keys() & s1.keys()}
    exact = [(b, s) for c, b, s in curve if math.isclose(c, x, rel_tol=1e-9)]
    return exact[0] if exact else None


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[list[float], list[float]]:
    docs = sorted(a.keys() & b.keys())
    return [a[d] for d in docs], [b[d] for d in docs]


def _scaled(d: dict) -> dict:
    """Differences in points, as `difference_pts` and its interval's `difference_ci95_low_pts` / `_high_pts`."""
    return {"n_paired": d["n_paired"], "difference_pts": round(100 * d["difference"], 2),
            "difference_ci95_low_pts": round(100 * d["ci95_low"], 2),
            "difference_ci95_high_pts": round(100 * d["ci95_high"], 2),
            "mcnemar_p": None if d["mcnemar_p"] is None else round(d["mcnemar_p"], 6),
            "significant": d["significant"]}


