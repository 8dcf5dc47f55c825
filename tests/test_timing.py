"""Timings a user can trust (issue 39): each timing's spread over a cell's batches, how busy the machine was, cells
whose timings are not to be trusted marked in the console and the figures, and `--retime`, which measures stored
cells again and keeps the new timings only when every prediction is the stored one."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest

import run_bench
from benchmarks.console import results_table
from benchmarks.records import cell_times, machine_load
from benchmarks.store import cell_meta, cell_samples, samples_table


def batches(*prefill_ms: float) -> list[dict]:
    return [{"prefill_ms": p, "decode_ms_per_token": 1.0, "reducer_ms": 0.1} for p in prefill_ms]


def test_each_timing_has_its_spread_and_the_warm_up_batch_is_left_out():
    t = cell_times(batches(500.0, 10.0, 11.0, 12.0, 13.0))
    assert t["prefill_ms_median"] == 11.5 and t["timed_batches"] == 4
    assert t["prefill_ms_iqr"] == pytest.approx(1.5)  # quartiles 10.75 and 12.25 (inclusive method)
    assert t["decode_ms_per_token_iqr"] == 0.0 and t["timing_reliable"]
    assert cell_times(batches(5.0))["prefill_ms_iqr"] == 0.0  # one batch: no spread to measure


@pytest.mark.parametrize(("prefill", "load", "reliable"), [
    ((9.0, 10.0, 10.0, 11.0, 10.0), {"machine_load_other": 0.0, "cpu_cores": 2}, True),
    ((9.0, 10.0, 30.0, 10.0, 30.0), {"machine_load_other": 0.0, "cpu_cores": 2}, False),  # spread 20 of median 10
    ((9.0, 10.0, 10.0, 11.0, 10.0), {"machine_load_other": 1.0, "cpu_cores": 2}, False),  # another busy thread
    ((9.0, 10.0, 10.0, 11.0, 10.0), {"machine_load_other": 0.4, "cpu_cores": 2}, True),
])
def test_a_timing_is_not_trusted_when_it_spreads_or_the_machine_is_busy(prefill, load, reliable):
    t = cell_times(batches(*prefill), load)
    assert t["timing_reliable"] is reliable and t["machine_load_other"] == load["machine_load_other"]


def test_machine_load_subtracts_this_process_own_cpu_use():
    assert machine_load(10.0, 20.0, 2.3)["machine_load_other"] == pytest.approx(0.3)  # two cores of ours, 0.3 other
    assert machine_load(10.0, 20.0, 1.0)["machine_load_other"] == 0.0  # the average lags: never below 0
    assert machine_load(10.0, 5.0, None)["machine_load_other"] is None  # no load average on this OS


def test_the_console_marks_timings_not_to_be_trusted():
    row = {"task": "t", "method": "m", "budget": "4", "metric": "exact_match", "value": 0.5, "primary": "True",
           "prefill_ms_median": 12.0, "timing_reliable": "False", "visual_tokens_mean": 4}
    text = results_table([row, {**row, "method": "n", "timing_reliable": "True"}])
    assert "12?" in text and "?: timing not to be trusted (1 cells" in text and "--retime" in text


@pytest.mark.slow
def test_retime_keeps_the_results_and_refuses_changed_predictions(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_ckpt), "--methods", "full", "--limit", "4", "--batch-size", "2", "--output", str(out)]
    assert run_bench.main(argv) == 0
    first = list(csv.DictReader(open(out / "summary.csv")))
    capsys.readouterr()
    assert run_bench.main([*argv, "--retime"]) == 0  # measured again: values kept, timings new
    assert "[1/1]" in capsys.readouterr().out
    again = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["value"] for r in again] == [r["value"] for r in first]
    assert all(r["prefill_ms_iqr"] != "" and r["cpu_cores"] != "" and r["timing_reliable"] in ("True", "False")
               for r in again)
    (cell,) = (out / "cells").glob("*.parquet")
    samples = cell_samples(cell)
    samples[0]["prediction"] = "something else"
    pq.write_table(samples_table(samples, cell_meta(cell)), cell)
    assert run_bench.main([*argv, "--retime"]) == 2
    err = capsys.readouterr().err
    assert "--retime" in err and "answers 1 of 4 questions differently" in err and "--force" in err
