"""Figures and tables from stored results: no torch, every figure written, runs combined, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plots.__main__ import main
from plots.curves import CATALOGUE, colours, pareto
from plots.data import load
from plots.pictures import selection_image
from plots.tables import table, to_latex
from tests.folders import write_cells

REPO = Path(__file__).resolve().parents[1]


def write_run(root: Path, cells: list[tuple], time_utc: str = "2026-01-01T00:00:00Z", layers: int = 3,
              legacy: bool = False) -> Path:
    """A results directory like run_bench.py writes: cells are (task, method, budget, accuracy, gflops, ms); the
    samples in Parquet cell files, or (`legacy`) in one samples.jsonl as earlier versions wrote them."""
    root.mkdir(parents=True, exist_ok=True)
    rows, samples = [], []
    for task, method, budget, acc, gflops, ms in cells:
        common = {"task": task, "method": method, "budget": budget, "budget_tokens": budget, "n": 10,
                  "visual_tokens_mean": float(budget),
                  "prefill_gflops_mean": gflops, "prefill_ms_median": ms, "relevant_precision_mean": 0.25,
                  "method_args": json.dumps({"budget": budget}), "time_utc": time_utc, "model": "/m/smoke/checkpoint",
                  "device": "cpu", "dtype": "float32", "batch_size": 4}
        rows.append({**common, "metric": "exact_match", "value": acc, "primary": True})
        rows.append({**common, "metric": "acc_color", "value": acc / 2, "primary": False})
        per_layer = [budget] * layers if method != "fastv" else [16] + [budget] * (layers - 1)
        for doc in range(2):
            samples.append({"task": task, "method": method, "budget": budget, "doc_id": doc,
                            "kept_indices": None if method == "full" else list(range(budget)),
                            "visual_tokens_per_layer": per_layer})
    pd.DataFrame(rows).to_csv(root / "summary.csv", index=False)
    if legacy:
        (root / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        write_cells(root, samples)
    pics = root / "pictures"
    pics.mkdir(exist_ok=True)
    for task in {c[0] for c in cells}:
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(pics / f"{task}__0.png")
        (pics / f"{task}__0.json").write_text(json.dumps({"task": task, "doc_id": 0, "question": "What colour?",
                                                          "grid": [4, 4]}))
    return root


CELLS = [("synth_vqa", "full", 16, 0.9, 0.30, 10.0), ("synth_vqa", "prumerge", 4, 0.7, 0.12, 5.0),
         ("synth_vqa", "prumerge", 8, 0.8, 0.15, 6.0), ("synth_vqa", "fastv", 4, 0.75, 0.25, 8.0),
         ("other", "full", 16, 0.6, 0.30, 10.0), ("other", "prumerge", 4, 0.3, 0.12, 5.0)]


@pytest.mark.slow
def test_every_figure_and_table_without_torch_in_seconds(tmp_path):
    run = write_run(tmp_path / "run", CELLS)
    code = ("import sys, time; t = time.time(); from plots.__main__ import main; rc = main([sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'plots imported torch'; print('SECONDS', time.time() - t); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("SECONDS")[1]) < 10
    names = {p.name for p in run.iterdir()}
    for task in ("synth_vqa", "other"):
        assert {f"accuracy_vs_flops_{task}.png", f"accuracy_vs_latency_{task}.png",
                f"selection_{task}_doc0.png"} <= names
    assert {"relative_to_full.png", "table.md", "table.csv", "table.tex", "tokens_per_layer_synth_vqa.png",
            "accuracy_vs_flops_by_question_synth_vqa.png"} <= names  # fastv sees the question, prumerge does not
    assert "accuracy_vs_flops_by_question_other.png" not in names  # prumerge only
    assert "tokens_per_layer_other.png" not in names  # no method acts inside the LLM there


def test_pareto_frontier_hand_computed():
    x = pd.Series([1.0, 2.0, 3.0, 3.0, 4.0])
    y = pd.Series([50.0, 40.0, 55.0, 60.0, 60.0])
    assert pareto(x, y) == [0, 3]  # (2, 40) is beaten by (1, 50); (3, 60) beats (3, 55); (4, 60) adds nothing


def test_selection_image_dims_exactly_the_dropped_patches():
    image = np.full((4, 4, 3), 200, np.uint8)
    out = selection_image(image, (2, 2), [0, 3])
    assert out[:2, :2].min() == 200 and out[2:, 2:].min() == 200  # patches 0 and 3 kept
    assert out[:2, 2:].max() == 50 and out[2:, :2].max() == 50  # patches 1 and 2 dimmed to 25 %
    assert selection_image(image, (2, 2), None) is image


def test_runs_combine_newest_row_wins_and_partial_sweeps_plot(tmp_path):
    a = write_run(tmp_path / "a", CELLS[:3])
    b = write_run(tmp_path / "b", [("synth_vqa", "prumerge", 8, 0.85, 0.15, 6.0),
                                   ("synth_vqa", "random", 8, 0.5, 0.15, 6.0)], time_utc="2026-02-01T00:00:00Z")
    t = table(load([a, b])).set_index(["method", "budget"])
    assert t.loc[("prumerge", "8"), "accuracy_pct"] == 85.0  # the newer run's row
    assert t.loc[("random", "8"), "relative_to_full_pct"] == pytest.approx(100 * 0.5 / 0.9, abs=0.05)
    assert t.loc[("prumerge", "4"), "prefill_gflops"] == 0.12
    assert main([str(b)]) == 0  # no `full` in it: no relative plot, the rest still drawn
    assert not (b / "relative_to_full.png").exists() and (b / "accuracy_vs_flops_synth_vqa.png").exists()
    assert main([str(a), str(b), "--out", str(tmp_path / "both")]) == 0  # e.g. the parts of a sharded sweep
    both = pd.read_csv(tmp_path / "both" / "combined_summary.csv")
    assert len(both) == 2 * 4 and set(pd.read_csv(a / "summary.csv").columns) <= set(both.columns)
    assert both.set_index(["method", "budget", "metric"]).loc[("prumerge", 8, "exact_match"), "value"] == 0.85


def test_latex_table_escapes_and_aligns():
    df = pd.DataFrame({"method": ["prumerge_plus"], "accuracy_pct": [71.8]})
    tex = to_latex(df)
    assert r"prumerge\_plus & 71.8 \\" in tex and r"\begin{tabular}{ll}" in tex and r"accuracy\_pct" in tex


@pytest.mark.parametrize("case", ["empty", "foreign", "missing"])
def test_unusable_directories_get_one_line_errors(tmp_path, capsys, case):
    d = tmp_path / "d"
    d.mkdir()
    if case == "foreign":
        (d / "summary.csv").write_text("name,score\nx,1\n")
    target = d if case != "missing" else tmp_path / "nope"
    assert main([str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {"empty": "run `python run_bench.py", "foreign": "not a run_bench.py summary",
            "missing": "not a directory"}[case] in err


def test_malformed_files_give_one_line_or_a_warning(tmp_path, capsys):
    good = tmp_path / "good"
    write_run(good, CELLS)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    lines = (bad / "summary.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("value")] = "oops"
    (bad / "summary.csv").write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "column value is not a number on line(s) 2" in err

    broken = tmp_path / "broken_samples"
    shutil.copytree(good, broken)
    (broken / "cells" / "synth_vqa__x__4__fp9.parquet").write_bytes(b"PAR1 truncated")
    assert main([str(broken)]) == 0
    assert "1 sample record(s) or cell file(s) cannot be read (synth_vqa__x__4__fp9.parquet)" in capsys.readouterr().err
    legacy = write_run(tmp_path / "legacy", CELLS, legacy=True)  # a folder of an earlier version: samples.jsonl
    with open(legacy / "samples.jsonl", "a") as f:
        f.write('{"task": "synth_vqa", "meth\n')
    assert main([str(legacy)]) == 0
    assert "1 sample record(s) or cell file(s) cannot be read (samples.jsonl:13)" in capsys.readouterr().err
    assert load([legacy]).kept == load([good]).kept and load([legacy]).layers == load([good]).layers
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(good), "--nope"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_unreadable_sample_fields_and_pictures_are_skipped_with_a_warning(tmp_path, capsys):
    run = write_run(tmp_path / "run", CELLS)
    write_cells(tmp_path / "more", [{"task": "synth_vqa", "method": "full", "budget": 16, "doc_id": "x",
                                     "visual_tokens_per_layer": "many"}])
    os.replace(next((tmp_path / "more" / "cells").glob("*.parquet")), run / "cells" / "synth_vqa__full__16__fq.parquet")
    (run / "pictures" / "other__0.png").write_bytes(b"not a png")
    assert main([str(run)]) == 0
    err = capsys.readouterr().err
    assert "1 sample record(s) or cell file(s) cannot be read (synth_vqa__full__16__fq.parquet:1)" in err
    assert "other__0.png cannot be read" in err


def test_controllers_of_several_seeds_become_their_mean_and_range(tmp_path):
    """A learned method's rows of several training seeds: one row, the mean value, `seeds`, `seed_min`/`seed_max`;
    the table shows them; the figure draws."""
    run = write_run(tmp_path / "r", [("t", "full", 144, 0.9, 0.3, 2.0), ("t", "random", 16, 0.5, 0.13, 1.0)])
    df = pd.read_csv(run / "summary.csv")
    seeded = []
    for seed, acc in ((0, 0.80), (1, 0.86), (2, 0.83)):
        row = df[(df["method"] == "random")].copy()
        row["method"], row["controller_seed"] = "adaptive_a", seed
        row["value"] = np.where(row["metric"] == "exact_match", acc, acc / 2)
        row["method_args"] = json.dumps({"budget": 16, "checkpoint": f"/c/seed{seed}"})
        seeded.append(row)
    pd.concat([df, *seeded]).to_csv(run / "summary.csv", index=False)
    res = load([run])
    a = res.main_rows("t").query("method == 'adaptive_a'")
    assert len(a) == 1 and a["seeds"].item() == 3 and a["value"].item() == pytest.approx(0.83)
    assert (a["seed_min"].item(), a["seed_max"].item()) == pytest.approx((0.80, 0.86))
    t = table(res).set_index("method")
    assert t.loc["adaptive_a", "seed_min_pct"] == 80.0 and t.loc["adaptive_a", "seed_max_pct"] == 86.0
    assert t.loc["random", "seeds"] == 1
    assert main([str(run)]) == 0


def test_comparison_tables_from_comparisons_csv(tmp_path):
    """comparisons.md lists the learned-vs-training-free, equal-FLOPs, learned-pair and oracle-headroom rows that
    benchmarks.stats writes, with signed differences, intervals and `*` for significant ones."""
    import csv  # noqa: PLC0415

    from benchmarks.stats import comparisons  # noqa: PLC0415
    from benchmarks.store import COMPARISON_COLUMNS  # noqa: PLC0415
    from plots.tables import comparison_tables  # noqa: PLC0415

    run = write_run(tmp_path / "run", [("synth_vqa", "full", 16, 0.9, 0.30, 10.0)])
    n = 60
    rng = np.random.default_rng(0)
    scores = {("adaptive_a", 4, 1.0): 0.9, ("adaptive_b", 4, 1.0): 0.6, ("divprune", 4, 1.0): 0.5,
              ("oracle", 4, 1.0): 0.95, ("fastv", 4, 0.5): 0.2, ("fastv", 8, 2.0): 0.9, ("full", 16, 3.0): 0.9}
    samples = [{"task": "synth_vqa", "method": m, "budget": b, "doc_id": i, "correct": float(rng.random() < p),
                "prefill_gflops": g} for (m, b, g), p in scores.items() for i in range(n)]
    with (run / "comparisons.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, COMPARISON_COLUMNS)
        w.writeheader()
        w.writerows(comparisons(samples))
    text = comparison_tables(load([run]))
    sections = text.split("## ")[1:]

    def rows(section: str) -> list[list[str]]:  # the table's synth_vqa rows, cell by cell (padding dropped)
        return [[c.strip() for c in r.strip().strip("|").split("|")] for r in section.splitlines()
                if r.startswith("| synth_vqa")]

    assert [s.split("\n")[0] for s in sections] == [
        "The learned methods against the best training-free method at the same budget",
        "Does the question matter? The best method that sees the question against the best that does not, at the "
        "same budget (training-free, then learned)",
        "Each method that acts before the LLM against each in-LLM method at equal prefill FLOPs",
        "The learned methods against each other", "The oracle's headroom: the reference row against the best "
        "method at the same budget"]
    question = rows(sections.pop(1))
    assert ["synth_vqa", "4", "fastv"] == question[0][:3] and question[0][3] != "fastv"  # fastv sees it, the rest not

    first = rows(sections[0])[0]
    assert first[:5] == ["synth_vqa", "4", "adaptive_a", "divprune", "4"] and first[5].endswith("*")
    eq = rows(sections[1])
    assert {r[2] for r in eq} == {"adaptive_a", "adaptive_b", "divprune"}  # not oracle, full
    assert all(r[3:5] == ["fastv", "5.3"] for r in eq)  # 1.0 GFLOPs: a third of the way from budget 4 to 8
    assert ["adaptive_a", "adaptive_b", "4"] in [r[2:5] for r in rows(sections[2])]
    assert ["oracle", "adaptive_a", "4"] in [r[2:5] for r in rows(sections[3])]
    assert comparison_tables(load([write_run(tmp_path / "bare", CELLS)])) == ""  # no comparisons.csv: nothing


def test_a_method_keeps_its_colour_in_every_run():
    """Every registered method has its own fixed colour (`METHOD_COLOURS`: registering a method fails here until it
    has one), the same whichever methods a run has; its marker says its kind."""
    from plots.curves import METHOD_COLOURS, marker_style  # noqa: PLC0415

    registered = [m for m in json.loads(CATALOGUE.read_text()) if m not in ("full", "oracle")]
    assert set(registered) <= set(METHOD_COLOURS), "give each new method a colour in plots/curves.py METHOD_COLOURS"
    every = colours(registered)
    assert len({every[m] for m in registered}) == len(registered)
    alone, with_others = colours(["vispruner", "full"]), colours(["fastv", "vispruner"])
    assert alone["vispruner"] == with_others["vispruner"] == every["vispruner"]
    assert colours(["mine", "fastv"])["mine"] not in {every[m] for m in registered}  # a name the registry lacks
    kinds = ("divprune", "fastv", "adaptive_b", "adaptive_q")  # plain, reads the question, learned, learned + question
    assert [marker_style(m)["marker"] for m in kinds] == ["o", "^", "s", "D"]
    assert marker_style("adaptive_b")["linestyle"] == "--" and marker_style("fastv")["linestyle"] == "-"


def test_the_latency_figure_draws_the_spread_and_leaves_untrusted_timings_off_the_frontier(tmp_path, monkeypatch):
    """A fast time measured on a busy machine (`timing_reliable` False) is ringed, and never the frontier's."""
    import plots.curves as curves  # noqa: PLC0415

    run = write_run(tmp_path / "run", CELLS[:4])
    summary = pd.read_csv(run / "summary.csv")
    summary["prefill_ms_iqr"] = 1.0
    summary["timing_reliable"] = summary["method"] != "fastv"  # fastv's 8 ms would beat full's 10 ms at 0.75
    summary.loc[summary["method"] == "fastv", "prefill_ms_median"] = 1.0  # ... and now beats everything, untrusted
    summary.to_csv(run / "summary.csv", index=False)
    fronts, rings = [], []
    real_pareto = curves.pareto
    monkeypatch.setattr(curves, "pareto", lambda x, y: fronts.append(list(x.index)) or real_pareto(x, y))
    real_spread = curves._timing_spread
    monkeypatch.setattr(curves, "_timing_spread", lambda ax, df, *a: rings.append(
        set(df.loc[~df["timing_reliable"], "method"])) or real_spread(ax, df, *a))
    res = load([run])
    curves.accuracy_curves(res, run)
    rows = res.main_rows("synth_vqa")
    fastv = set(rows.index[rows["method"] == "fastv"])
    assert fastv <= set(fronts[0]) and not fastv & set(fronts[1])  # FLOPs: a candidate; latency: left out
    assert rings == [{"fastv"}]


def test_budget_labels_never_overlap_each_other_nor_leave_the_axes():
    """Eleven points, eight of them in a diagonal cluster as a figure's methods bunch at one budget: every budget
    label lands on a spot of its own inside the axes (their drawn extents, measured by the renderer)."""
    import itertools  # noqa: PLC0415

    import matplotlib.pyplot as plt  # noqa: PLC0415

    from plots.curves import _budget_labels  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=130)
    pts = [(0.30 + 0.004 * i, 70 + 2 * i) for i in range(8)] + [(0.31, 69), (0.5, 60), (0.7, 90)]
    for x, y in pts:
        ax.plot([x], [y], "o")
    ax.set_xlim(0.2, 0.8)
    ax.set_ylim(50, 100)
    _budget_labels(ax, [(x, y, ("0.111", "16", "36")[i % 3], "C0", i) for i, (x, y) in enumerate(pts)])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    inside = ax.get_window_extent(renderer)
    assert len(boxes) == len(pts)
    assert not [(i, j) for i, j in itertools.combinations(range(len(boxes)), 2) if boxes[i].overlaps(boxes[j])]
    assert all(inside.contains(b.x0, b.y0) and inside.contains(b.x1, b.y1) for b in boxes)
    plt.close(fig)
