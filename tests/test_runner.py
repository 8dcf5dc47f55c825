"""The runner end to end on a tiny random checkpoint and the synthetic task: files, schema, resume, batching."""

from __future__ import annotations

import csv
import json

import pytest

import run_bench
from benchmarks.defaults import SYNTH_TASKS
from benchmarks.store import SUMMARY_COLUMNS

REPO = SYNTH_TASKS.parent.parent.parent


def read(out):
    rows = list(csv.DictReader(open(out / "summary.csv")))
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    return rows, samples


def test_sweep_writes_rows_and_samples_and_resumes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_ckpt), "--methods", "full", "--limit", "6", "--output", str(out), "--batch-size", "3"]
    assert run_bench.main(argv) == 0
    rows, samples = read(out)
    assert list(rows[0]) == SUMMARY_COLUMNS
    metrics = {r["metric"] for r in rows}
    assert {"exact_match", "acc_color"} <= metrics
    em = next(r for r in rows if r["metric"] == "exact_match")
    assert em["method"] == "full" and em["budget"] == "144" and em["n"] == "6"
    assert float(em["visual_tokens_mean"]) == 144.0 and em["git_sha"] and em["torch_version"]
    assert len(samples) == 6
    s = samples[0]
    for key in ("task", "method", "budget", "doc_id", "prediction", "target", "correct", "visual_tokens",
                "kept_indices", "visual_tokens_per_layer"):
        assert key in s
    assert s["visual_tokens"] == 144 and s["kept_indices"] is None
    assert sum(x["correct"] for x in samples) / 6 == pytest.approx(float(em["value"]))
    before = (out / "summary.csv").read_text()
    capsys.readouterr()
    assert run_bench.main(argv) == 0  # same command again: nothing to compute
    assert "1 of 1 cells already" in capsys.readouterr().out
    assert (out / "summary.csv").read_text() == before


def test_predictions_do_not_depend_on_batch_size(tiny_ckpt, tmp_path):
    preds = []
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        run_bench.main(["--model", str(tiny_ckpt), "--methods", "full", "--limit", "8", "--output", str(out),
                        "--batch-size", str(bs)])
        preds.append({s["doc_id"]: s["prediction"] for s in read(out)[1]})
    assert preds[0] == preds[1]


def test_dry_run_and_bad_input(tiny_ckpt, tmp_path, capsys):
    assert run_bench.main(["--model", str(tiny_ckpt), "--budgets", "16", "200", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no pruning" in out and "full" in out
    # the default set runs what fits this 2-layer LLM and says what not; asked for by name, fastv is an error
    assert "fastv skipped: fastv: LLM layer 2 must be in [1, 1]" in out
    assert not [line for line in out.splitlines() if line.startswith("synth_vqa  fastv")]
    assert run_bench.main(["--model", str(tiny_ckpt), "--methods", "fastv", "--budgets", "8", "--dry-run",
                           "--method-args", "fastv.layer=1"]) == 0
    assert run_bench.main(["--model", str(tiny_ckpt), "--methods", "fastv", "--budgets", "8", "--dry-run",
                           "--method-args", "fastv.depth=1"]) == 2
    assert "fastv has no argument 'depth' (its arguments: layer, ratio)" in capsys.readouterr().err
    assert run_bench.main(["--model", str(tmp_path / "nope"), "--dry-run"]) == 2
    assert "not a llava-hf checkpoint" in capsys.readouterr().err
    assert run_bench.main(["--model", str(tiny_ckpt), "--tasks", "synth_vq", "--output", str(tmp_path / "x")]) == 2
    assert "did you mean synth_vqa" in capsys.readouterr().err
