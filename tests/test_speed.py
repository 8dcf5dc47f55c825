"""The speed benchmark: its arguments are checked before any model is built (one line, exit status 2), the sweep
runs end to end on a tiny config, and on a CPU it keeps freed memory for reuse."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.tools.speed import COUNTS, default_plan, main, plan_for
from methods import get_reducer_class, list_reducers


@pytest.mark.parametrize(("argv", "phrase"), [
    (["speedup", "--vision-layers", "0"], "--vision-layers: must be >= 2"),
    (["speedup", "--llm-layers", "1"], "--llm-layers: must be >= 3"),
    (["speedup", "--repeats", "0"], "--repeats: must be >= 1"),
    (["speedup", "--batch-sizes", "0"], "--batch-sizes: must be >= 1"),
    (["speedup", "--budgets", "R=7"], "--budgets R=7: give counts of visual tokens or the plan's labels"),
    (["speedup", "--device", "tpu"], "use cpu, cuda or cuda:N"),
    (["speedup", "--output", "/no/such/folder/rows.json"], "/no/such/folder is not a folder"),
    (["speedup", "--output", "/"], "--output / is a folder; name a JSON file"),
    (["gpu", "--budgets", "R=7"], "--budgets R=7: give counts of visual tokens"),
    (["speedup", "--batch-sizes", "1", "100000"], "GiB of KV cache at batch 100000, before activations, but cpu has"),
    (["overhead", "--samples", "0"], "--samples: must be >= 2"),
    (["overhead", "--samples", "4", "--batch-size", "4"], "give at least two batches"),
    (["nope"], "invalid choice"),
    (["speedup", "--methods", "fastv", "oracle"], "--methods oracle: not in the plan; it times "),
])
def test_bad_arguments_are_one_line(argv, phrase, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err


def test_the_plan_follows_from_the_registry():
    """Every registered method (reference rows aside) at each count and at its own-count setting; nothing listed."""
    plan = default_plan()
    assert plan[0] == ("full", None, {}) and len(plan) == len({(m, str(b)) for m, b, _ in plan})
    for m in list_reducers():
        cls = get_reducer_class(m)
        entries = [(b, kw) for name, b, kw in plan if name == m]
        if cls.reference or not cls.uses_budget:
            assert entries == ([] if cls.reference else [(None, {})]), m
            continue
        labels = [b for b, _ in entries]
        assert labels[: len(COUNTS)] == list(COUNTS), m
        if cls.count_args_example:
            assert labels[-1] == cls.budget_label(cls.count_args_example) and entries[-1][1], m
    assert {b for m, b, _ in plan if m == "fastv"} == {64, 192, "R=0.5"}
    picked = plan_for(argparse.Namespace(methods=["cdpruner", "fastv"], budgets=["64"]))
    assert picked == [("full", None, {}), ("cdpruner", 64, {}), ("fastv", 64, {})]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_the_gpu_check_without_a_gpu_stops_in_one_line(capsys):
    assert main(["gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: this machine has no usable CUDA device" in err, err


def test_sweep_on_a_tiny_config(tmp_path, capsys):
    """The batch sweep end to end on a tiny LLaVA config: a row per entry and batch size with prefill, decode and
    end-to-end medians and spreads, the analytic KV cache, realised / predicted speed-ups (1 for `full`) and
    measured / roofline ratios, written to --output."""
    import json  # noqa: PLC0415

    from flops.analytic import ModelShape, kv_cache_bytes  # noqa: PLC0415
    from tests.conftest import tiny_llava  # noqa: PLC0415

    model = tiny_llava()
    model.config.dtype = "float16"  # as the shipped llava-1.5-7b config says: the sweep builds in --dtype all the same
    model.config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "speed.json"
    assert main(["speedup", "--model-config", str(tmp_path / "config.json"), "--vision-layers", "2", "--llm-layers",
                 "3", "--batch-sizes", "1", "2", "--repeats", "2", "--budgets", "4", "--answer-tokens", "3",
                 "--text-tokens", "12", "--output", str(out), "--allocator", "system"]) == 0  # pytest's own malloc
    printed = capsys.readouterr().out
    assert "batch 2 calibration, the median of 2 rounds: matmul TFLOP/s by rows" in printed
    assert "| `divprune` | 4 |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert {r["batch_size"] for r in rows} == {1, 2}
    assert {r["method"] for r in rows} >= {"full", "fastv", "divprune", "random", "adaptive_b", "dart"}
    shape = ModelShape.from_config(model.config)
    for r in rows:
        assert r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]
        assert r["end_to_end_ms"] > r["prefill_ms"] and r["decode_ms_per_token"] > 0
        assert r["roofline_prefill_ms"] > 0 and r["prefill_measured_over_roofline"] > 0
        assert r["roofline_device"].startswith("this CPU (")  # calibrated here, as on any CPU
        assert r["allocator"] == "the system's, not tuned"
        if r["method"] == "full":
            assert r["prefill_realised_over_predicted"] == r["decode_realised_over_predicted"] == 1
            rec = {"llm_tokens_per_layer": [12 + 16] * 3, "generated_tokens": 3}
            assert r["kv_cache_mb_per_sample"] == kv_cache_bytes(rec, shape, 4) / 2**20
    from plots.speed import main as plot  # noqa: PLC0415 - the figure reads the file alone

    assert plot([str(out)]) == 0 and (tmp_path / "speed.png").stat().st_size > 10_000
    assert plot([str(out), "--budget", "9"]) == 2
    assert "no rows at budget 9; they have 4" in capsys.readouterr().err
    for b in (1, 2):  # one file per batch size, as two runs write them, join into one figure
        (tmp_path / f"b{b}.json").write_text(json.dumps({"machine": "m", "rows": [
            r for r in rows if r["batch_size"] == b]}))
    joined = tmp_path / "joined.png"
    assert plot([str(tmp_path / "b1.json"), str(tmp_path / "b2.json"), "--out", str(joined)]) == 0
    assert joined.stat().st_size > 10_000
    assert plot([str(out), str(tmp_path / "b2.json")]) == 2  # batch 2 twice: speed-ups would mix two runs
    assert "both hold batch 2; give each batch size in one file" in capsys.readouterr().err
    for foreign in ("[1, 2]", '{"rows": 3}', '{"rows": [1]}'):  # JSON, but not a sweep: one line, no traceback
        (tmp_path / "foreign.json").write_text(foreign)
        assert plot([str(tmp_path / "foreign.json")]) == 2
        assert "not a sweep file (no list of rows)" in capsys.readouterr().err


def test_rows_are_kept_as_they_are_measured_and_a_rerun_adds_to_them(tmp_path, capsys, monkeypatch):
    """--output is rewritten after each batch size: an interrupt keeps the finished ones, the same command again
    measures only the missing ones, other settings are refused, and a file that is not the benchmark's is left
    alone."""
    import json  # noqa: PLC0415

    import benchmarks.tools.speed as speed  # noqa: PLC0415
    from tests.conftest import tiny_llava  # noqa: PLC0415

    tiny_llava().config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "speed.json"
    argv = ["speedup", "--model-config", str(tmp_path / "config.json"), "--vision-layers", "2", "--llm-layers", "3",
            "--repeats", "1", "--budgets", "4", "--answer-tokens", "2", "--text-tokens", "12", "--output", str(out),
            "--allocator", "system"]
    timed = speed._time_batch

    def interrupted_at_batch_2(args, runs, entries, inputs, price):
        if inputs[0].size(0) == 2:
            raise KeyboardInterrupt
        return timed(args, runs, entries, inputs, price)

    monkeypatch.setattr(speed, "_time_batch", interrupted_at_batch_2)
    assert main([*argv, "--batch-sizes", "1", "2"]) == 130
    assert "the finished batch sizes are in" in capsys.readouterr().err
    first = json.loads(out.read_text())["rows"]
    assert {r["batch_size"] for r in first} == {1} and first
    monkeypatch.setattr(speed, "_time_batch", timed)
    assert main([*argv, "--batch-sizes", "1", "2"]) == 0
    assert f"batch 1: in {out} already, kept" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["batch_size"] for r in rows} == {1, 2} and rows[: len(first)] == first  # batch 1 not measured again
    other = [("2" if a == "1" and argv[i - 1] == "--repeats" else a) for i, a in enumerate(argv)]
    assert main([*other, "--batch-sizes", "4"]) == 2
    assert "holds rows measured with other settings ({'repeats': 1})" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text('{"my": "notes"}')
    assert main([*argv[:-3], str(tmp_path / "mine.json"), "--allocator", "system"]) == 2
    assert "exists and is not this benchmark's file" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"my": "notes"}'


def test_gpu_check_runs_on_a_tiny_config(tmp_path, capsys):
    """The prepared GPU check, here on the CPU with a tiny config at its full depth: `full` equals HF generate, then
    the sweep at batch 1 and 8 (its default sizes)."""
    import json  # noqa: PLC0415

    from tests.conftest import tiny_llava  # noqa: PLC0415

    tiny_llava().config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "gpu.json"
    assert main(["gpu", "--device", "cpu", "--dtype", "float32", "--model-config", str(tmp_path / "config.json"),
                 "--repeats", "1", "--budgets", "4", "--answer-tokens", "3", "--text-tokens", "12",
                 "--output", str(out), "--allocator", "system"]) == 0  # pytest's own malloc
    printed = capsys.readouterr().out
    assert "full vs HF generate (3 tokens, greedy): identical" in printed and "gpu check done" in printed
    result = json.loads(out.read_text())
    assert result["full_equals_generate"] and {r["batch_size"] for r in result["rows"]} == {1, 8}


def test_gpu_check_runs_on_a_tiny_qwen3_config(tmp_path, capsys):
    """The GPU check on another family (here on the CPU, a tiny Qwen3-VL config at its full depth): `full` equals HF
    generate on a Qwen image (M-RoPE positions, DeepStack), then the sweep."""
    import json  # noqa: PLC0415

    from tests.conftest import tiny_qwen3  # noqa: PLC0415

    tiny_qwen3(seed=3).config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "gpu.json"
    assert main(["gpu", "--device", "cpu", "--dtype", "float32", "--model-config", str(tmp_path / "config.json"),
                 "--repeats", "1", "--budgets", "16", "--methods", "random", "--batch-sizes", "1",
                 "--answer-tokens", "3", "--text-tokens", "12", "--image-size", "128x128", "--output", str(out),
                 "--allocator", "system"]) == 0
    printed = capsys.readouterr().out
    assert "full vs HF generate (3 tokens, greedy): identical" in printed and "gpu check done" in printed
    assert json.loads(out.read_text())["full_equals_generate"]


REUSE = """
import resource
import torch
from benchmarks.tools.speed import reuse_freed_memory

def faults():  # minor page faults of making, filling and freeing a 64 MiB tensor
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

faults()
before = min(faults() for _ in range(3))
note = reuse_freed_memory()
faults()
print(before, min(faults() for _ in range(3)), note)  # the fewest: a small block may split the freed one once
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere the sweep says so")
def test_reuse_freed_memory_stops_large_tensors_being_mapped_fresh():
    """glibc maps a 64 MiB block fresh every time, so each fill faults its 16,384 pages in again; once
    `reuse_freed_memory` has run, the second block is the first one's memory and barely faults (its own process:
    the setting is for good)."""
    before, after, note = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True,
                                         timeout=120, cwd=Path(__file__).parents[1]).stdout.split(maxsplit=2)
    assert int(before) >= 16_000 and int(after) < 1_000, (before, after)
    assert note.strip().startswith("glibc keeps freed memory for reuse (mallopt M_MMAP_MAX 0")


def test_the_sweep_runs_every_entry_in_bfloat16(tmp_path, capsys):
    """--dtype bfloat16 (the GPU check's default) through every plan entry, the learned controllers included."""
    import json  # noqa: PLC0415

    from tests.conftest import tiny_llava  # noqa: PLC0415

    tiny_llava().config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "bf16.json"
    assert main(["speedup", "--model-config", str(tmp_path / "config.json"), "--vision-layers", "2", "--llm-layers",
                 "3", "--dtype", "bfloat16", "--batch-sizes", "1", "--repeats", "1", "--budgets", "4",
                 "--answer-tokens", "2", "--text-tokens", "12", "--output", str(out), "--allocator", "system"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert all("layer-averaged budget" in line for line in skipped), skipped  # a budget's floor, never the dtype
    rows = json.loads(out.read_text())["rows"]
    assert {"adaptive_a", "adaptive_b", "fastv", "divprune", "dart"} <= {r["method"] for r in rows}


def test_sweep_on_a_tiny_qwen3_config(tmp_path, capsys):
    """The batch sweep on a Qwen family (a tiny Qwen3-VL config: its vision depth cut with the DeepStack taps moved
    inside it): the image sized as the processor sizes it, methods that need a CLS token skipped with their reason,
    rows with the FLOPs of the image's tokens."""
    import json  # noqa: PLC0415

    from tests.conftest import tiny_qwen3  # noqa: PLC0415

    tiny_qwen3(seed=1).config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "speed.json"
    assert main(["speedup", "--model-config", str(tmp_path / "config.json"), "--vision-layers", "2", "--llm-layers",
                 "3", "--batch-sizes", "1", "--repeats", "1", "--budgets", "16", "--methods", "random", "fastv",
                 "prumerge", "--answer-tokens", "2", "--text-tokens", "12", "--image-size", "128x128", "--output",
                 str(out), "--allocator", "system"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "a 128 x 128 px image (64 tokens)" in printed and "2 vision / 3 LLM layers" in printed
    assert "prumerge 16: skipped (prumerge does not run on Qwen3-VL" in printed
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", "random", "fastv"} and rows["full"]["budget"] == 64
    assert rows["random"]["prefill_gflops"] < rows["full"]["prefill_gflops"]
    assert rows["full"]["prefill_realised_over_predicted"] == 1
