"""Several processes: `accelerate launch` splits the samples across processes, rank 0 gathers everything and writes
the same results as one process (accuracies, per-sample predictions and token traces, FLOPs).

Two CPU processes talk through gloo. `accelerate launch --cpu --num_processes 2` would start only one process
(accelerate 1.15 sends `--cpu` to its single-process launcher unless given an MPI hostfile), so the processes are
started with `--multi_gpu` (torchrun underneath) and the run stays on the CPU through `--device cpu`. 39 samples
give uneven shards (20 + 19): lmms-eval pads the shorter rank with a copy of its last request.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import run_bench
from benchmarks.defaults import SMOKE_MODEL
from benchmarks.records import MEASURED_COLUMNS
from benchmarks.store import read_samples

pytestmark = pytest.mark.slow  # every test here launches run_bench.py under accelerate
REPO = Path(run_bench.__file__).resolve().parent
ARGS = ["--model", str(SMOKE_MODEL), "--tasks", "synth_vqa", "--methods", "full", "random", "--budgets", "16",
        "--limit", "39", "--batch-size", "8", "--device", "cpu"]
FLOPS_COLUMNS = ["visual_tokens_mean", "visual_tokens_max", "llm_prefill_tokens_mean", "generated_tokens_mean",
                 "prefill_gflops_mean", "llm_prefill_gflops_mean", "reducer_gflops_mean", "total_gflops_mean",
                 "relevant_precision_mean", "relevant_recall_mean"]
TIMES = {"prefill_ms", "decode_ms_per_token", "reducer_ms"}  # measured, so they differ between runs


def accelerate_launch(processes: int, out: Path, tmp: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N run_bench.py ARGS --output OUT`, flags only: HF_HOME points
    to an empty folder so that no accelerate default_config.yaml is read (the datasets cache stays where it is)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf_home"),
           "HF_DATASETS_CACHE": str(datasets.config.HF_DATASETS_CACHE), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "run_bench.py", *ARGS, "--output", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def read(out: Path) -> tuple[dict, list[dict]]:
    rows = {(r["task"], r["method"], r["budget"], r["metric"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    samples = read_samples(out )
    return rows, samples


def test_two_processes_give_the_results_of_one(tmp_path):
    multi, single = tmp_path / "two", tmp_path / "one"
    res = accelerate_launch(2, multi, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert res.stdout.count("plan: 2 cells") == 1  # rank 0 speaks, rank 1 only evaluates
    assert run_bench.main([*ARGS, "--output", str(single)]) == 0

    rows2, samples2 = read(multi)
    rows1, samples1 = read(single)
    assert rows2.keys() == rows1.keys() and len(rows1) == 2 * 6  # 2 cells x 6 metrics
    for key, r1 in rows1.items():
        r2 = rows2[key]
        assert (r2["value"], r2["n"]) == (r1["value"], r1["n"]), key
        assert {c: r2[c] for c in FLOPS_COLUMNS} == {c: r1[c] for c in FLOPS_COLUMNS}, key
        assert r2["device"].endswith("x 2 processes") and "processes" not in r1["device"]
    assert len(samples2) == len(samples1) == 2 * 39
    for s2, s1 in zip(samples2, samples1, strict=True):
        assert s2["visual_tokens"] is not None and s2["prefill_gflops"] is not None  # rank 1's traces reached rank 0
        assert {k: v for k, v in s2.items() if k not in TIMES} == {k: v for k, v in s1.items() if k not in TIMES}
    assert {p.name for p in (multi / "pictures").glob("*.json")} == {f"synth_vqa__{i}.json" for i in range(4)}
    assert len(list((multi / "cells").glob("*.parquet"))) == 2

    # resume: rank 0's files decide for every process (a disagreement would leave one process waiting forever)
    next((multi / "cells").glob("synth_vqa__random__*.parquet")).unlink()
    res = accelerate_launch(2, multi, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert res.stdout.count("1 of 2 cells already") == 1
    assert not (diff := differences_but_measured(read(multi), (rows2, samples2))), diff


def differences_but_measured(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]]) -> list:
    """What differs between two summaries and their samples, up to the measured columns of the recomputed cell:
    [(row key or sample index, column, value in a, value in b)]."""
    measured = MEASURED_COLUMNS
    (rows_a, samples_a), (rows_b, samples_b) = a, b
    out = [(k, None, None, None) for k in set(rows_a) ^ set(rows_b)]
    out += [(k, c, rows_a[k].get(c), rows_b[k].get(c)) for k in set(rows_a) & set(rows_b)
            for c in set(rows_a[k]) | set(rows_b[k]) if c not in measured and rows_a[k].get(c) != rows_b[k].get(c)]
    if len(samples_a) != len(samples_b):
        out.append(("samples", "count", len(samples_a), len(samples_b)))
    out += [(i, c, sa.get(c), sb.get(c)) for i, (sa, sb) in enumerate(zip(samples_a, samples_b, strict=False))
            for c in set(sa) | set(sb) if c not in TIMES and sa.get(c) != sb.get(c)]
    return out[:10]
