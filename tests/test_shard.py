"""A sweep split across machines (`--shard I/N`): disjoint parts balanced by planned cost, whose union is the whole
run, sharing one output folder under a shared lock."""

from __future__ import annotations

import csv
import shutil

import pytest

import run_bench
from benchmarks.distributed import current_world
from benchmarks.plan import RunSpec, make_plan, plan_costs
from benchmarks.records import MEASURED_COLUMNS
from benchmarks.store import OutputBusyError, ResultStore, read_samples, read_summary
from plots.data import load

SWEEP = ["--methods", "full", "random", "fastv", "divprune", "--budgets", "16", "36", "--tasks", "synth_vqa",
         "synth_scenes", "--limit", "12", "--batch-size", "6"]


def unmeasured(out) -> tuple[list, list]:
    """The folder's summary rows and sample records, sorted, without what a run measures of the machine."""
    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in MEASURED_COLUMNS | {"git_sha"}}

    rows = sorted((strip(r) for r in csv.DictReader(open(out / "summary.csv"))), key=lambda r: sorted(r.items()))
    samples = sorted((strip(s) for s in read_samples(out)), key=lambda s: (s["cell_id"], s["doc_id"]))
    return rows, samples


def test_parts_are_disjoint_balanced_and_together_the_plan():
    spec = dict(methods=("full", "random", "fastv", "divprune", "dart"), budgets=(16, 36, 48),
                tasks=("synth_vqa", "synth_scenes"))
    whole = make_plan(RunSpec(**spec))
    parts = [make_plan(RunSpec(**spec, shard=(i, 3))) for i in (1, 2, 3)]
    names = [[c.name for c in p.cells] for p in parts]
    assert sorted(sum(names, [])) == sorted(c.name for c in whole.cells)  # disjoint, and together the whole plan
    assert [[c.name for c in make_plan(RunSpec(**spec, shard=(i, 3))).cells] for i in (1, 2, 3)] == names  # stable
    cost = {(c["task"], c["method"], str(c["budget"])): c["gflops_per_sample"] * c["samples"]
            for c in plan_costs(whole, RunSpec(**spec), 64)}
    loads = [sum(cost[c.task, c.method, str(c.budget)] for c in p.cells) for p in parts]
    assert max(loads) - min(loads) <= max(cost.values())  # greedy by cost: within one cell of each other
    for i, p in enumerate(parts, 1):
        assert f"shard {i}/3: {len(p.cells)} of the plan's {len(whole.cells)} cells" in p.notes[-1]
        assert [r.method_args for r in p.reducers] == [r.method_args for c, r in zip(whole.cells, whole.reducers,
                                                                                     strict=True) if c in p.cells]
    with pytest.raises(ValueError, match="part 3 gets no cell, the plan has 2"):
        make_plan(RunSpec(methods=("full",), tasks=("synth_vqa", "synth_scenes"), shard=(3, 3)))


@pytest.mark.parametrize(("shard", "message"), [("0/3", "write I/N with 1 <= I <= N"), ("4/3", "1 <= I <= N"),
                                                ("2", "write I/N"), ("a/b", "write I/N")])
def test_a_bad_shard_is_one_line(shard, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_bench.main(["--shard", shard, "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_parts_share_the_folder_and_a_whole_run_excludes_them(tmp_path):
    out = tmp_path / "out"
    first, second = ResultStore(out, shared=True), ResultStore(out, shared=True)
    first.prepare()
    second.prepare()  # a second part: welcome
    with pytest.raises(OutputBusyError, match="in use by another run_bench.py .*a part of a sharded sweep, pid"):
        ResultStore(out).check_writable()  # a whole run: refused while a part writes
    first.release()
    second.release()
    whole = ResultStore(out)
    whole.prepare()
    with pytest.raises(OutputBusyError, match="in use by a run of the whole sweep"):
        ResultStore(out, shared=True).prepare()
    whole.release()
    with ResultStore(out, shared=True).session(current_world("cpu"), tmp_path, "run", {}):
        pass
    assert (out / ".lock").is_file()  # a part that finished no cell leaves the others' lock file alone


@pytest.mark.slow
def test_three_parts_in_one_folder_equal_the_whole_run(tmp_path, capsys):
    """The smoke model: the union of 3 parts, run one after another into one folder, has the whole run's cells with
    identical values and predictions; the whole command afterwards computes nothing and builds the comparisons."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_bench.main([*SWEEP, "--output", str(whole)]) == 0
    for i in (1, 2, 3):
        assert run_bench.main([*SWEEP, "--output", str(parts), "--shard", f"{i}/3"]) == 0
        out = capsys.readouterr().out
        assert f"shard {i}/3 done" in " ".join(out.split()) and not (parts / "comparisons.csv").exists()
    assert unmeasured(parts) == unmeasured(whole)
    assert run_bench.main([*SWEEP, "--output", str(parts)]) == 0
    assert "14 of 14 cells already in" in capsys.readouterr().out
    assert (parts / "comparisons.csv").read_text() == (whole / "comparisons.csv").read_text()
    stored = list(csv.DictReader(open(parts / "summary.csv")))  # the package's reader gives summary.csv's rows
    assert sorted((r["cell_id"], r["metric"]) for r in read_summary(parts)) == sorted(
        (r["cell_id"], r["metric"]) for r in stored)
    copied = tmp_path / "copied" / "cells"  # parts in separate folders: their cell files copied together
    copied.mkdir(parents=True)
    for f in (parts / "cells").glob("*.parquet"):
        shutil.copy(f, copied)
    drawn = load([copied.parent]).summary  # python -m plots rebuilds the rows from the cell files' metadata
    assert len(drawn) == len(load([parts]).summary) and set(drawn["method"]) == {"full", "random", "fastv", "divprune"}
