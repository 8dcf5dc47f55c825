"""lmms-eval's own CLI with our model class: the README command, learned methods' default controllers, and one-line
errors for bad `--model_args` (lmms-eval itself would print a traceback and exit 0)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lmms_model import ReducedLMM
from benchmarks.tasks import SYNTH_TASKS
from methods import UnknownReducerError

REPO = Path(__file__).resolve().parent.parent
SMOKE_MODEL = "benchmarks/smoke_model/checkpoint"  # relative, as in the README command (cwd is the repo root)
TASKS = SYNTH_TASKS

# each lmms-eval process costs ~10-20 s on CPU (imports, lmms-eval's task index, the model): those tests are slow


def lmms_eval(model_args: str, tmp_path: Path, limit: int, include_path: Path = TASKS) -> list[str]:
    """The command line of one lmms-eval run on synth_vqa, writing only under `tmp_path`."""
    return [sys.executable, "-m", "lmms_eval", "--model", "reduced_vlm", "--model_args", model_args,
            "--tasks", "synth_vqa", "--include_path", str(include_path), "--limit", str(limit),
            "--batch_size", "8", "--output_path", str(tmp_path / "out")]


def env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}  # the datasets cache stays out of ~/.cache


def run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_readme_command_generates_the_task_data(tmp_path):
    data = tmp_path / "cache" / "synthetic" / "test.parquet"  # the task's data, in a cache folder that starts empty
    r = subprocess.run(lmms_eval(f"pretrained={SMOKE_MODEL},method=full", tmp_path, limit=8), cwd=REPO,
                       env={**env(tmp_path), "TOKEN_REDUCTION_BENCH_CACHE": str(tmp_path / "cache")},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert data.is_file()
    assert "exact_match" in r.stdout and "synth_vqa" in r.stdout  # lmms-eval's results table
    (results,) = (tmp_path / "out").rglob("*_results.json")
    throughput = json.loads(results.read_text())["throughput"]  # our means, in lmms-eval's own results JSON
    assert throughput["avg_visual_tokens"] == 144.0 and throughput["avg_prefill_gflops"] > 0
    assert {"avg_kv_cache_mb", "avg_prefill_ms", "avg_reducer_ms", "avg_visual_tokens_layer_mean"} <= set(throughput)


@pytest.mark.slow
def test_learned_method_finds_the_models_controller(tmp_path):
    r = run(lmms_eval(f"pretrained={SMOKE_MODEL},method=adaptive_b,budget=16", tmp_path, limit=4), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "exact_match" in r.stdout


BAD = {  # case -> (model_args after pretrained=..., a phrase of the one-line error)
    "unknown_method": ("method=prumerg", "Did you mean prumerge"),
    "unknown_argument": ("method=fastv,budget=16,layr=1", "unexpected keyword argument 'layr'"),
    "zero_budget": ("method=fastv,budget=0", "budget must be an integer >= 1 or a fraction in (0, 1), got 0"),
    "missing_controller": ("method=adaptive_b,budget=16,checkpoint=/nonexistent", "is not a trained controller"),
    "no_default_controller": ("method=adaptive_b,budget=16", "checkpoint=DIR in --model_args"),
    "missing_pretrained": ("method=full", "pretrained=/nonexistent is not a checkpoint folder (no config.json)"),
    "bad_conversation": ("method=full,conversation=sideways", "conversation must be one of prune-once, re-prune"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every BAD case, run at once (they fail before any data loads, so they are independent); case -> result."""
    tmp = tmp_path_factory.mktemp("bad_model_args")
    bare = tmp / "model_without_controllers"  # the smoke model without its controllers/ folder
    shutil.copytree(REPO / SMOKE_MODEL, bare, ignore=shutil.ignore_patterns("controllers"))
    procs = {}
    for case, (args, _) in BAD.items():
        model = {"no_default_controller": bare, "missing_pretrained": "/nonexistent"}.get(case, SMOKE_MODEL)
        procs[case] = subprocess.Popen(lmms_eval(f"pretrained={model},{args}", tmp / case, limit=4), cwd=REPO,
                                       env=env(tmp / case), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    results = {}
    try:
        for case, p in procs.items():
            out, err = p.communicate(timeout=600)
            results[case] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for p in procs.values():  # a timeout leaves none behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_args_give_one_error_line(bad_runs, case):
    r = bad_runs[case]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: ")
    assert BAD[case][1] in lines[0]
    assert "--method-args" not in lines[0]  # run_bench.py's syntax does not leak into lmms-eval's messages


def test_direct_construction_raises_plain_exceptions_and_finds_the_controller():
    """From Python the class raises (the runner relies on it); the default controller applies there too."""

    with pytest.raises(UnknownReducerError, match="Did you mean prumerge"):
        ReducedLMM(pretrained=str(REPO / SMOKE_MODEL), method="prumerg")
    with pytest.raises(TypeError, match="layr"):
        ReducedLMM(pretrained=str(REPO / SMOKE_MODEL), method="fastv", budget=16, layr=1)
    lm = ReducedLMM(pretrained=str(REPO / SMOKE_MODEL), method="adaptive_b", budget=16)
    assert lm.reducer.checkpoint == str(REPO / SMOKE_MODEL / "controllers" / "adaptive_b" / "seed0")  # lowest seed
