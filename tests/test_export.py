"""A results folder exported as lmms-eval writes its runs, read back by lmms-eval's own loader."""

from __future__ import annotations

import csv
import json

from lmms_eval.baselines.loader import load_baseline
from lmms_eval.utils import sanitize_model_name

import run_bench
from benchmarks.store import read_samples
from benchmarks.tools import export


def test_cells_export_as_lmms_eval_runs_its_baseline_loader_reads(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_bench.main(["--model", str(tiny_ckpt), "--methods", "full", "random", "--budgets", "4", "--limit", "5",
                           "--tasks", "synth_vqa", "--output", str(out), "--batch-size", "5"]) == 0
    assert export.main([str(out), "--lmms-eval", str(tmp_path / "lmms")]) == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv")) if r["primary"] == "True"}
    samples = read_samples(out)
    folders = sorted((tmp_path / "lmms").iterdir())
    assert [f.name.split("__")[1] for f in folders] == ["full", "random"]  # one lmms-eval output folder per cell
    for folder in folders:
        method = folder.name.split("__")[1]
        (results_file,) = folder.rglob("*_results.json")
        (samples_file,) = folder.rglob("*_samples_synth_vqa.jsonl")
        assert results_file.parent == samples_file.parent  # named as lmms-eval names a model's folder
        assert results_file.parent.name == sanitize_model_name(str(tiny_ckpt.resolve()))
        scores, agg = load_baseline(str(samples_file), "synth_vqa")  # lmms-eval's --baseline loader
        mine = {s["doc_id"]: s["correct"] for s in samples if s["method"] == method}
        assert scores == mine and len(scores) == 5
        assert agg["results"]["synth_vqa"]["exact_match,none"] == float(rows[method]["value"])
        assert agg["config"]["model_args"].startswith(f"pretrained={tiny_ckpt.resolve()},method={method},budget=")
        assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"} <= set(agg)
        first = json.loads(samples_file.read_text().splitlines()[0])  # lmms-eval's fields, then ours
        assert {"doc_id", "target", "filtered_resps", "exact_match", "visual_tokens", "kept_indices"} <= set(first)
