"""Confidence intervals and paired comparisons (benchmarks/stats.py), on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.records import metric_ci
from benchmarks.stats import bootstrap_mean_ci, comparisons, mcnemar_exact, mean_ci, paired_difference


def test_mcnemar_exact_by_hand():
    """10 questions only A answers, 2 only B: two-sided binomial p = 2 (C(12,0) + C(12,1) + C(12,2)) / 2^12."""
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 5, dtype=float)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 5, dtype=float)
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(a, a) == 1.0  # no discordant pair
    assert mcnemar_exact(a * 0.5, b) is None  # not 0/1 scores


def test_mean_ci_contains_the_mean_is_fixed_and_shrinks_with_more_questions():
    rng = np.random.default_rng(3)
    small, large = (rng.random(100) < 0.7).astype(float), (rng.random(2000) < 0.7).astype(float)
    lo, hi = mean_ci(small)
    assert lo <= small.mean() <= hi and mean_ci(small) == (lo, hi)  # a fixed seed: the same interval every time
    lo2, hi2 = mean_ci(large)
    assert hi2 - lo2 < hi - lo
    half = 1.96 * math.sqrt(0.7 * 0.3 / 2000)  # the normal approximation, for scale
    assert hi2 - lo2 == pytest.approx(2 * half, rel=0.15)
    assert mean_ci([1.0]) is None and mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_paired_difference_pairs_questions():
    rng = np.random.default_rng(0)
    a = (rng.random(500) < 0.8).astype(float)
    same = paired_difference(a, a)
    assert same["difference"] == 0 and not same["significant"] and same["mcnemar_p"] == 1.0
    shifted = paired_difference(a + 0.1, a)  # the same questions, every score 0.1 higher: no doubt (not 0/1: the CI)
    assert shifted["ci95_low"] == pytest.approx(0.1) and shifted["ci95_high"] == pytest.approx(0.1)
    assert shifted["significant"]
    b = a.copy()
    b[:40] = 0  # B loses 40 questions A answered (those of them A got right)
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(a[:40].mean() * 40 / 500)
    assert d["ci95_low"] > 0 and d["significant"] and d["mcnemar_p"] < 1e-6
    unpaired_width = 2 * 1.96 * math.sqrt(2 * 0.8 * 0.2 / 500)  # what ignoring the pairing would give
    assert d["ci95_high"] - d["ci95_low"] < unpaired_width / 2


def test_comparisons_against_full_and_the_best_other_method():
    def recs(method, budget, correct):
        return [{"task": "t", "method": method, "budget": budget, "doc_id": i, "correct": c}
                for i, c in enumerate(correct)]

    samples = recs("full", 16, [1, 1, 1, 1]) + recs("a", 2, [1, 1, 1, 0]) + recs("b", 2, [1, 0, 0, 0])
    rows = {(r["method"], r["reference_kind"]): r for r in comparisons(samples)}
    assert set(rows) == {("a", "full"), ("a", "best other"), ("b", "full"), ("b", "best other")}
    assert rows[("a", "full")]["difference_pts"] == -25.0 and rows[("b", "full")]["difference_pts"] == -75.0
    assert rows[("a", "best other")]["reference"] == "b" and rows[("a", "best other")]["difference_pts"] == 50.0
    assert rows[("b", "best other")]["reference"] == "a" and rows[("b", "best other")]["difference_pts"] == -50.0
    assert all(r["n_paired"] == 4 and r["budget"] == "2" for r in rows.values())
    mme = recs("full", 16, [1500.0, 1400.0]) + recs("a", 2, [1200.0, 1300.0])
    assert comparisons(mme) == []  # scores that are not fractions get no points


def test_interval_only_for_metrics_that_are_means_over_questions():
    docs = [{"exact_match": v, "acc_color": (v if i % 2 else None)} for i, v in enumerate([1, 0, 1, 1, 0, 1])]
    ci = metric_ci(docs, "exact_match", 4 / 6)
    assert ci["ci95_low"] <= 4 / 6 <= ci["ci95_high"] and "bootstrap" in ci["ci_method"]
    color = metric_ci(docs, "acc_color", 2 / 3)  # its own questions only (docs 1, 3, 5: 0, 1, 1)
    assert color["ci95_low"] < 2 / 3 < color["ci95_high"]
    assert metric_ci(docs, "acc_color", 4 / 6 + 0.1)["ci95_low"] is None
    assert metric_ci(docs, "exact_match", 4.0)["ci95_low"] is None  # a sum, not a mean: no interval


def test_significance_for_0_1_scores_is_the_exact_test():
    """19 questions only A answers and 8 only B: the exact test gives p = 0.052 (not significant) although the
    percentile interval of the difference may just exclude 0; the test decides."""
    a = np.array([1] * 19 + [0] * 8 + [1] * 900 + [0] * 73, dtype=float)
    b = np.array([0] * 19 + [1] * 8 + [1] * 900 + [0] * 73, dtype=float)
    d = paired_difference(a, b)
    assert d["mcnemar_p"] == pytest.approx(0.0522, abs=5e-4) and not d["significant"]
    a2 = np.array([1] * 21 + [0] * 7 + [1] * 900 + [0] * 72, dtype=float)
    b2 = np.array([0] * 21 + [1] * 7 + [1] * 900 + [0] * 72, dtype=float)
    assert paired_difference(a2, b2)["mcnemar_p"] < 0.05 and paired_difference(a2, b2)["significant"]


def test_several_controller_seeds_are_compared_by_their_mean_per_question():
    def recs(method, seed, correct):
        return [{"task": "t", "method": method, "budget": 2, "controller_seed": seed, "doc_id": i, "correct": c}
                for i, c in enumerate(correct)]

    samples = (recs("full", None, [1] * 6) + recs("a", 0, [1, 1, 1, 1, 0, 0]) + recs("a", 1, [1, 1, 0, 0, 0, 0])
               + recs("b", None, [1, 0, 0, 0, 0, 0]))
    rows = {(r["method"], r["reference_kind"]): r for r in comparisons(samples)}
    assert rows[("a", "full")]["difference_pts"] == pytest.approx(-50.0)  # (4/6 + 2/6) / 2 - 1
    assert rows[("a", "full")]["n_paired"] == 6 and rows[("a", "full")]["mcnemar_p"] is None  # means: not 0/1
    assert rows[("b", "best other")]["reference"] == "a"


def test_question_comparisons_pair_the_best_of_each_side():
    """Per budget, the best method that sees the question against the best that does not, among the training-free
    methods and among the learned ones; reference rows never take part; one side missing: no row."""
    registry = {"qa": {"question": True}, "qb": {"question": True}, "n": {}, "lq": {"learned": True, "question": True},
                "lb": {"learned": True}, "orc": {"reference": True, "question": True}}

    def recs(method, budget, correct):
        return [{"task": "t", "method": method, "budget": budget, "doc_id": i, "correct": c}
                for i, c in enumerate(correct)]

    samples = (recs("qa", 8, [1, 0, 0, 0]) + recs("qb", 8, [1, 1, 0, 0]) + recs("n", 8, [1, 1, 1, 0])
               + recs("lq", 8, [1, 1, 1, 1]) + recs("lb", 8, [0, 0, 0, 0]) + recs("orc", 8, [1, 1, 1, 1])
               + recs("qa", 16, [1, 1, 1, 1]) + recs("orc", 16, [1, 1, 1, 1]))
    rows = [(r["budget"], r["method"], r["reference"], r["difference_pts"])
            for r in comparisons(samples, registry) if r["reference_kind"] == "question"]
    assert rows == [("8", "qb", "n", -25.0), ("8", "lq", "lb", 100.0)]  # at 16 nothing blind ran


def test_learned_and_equal_flops_comparisons():
    """The learned methods against the best training-free method and each other; a pre-LLM method against an in-LLM
    one at equal prefill FLOPs, interpolated per question between its two neighbouring budgets (hand-computed)."""
    registry = {"la": {"learned": True}, "lb": {"learned": True}, "s": {}, "fv": {"site": "llm"},
                "orc": {"reference": True}}

    def recs(method, budget, correct, gflops):
        return [{"task": "t", "method": method, "budget": budget, "doc_id": i, "correct": c, "prefill_gflops": gflops}
                for i, c in enumerate(correct)]

    samples = (recs("full", 144, [1, 1, 1, 1], 10.0) + recs("la", 16, [1, 1, 1, 0], 3.0)
               + recs("lb", 16, [1, 1, 0, 0], 3.0) + recs("s", 16, [1, 0, 0, 0], 3.0)
               + recs("orc", 16, [1, 1, 1, 1], 3.0)
               + recs("fv", 16, [0, 0, 1, 1], 2.0) + recs("fv", 36, [1, 1, 1, 1], 6.0))
    rows = {(r["method"], r["reference_kind"], r["reference"]): r for r in comparisons(samples, registry)}
    static = rows[("la", "best training-free", "fv")]  # fv (0.5) beats s (0.25); lb is learned, orc a reference
    assert static["difference_pts"] == 25.0 and static["reference_budget"] == "16"
    assert ("la", "learned", "lb") in rows and ("lb", "learned", "la") not in rows  # once per pair
    assert rows[("la", "learned", "lb")]["difference_pts"] == 25.0
    assert not any(k[0] in ("s", "fv", "orc", "full") and k[1] in ("learned", "best training-free") for k in rows)
    # la costs 3.0 GFLOPs; fv's curve runs 2.0 (budget 16) -> 6.0 (budget 36): w = 1/4, budget 21.0, and per
    # question fv scores 0.25, 0.25, 1, 1 (mean 0.625) against la's 1, 1, 1, 0 (0.75): +12.5 points
    eq = rows[("la", "equal prefill FLOPs", "fv")]
    assert eq["reference_budget"] == "21.0" and eq["difference_pts"] == 12.5 and eq["mcnemar_p"] is None
    assert ("s", "equal prefill FLOPs", "fv") in rows
    assert not any(k[1] == "equal prefill FLOPs" and k[0] in ("fv", "orc", "full") for k in rows)
    outside = comparisons(recs("la", 16, [1, 0], 9.0) + recs("fv", 16, [1, 1], 2.0) + recs("fv", 36, [1, 1], 6.0),
                          registry)
    assert not [r for r in outside if r["reference_kind"] == "equal prefill FLOPs"]  # beyond the curve: no row


def test_paired_runs_compares_two_folders_question_by_question(tmp_path, capsys):
    """Two folders of one cell: 10 questions, the first answers 8 (docs 0-7), the second 5 (docs 0-4); only the
    second folder has a second cell and a doc without a score: 8/10 vs 5/10 over 10 paired, +30 points, 3
    discordant pairs all one way (McNemar p = 2 / 8), 3 answers changed."""
    from benchmarks.tools.paired_runs import compare, main  # noqa: PLC0415
    from tests.folders import write_cells  # noqa: PLC0415

    def write(folder, correct, extra=()):
        folder.mkdir()
        rows = [{"task": "t", "method": "dart", "budget": "16", "doc_id": i, "correct": float(c),
                 "prediction": "yes" if c else "no"} for i, c in enumerate(correct)]
        write_cells(folder, [*rows, *extra])

    write(tmp_path / "a", [1] * 8 + [0] * 2)
    write(tmp_path / "b", [1] * 5 + [0] * 5, [{"task": "t", "method": "pdrop", "budget": "16", "doc_id": 0,
                                               "correct": 1.0},
                                              {"task": "t", "method": "dart", "budget": "16", "doc_id": 99,
                                               "correct": None}])
    row = compare(tmp_path / "a", tmp_path / "b").to_dict("records")
    assert len(row) == 1 and row[0]["n_paired"] == 10
    assert (row[0]["first_pct"], row[0]["second_pct"]) == (80.0, 50.0)
    assert row[0]["difference_pt"] == pytest.approx(30.0) and row[0]["mcnemar_p"] == pytest.approx(0.25)
    assert row[0]["answers_changed_pct"] == 30.0 and not row[0]["significant"]
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--csv", str(tmp_path / "out.csv")]) == 0
    assert "| dart " in capsys.readouterr().out and (tmp_path / "out.csv").is_file()
    with pytest.raises(SystemExit, match="no cells/\\*.parquet there"):
        compare(tmp_path / "a", tmp_path / "missing")
    write_cells(tmp_path / "corrupt", [{"task": "t", "method": "dart", "budget": "16"}])
    with pytest.raises(SystemExit, match="corrupt/cells/t__dart__16__fp0.parquet: not a cell file with sample records"):
        compare(tmp_path / "a", tmp_path / "corrupt")
    # a learned method's cell per controller seed: seed 1 answers doc 0 right in both, seed 0 in neither
    for name in ("c", "d"):
        write_cells(tmp_path / name, [{"task": "t", "method": "adaptive_b", "budget": "16", "controller_seed": s,
                                       "doc_id": 0, "correct": float(s)} for s in (0, 1)])
    seeds = compare(tmp_path / "c", tmp_path / "d")
    assert seeds["controller_seed"].tolist() == ["0", "1"] and seeds["first_pct"].tolist() == [0.0, 100.0]


def test_the_sweeps_mcnemar_tests_get_benjamini_hochberg_adjusted_p_values():
    """Hand-computed: sorted p 0.01, 0.03, 0.04, 0.5 over m = 4 give 0.04, min(0.06, 0.0533), 0.0533, 0.5; a row the
    bootstrap decides (no McNemar p) gets neither column."""
    from benchmarks.stats import with_fdr  # noqa: PLC0415

    rows = with_fdr([{"mcnemar_p": p} for p in (0.01, 0.04, 0.03, 0.5, None)])
    assert [r["p_adjusted_bh"] for r in rows] == [0.04, 0.053333, 0.053333, 0.5, None]
    assert [r["significant_bh"] for r in rows] == [True, False, False, False, None]


def test_the_bootstrap_by_counts_is_the_bootstrap_by_indices():
    """`bootstrap_mean_ci` draws each resample as multinomial counts of the distinct values: the same distribution as
    resampling questions (scipy's paired bootstrap, the slow restatement), so both intervals agree to Monte-Carlo
    error, on 0/1 differences and on a mean over seeds' few values; and it is fixed by its seed."""
    rng = np.random.default_rng(7)
    for d in ((rng.random(800) < 0.7).astype(float) - (rng.random(800) < 0.5),
              rng.choice([-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1], 300)):
        ours = bootstrap_mean_ci(d)
        slow = stats.bootstrap((d,), np.mean, n_resamples=20_000, method="percentile", rng=np.random.default_rng(1))
        half = (slow.confidence_interval.high - slow.confidence_interval.low) / 2
        assert ours[0] == pytest.approx(slow.confidence_interval.low, abs=0.08 * half)
        assert ours[1] == pytest.approx(slow.confidence_interval.high, abs=0.08 * half)
        assert bootstrap_mean_ci(d) == ours
