"""The runner end to end on a tiny random checkpoint and the synthetic task: files, schema, resume, batching."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from tqdm import tqdm

import run_bench
from benchmarks import runner
from benchmarks.defaults import SMOKE_MODEL
from benchmarks.distributed import current_world
from benchmarks.plan import Cell, RunSpec, fingerprint, make_reducer
from benchmarks.store import SUMMARY_COLUMNS, OutputBusyError, ResultStore, read_samples
from benchmarks.tools import export


def read(out):
    rows = list(csv.DictReader(open(out / "summary.csv")))
    samples = read_samples(out)
    return rows, samples


def test_sweep_writes_rows_and_samples_and_resumes(tiny_ckpt, tmp_path, capsys, monkeypatch):
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
    bars = []  # the sweep's progress bar: drawn on a terminal only when there is a cell to compute
    monkeypatch.setattr(runner, "tqdm", lambda **kw: bars.append(kw) or tqdm(**{**kw, "disable": True}))
    assert run_bench.main(argv) == 0  # same command again: nothing to compute
    assert "1 of 1 cells already" in capsys.readouterr().out
    assert [kw["total"] for kw in bars] == [0] and bars[0]["disable"] is True
    assert (out / "summary.csv").read_text() == before


def test_predictions_do_not_depend_on_batch_size(tiny_ckpt, tmp_path):
    preds = []
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        run_bench.main(["--model", str(tiny_ckpt), "--methods", "full", "--limit", "8", "--output", str(out),
                        "--batch-size", str(bs)])
        preds.append({s["doc_id"]: s["prediction"] for s in read(out)[1]})
    assert preds[0] == preds[1]


def test_default_set_skips_only_the_cells_a_method_cannot_run(tiny_ckpt, capsys):
    """PyramidDrop with one stage before layer 1 of 2 keeps all 144 tokens in layer 0: a layer mean below 72.5 cannot
    be met. Budget 2 is skipped with its reason, budget 100 runs."""
    assert run_bench.main(["--model", str(tiny_ckpt), "--budgets", "2", "100", "--dry-run",
                           "--method-args", "pdrop.layers=(1,)"]) == 0
    out = capsys.readouterr().out
    assert "pdrop at budget 2 skipped: pdrop: layer-averaged budgets below 72.5 visual tokens cannot be met" in out
    assert max(map(len, out.splitlines())) <= 120  # the plan and its notes wrap at 120 columns
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("synth_vqa  pdrop")] == [
        ["synth_vqa", "pdrop", "100"]]


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
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert run_bench.main(["--model", str(tiny_ckpt), "--tasks", "synth_vq", "--output", str(tmp_path / "x")]) == 2
    assert "did you mean synth_vqa" in capsys.readouterr().err


def test_a_learned_method_runs_once_per_trained_controller(tmp_path):
    """One cell per training seed found in MODEL/controllers/<method>/seed<N>; each cell's reducer loads its own
    controller; cells of different seeds have different names (files) and fingerprints; an explicit checkpoint
    means one cell."""
    model = tmp_path / "model"
    for seed in (0, 3):
        shutil.copytree(SMOKE_MODEL / "controllers" / "adaptive_b" / "seed0",
                        model / "controllers" / "adaptive_b" / f"seed{seed}")
    (model / "controllers" / "adaptive_b" / "seed7").mkdir()  # no controller.json: not a trained controller
    spec = RunSpec(model=model, methods=("adaptive_b", "random"), budgets=(16,))
    cells, _ = spec.cells(144)
    assert [(c.method, c.seed) for c in cells] == [("adaptive_b", 0), ("adaptive_b", 3), ("random", None)]
    assert len({c.name for c in cells}) == 3 and cells[1].name == "synth_vqa__adaptive_b__16__seed3"
    reducers = [make_reducer(c, spec) for c in cells]
    assert reducers[1].checkpoint == str(model / "controllers" / "adaptive_b" / "seed3")
    fps = {fingerprint("run", {"method": c.method, **r.method_args}, "task")
           for c, r in zip(cells, reducers, strict=True)}
    assert len(fps) == 3
    given = RunSpec(model=model, methods=("adaptive_b",), budgets=(16,),
                    method_kwargs=(("adaptive_b", "checkpoint", str(model / "controllers" / "adaptive_b" / "seed0")),))
    assert [c.seed for c in given.cells(144)[0]] == [None]


def test_store_rebuild_reads_each_cell_once_and_sees_changed_files(tmp_path, monkeypatch, capsys):
    """Rebuilding after every cell parses only new or changed cell files; a cell rewritten in place is seen."""
    store = ResultStore(tmp_path / "out")
    store.prepare()
    parsed = []
    real_parse = store._parse
    monkeypatch.setattr(store, "_parse", lambda f: parsed.append(f.name) or real_parse(f))
    row = {"task": "t", "method": "full", "budget": 4, "metric": "exact_match", "value": 0.5}
    for i, method in enumerate(["full", "random", "fastv"]):
        store.save(Cell("t", method, 4), f"fp{i}", tmp_path, {}, [{**row, "method": method}],
                   [{"task": "t", "method": method, "budget": 4, "doc_id": 0, "correct": 1.0}])
        store.rebuild()
    assert sorted(parsed) == sorted(f"t__{m}__4__fp{i}.parquet" for i, m in enumerate(["full", "random", "fastv"]))
    store.save(Cell("t", "random", 4), "fp1", tmp_path, {}, [{**row, "method": "random", "value": 0.25}],
               [{"task": "t", "method": "random", "budget": 4, "doc_id": 0, "correct": 0.0}])
    rows, _ = store.rebuild()
    assert sorted(float(r["value"]) for r in rows) == [0.25, 0.5, 0.5]
    lines = read_samples(tmp_path / "out")
    assert sorted((s["method"], s["correct"]) for s in lines) == [("fastv", 1.0), ("full", 1.0), ("random", 0.0)]
    store.release()
    assert export.main([str(tmp_path / "out"), "--samples-jsonl"]) == 0  # the file earlier versions kept, on demand
    with open(tmp_path / "out" / "samples.jsonl") as f:
        assert [json.loads(line) for line in f] == lines
    (tmp_path / "out" / "cells" / "t__x__4__fp9.parquet").write_bytes(b"junk")  # a cell file that is none
    assert export.main([str(tmp_path / "out"), "--samples-jsonl", str(tmp_path / "again.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t__x__4__fp9.parquet is not a readable cell file" in err
    assert not (tmp_path / "again.jsonl").exists() and not list(tmp_path.glob(".again*"))


def test_cell_files_of_earlier_versions_are_converted_once_and_kept(tmp_path):
    """A folder of an earlier version (JSON cell files, in cells/ and cells/superseded/, and samples.jsonl; FLOPs in
    summary TFLOPs and samples' GMACs; no `budget_tokens`): converted to Parquet cells once, with a note, reading in
    GFLOPs with every current column; the originals kept in cells/converted/; a JSON file that is no cell set aside."""
    out = tmp_path / "out"
    (out / "cells" / "superseded").mkdir(parents=True)
    row = {"task": "t", "method": "fastv", "budget": 16, "metric": "exact_match", "value": 0.5,
           "prefill_tflops_mean": 0.000125, "total_tflops_mean": 0.0003, "follow_up_tflops_mean": None}
    sample = {"task": "t", "method": "fastv", "budget": 16, "doc_id": 0, "correct": 1.0, "prefill_gmacs": 0.0625,
              "follow_up_prefill_gmacs": 0.01, "reducer_macs": 5, "reducer_gmacs": 5e-9, "prediction": ["a", "b"],
              "kept_indices": [3, 1]}
    old = {"cell": "t__fastv__16", "fingerprint": "fp0", "model": str(SMOKE_MODEL.resolve()),
           "conditions": {"run": "run"}, "rows": [row], "samples": [sample]}
    (out / "cells" / "t__fastv__16__fp0.json").write_text(json.dumps(old))
    (out / "cells" / "superseded" / "t__fastv__16__fp1.json").write_text(json.dumps({**old, "fingerprint": "fp1"}))
    (out / "cells" / "t__full__16__fp2.json").write_text("{not json")
    (out / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    store = ResultStore(out)
    with store.session(current_world("cpu"), SMOKE_MODEL, "run", {}) as notes:
        rows, _ = store.rebuild()
    assert any("converted 2 cell files of an earlier version to Parquet" in n for n in notes), notes
    assert any("t__full__16__fp2.json is not a readable cell file" in n for n in notes), notes
    assert (rows[0]["prefill_gflops_mean"], rows[0]["total_gflops_mean"], rows[0]["budget_tokens"]) == (0.125, 0.3, 16)
    assert rows[0]["follow_up_gflops_mean"] is None and not any("tflops" in k for k in rows[0])
    (record,) = read_samples(out)
    assert record == {**{k: v for k, v in sample.items() if "macs" not in k}, "prefill_gflops": 0.125,
                      "follow_up_prefill_gflops": 0.02, "reducer_gflops": 0.0}
    with open(out / "summary.csv") as f:
        assert float(next(csv.DictReader(f))["prefill_gflops_mean"]) == 0.125
    assert json.loads((out / "cells" / "converted" / "t__fastv__16__fp0.json").read_text()) == old  # kept as it was
    assert (out / "cells" / "converted" / "superseded" / "t__fastv__16__fp1.json").is_file()
    assert (out / "cells" / "superseded" / "t__fastv__16__fp1.parquet").is_file()
    assert (out / "cells" / "converted" / "samples.jsonl").is_file() and not (out / "samples.jsonl").exists()
    assert (out / "cells" / "set_aside" / "t__full__16__fp2.json").is_file()
    with store.session(current_world("cpu"), SMOKE_MODEL, "run", {}) as notes:  # once
        assert notes == []


def test_the_store_session_holds_the_folder_for_one_block(tmp_path):
    """`ResultStore.session`: the folder is created and locked inside the block, released after it, and a block that
    fails before any cell finished leaves nothing behind; a cell of another run's conditions is moved aside, said."""
    world = current_world("cpu")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), ResultStore(out).session(world, SMOKE_MODEL, "run", {"t": "a"}) as notes:
        assert notes == [] and (out / ".lock").is_file()
        with pytest.raises(OutputBusyError):
            ResultStore(out).check_writable()  # held
        raise KeyboardInterrupt
    assert not out.exists()  # nothing finished: nothing left
    store = ResultStore(out)
    with store.session(world, SMOKE_MODEL, "run", {"t": "a"}):
        store.save(Cell("t", "full", 4), "fp", SMOKE_MODEL, {"run": "run", "task": "a"},
                   [{"task": "t", "method": "full", "budget": 4, "metric": "exact_match", "value": 1.0}], [])
    ResultStore(out).check_writable()  # released
    with ResultStore(out).session(world, SMOKE_MODEL, "run", {"t": "b"}) as notes:  # the task's files changed
        assert len(notes) == 1 and notes[0].startswith("1 cells in ") and "moved to cells/superseded/" in notes[0]
    assert (out / "cells" / "superseded" / "t__full__4__fp.parquet").is_file()
