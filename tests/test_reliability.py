"""Reliability: bad input fails in one line and touches nothing, a killed sweep loses nothing, reruns are identical,
and two sweeps never write one directory at once."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

import run_bench
from benchmarks.defaults import QWEN_SMOKE_MODEL, SMOKE_MODEL
from benchmarks.records import MEASURED_COLUMNS
from benchmarks.store import cell_samples, read_samples
from benchmarks.tasks import SYNTH_TASKS
from benchmarks.tasks.synthetic.generate import write_split
from methods import create_reducer
from methods._llm import NonFiniteError
from methods.adaptive import ControllerConfig

pytestmark = pytest.mark.slow  # sweeps end to end, interrupted, corrupted and rerun

REPO = Path(run_bench.__file__).resolve().parent
MEASURED = MEASURED_COLUMNS | {"git_sha"}


def unmeasured(out: Path) -> tuple[list[dict], list[dict]]:
    """summary.csv rows and samples.jsonl records without the measured (timing, time stamp) columns."""
    rows = [{k: v for k, v in r.items() if k not in MEASURED} for r in csv.DictReader(open(out / "summary.csv"))]
    samples = [{k: v for k, v in s.items() if k not in MEASURED} for s in read_samples(out)]
    return rows, samples


def bench(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "run_bench.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def bad_cases(tiny: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra arguments, a phrase the one-line error must contain)."""
    not_llava = tmp / "not_llava"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"model_type": "llama"}))
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    for f in tiny.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    nan_weight = tmp / "nan_weight"  # one NaN in LLM layer 1's MLP: every later number is NaN
    nan_weight.mkdir()
    for f in tiny.iterdir():
        (nan_weight / f.name).write_bytes(f.read_bytes())
    weights = load_file(tiny / "model.safetensors")
    name = next(k for k in weights if "layers.1.mlp.down_proj.weight" in k and "vision" not in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, nan_weight / "model.safetensors", metadata={"format": "pt"})
    qwen_over_llava = tmp / "qwen_over_llava"  # the Qwen2.5-VL smoke model's config and processor, LLaVA weights
    qwen_over_llava.mkdir()
    for f in QWEN_SMOKE_MODEL.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (qwen_over_llava / f.name).write_bytes(f.read_bytes())
    (qwen_over_llava / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    truncated = tmp / "truncated"  # LLM layer 1's MLP missing from the weights
    truncated.mkdir()
    for f in tiny.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in weights.items() if "layers.1.mlp" not in k or "vision" in k},
              truncated / "model.safetensors", metadata={"format": "pt"})
    other = tmp / "ctrl_a"

    create_reducer("adaptive_a", 4, config=ControllerConfig("adaptive_a", dim=32, num_patches=144)).save(other)
    wrong_grid = tmp / "ctrl_b"
    create_reducer("adaptive_b", 4, config=ControllerConfig("adaptive_b", dim=8, num_patches=16)).save(wrong_grid)
    blocker = tmp / "a_file"
    blocker.write_text("")
    noproc = tmp / "noproc"
    noproc.mkdir()
    for f in tiny.iterdir():
        if "token" not in f.name and "processor" not in f.name and f.suffix != ".jinja":
            (noproc / f.name).write_bytes(f.read_bytes())
    bad_yaml = tmp / "bad_yaml"
    bad_yaml.mkdir()
    (bad_yaml / "broken.yaml").write_text("task: broken\n  dataset_path: [unclosed\n")
    no_function = my_task(tmp / "nofunc", seed=1)
    (no_function / "my_vqa.yaml").write_text((no_function / "my_vqa.yaml").read_text().replace(
        "utils.doc_to_text", "utils.no_such_function"))
    my_task(tmp / "corrupt", seed=1)
    my_task(tmp / "empty", seed=1)
    (tmp / "empty" / "mydata" / "test.parquet").write_bytes(b"")

    my_task(tmp / "corrupt0", seed=1)
    for folder, doc in (("corrupt", 1), ("corrupt0", 0)):  # doc 0: lmms-eval decodes it itself; doc 1: the runner
        data = tmp / folder / "mydata" / "test.parquet"
        table = pq.read_table(data).to_pylist()
        table[doc]["image"] = {**table[doc]["image"], "bytes": b"not an image"}
        pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(data)), data)
    return {
        "unknown method": (["--methods", "prumerg"], "Did you mean prumerge"),
        "unknown task": (["--tasks", "synth_vq"], "did you mean synth_vqa"),
        "zero budget": (["--budgets", "0"], "must be >= 1"),
        "negative budget": (["--budgets", "-3"], "must be >= 1"),
        "count spelt as a float": (["--budgets", "1e3"], "a count of visual tokens is a whole number (1000)"),
        "budget not a number": (["--budgets", "many"], "is not a number of visual tokens, a fraction or"),
        "model path missing": (["--model", str(tmp / "nope")], "not a checkpoint folder"),
        "not llava-hf": (["--model", str(not_llava)], "'llama' checkpoint"),
        "corrupt weights": (["--model", str(corrupt), "--methods", "full"], "weights cannot be loaded"),
        "NaN in a weight": (["--model", str(nan_weight), "--methods", "full"], "LLM layer 1's output holds NaN"),
        "config of another family": (["--model", str(qwen_over_llava), "--methods", "full"],
                                     "describes a 'qwen2_5_vl' model but its weights look like a LLaVA (llava-hf)"),
        "weights missing": (["--model", str(truncated), "--methods", "full"],
                            "its weights are incomplete: 3 of the model's parameters are not in the weights"),
        "controller missing": (["--methods", "adaptive_b", "--method-args",
                                f"adaptive_b.checkpoint={tmp / 'none'}"], "not a trained controller folder"),
        "controller of another method": (["--methods", "adaptive_b", "--method-args",
                                          f"adaptive_b.checkpoint={other}"], "holds a adaptive_a controller"),
        "controller for another model": (["--methods", "adaptive_b", "--budgets", "4", "--method-args",
                                          f"adaptive_b.checkpoint={wrong_grid}"], "trained for 16 patches"),
        "output not writable": (["--methods", "full", "--output", str(blocker / "sub")], "cannot write to output"),
        "limit 0": (["--limit", "0"], "--limit: must be >= 1"),
        "flag given twice": (["--budgets", "4", "--budgets", "8"], "--budgets given twice; give it once"),
        "flag given twice, abbreviated": (["--lim", "3"], "--limit given twice"),  # after the test's own --limit 2
        "empty path": (["--include-path", ""], "argument --include-path: an empty path"),
        "empty method argument": (["--methods", "adaptive_b", "--method-args", "adaptive_b.checkpoint="],
                                  "'adaptive_b.checkpoint=': an empty value"),
        "tasks with a comma": (["--tasks", "synth_vqa,gqa"], "separate task names with spaces"),
        "method argument out of range": (["--methods", "fastv", "--budgets", "4", "--method-args", "fastv.layer=9"],
                                         "LLM layer 9 must be in [1, 1] for this 2-layer"),
        "unknown method argument": (["--methods", "fastv", "--method-args", "fastv.layr=1"],
                                    "fastv has no argument 'layr'"),
        "method argument of the wrong type": (["--methods", "fastv", "--budgets", "4", "--method-args",
                                               "fastv.layer=1.5"], "fastv.layer=1.5: must be a whole number"),
        "budget too small for the method": (["--methods", "prumerge", "--budgets", "1"], "give a budget >= 2"),
        "device this machine lacks": (["--methods", "full", "--device", "cuda:99"], "--device cuda:99"),
        "device name": (["--methods", "full", "--device", "gpu"], "use cpu, cuda or cuda:N"),
        "checkpoint without its processor": (["--model", str(noproc), "--methods", "full"],
                                             "has no processor_config.json or preprocessor_config.json"),
        "malformed task YAML": (["--methods", "full", "--include-path", str(bad_yaml)], "a task YAML cannot be read"),
        "task naming a missing function": (["--methods", "full", "--tasks", "my_vqa", "--include-path",
                                            str(no_function)], "my_vqa: lmms-eval cannot evaluate this task"),
        "corrupt image in a task": (["--methods", "full", "--tasks", "my_vqa", "--include-path",
                                     str(tmp / "corrupt" / "tasks")],
                                    "my_vqa doc 1: its image cannot be read (UnidentifiedImageError"),
        "empty data file": (["--methods", "full", "--tasks", "my_vqa", "--include-path", str(tmp / "empty" / "tasks")],
                            f"my_vqa: its data file {(tmp / 'empty' / 'mydata' / 'test.parquet').resolve()} is empty"),
        "corrupt image names its file": (["--methods", "full", "--tasks", "my_vqa", "--include-path",
                                          str(tmp / "corrupt" / "tasks")],
                                         f"in {(tmp / 'corrupt' / 'mydata' / 'test.parquet').resolve()}; fix"),
        "corrupt first image": (["--methods", "full", "--tasks", "my_vqa", "--include-path",
                                 str(tmp / "corrupt0" / "tasks")],
                                "my_vqa doc 0: its image cannot be read (UnidentifiedImageError: cannot identify "
                                "image file"),
        "corrupt first image names its row": (["--methods", "full", "--tasks", "my_vqa", "--include-path",
                                               str(tmp / "corrupt0" / "tasks")],
                                              f"row 0 of {(tmp / 'corrupt0' / 'mydata' / 'test.parquet').resolve()}"),
    }


BAD = ["unknown method", "unknown task", "zero budget", "negative budget", "count spelt as a float",
       "budget not a number", "model path missing", "not llava-hf", "corrupt weights", "NaN in a weight",
       "config of another family", "weights missing",
       "controller missing", "controller of another method",
       "controller for another model", "output not writable", "limit 0", "flag given twice",
       "flag given twice, abbreviated", "empty path", "empty method argument", "tasks with a comma",
       "method argument out of range", "unknown method argument", "method argument of the wrong type",
       "budget too small for the method", "device this machine lacks", "device name",
       "checkpoint without its processor", "malformed task YAML", "task naming a missing function",
       "corrupt image in a task", "corrupt image names its file", "empty data file",
       "corrupt first image", "corrupt first image names its row"]


@pytest.fixture(scope="module")
def cases(tiny_ckpt, tmp_path_factory):
    return bad_cases(tiny_ckpt, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gets_one_line_and_leaves_results_untouched(tiny_ckpt, cases, tmp_path, capsys, name):
    out = tmp_path / "results"
    (out / "cells").mkdir(parents=True)  # a results folder of an earlier run
    (out / "summary.csv").write_text("task,method\nkept,untouched\n")

    def snapshot() -> dict:
        return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}

    before = snapshot()
    extra, phrase = cases[name]
    base = {"--model": str(tiny_ckpt), "--limit": "2", "--output": str(out)}
    argv = [*(x for k, v in base.items() if k not in extra for x in (k, v)), *extra]  # a case's own flags win
    try:
        code = run_bench.main(argv)
    except SystemExit as e:  # argparse's own checks (our parser prints one line)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert phrase in err, err
    assert snapshot() == before  # nothing created, changed or removed


@pytest.mark.parametrize("name", ["unknown task", "tasks with a comma", "method argument out of range",
                                  "controller for another model"])
def test_a_dry_run_rejects_what_a_run_rejects(tiny_ckpt, cases, capsys, name):
    extra, phrase = cases[name]
    assert run_bench.main(["--model", str(tiny_ckpt), "--dry-run", *extra]) == 2
    assert phrase in capsys.readouterr().err


def test_an_empty_controllers_folder_is_named_in_the_plan(tiny_ckpt, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_ckpt.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "controllers" / "adaptive_b" / "seed0").mkdir(parents=True)  # made, never trained into
    assert run_bench.main(["--model", str(model), "--dry-run"]) == 0  # the default methods: a note, not an error
    out = " ".join(capsys.readouterr().out.split())  # the notes wrap at 120 columns
    assert f"adaptive_b skipped: no trained controller in {model / 'controllers' / 'adaptive_b'}" in out


def test_duplicate_budgets_are_a_note_not_an_error(tiny_ckpt, capsys):
    assert run_bench.main(["--model", str(tiny_ckpt), "--budgets", "8", "8", "4", "--dry-run"]) == 0
    assert "budget 8 given more than once: each runs once" in capsys.readouterr().out


@pytest.mark.slow
def test_a_traceback_only_with_debug(tiny_ckpt):
    quiet = bench("--model", str(tiny_ckpt), "--methods", "prumerg")
    assert quiet.wait(120) == 2 and "Traceback" not in quiet.stderr.read()
    loud = bench("--model", str(tiny_ckpt), "--methods", "prumerg", "--debug")
    assert loud.wait(120) != 0 and "Traceback" in loud.stderr.read()


SWEEP = ["--methods", "full", "random", "prumerge", "--budgets", "4", "8", "12", "--limit", "20", "--batch-size", "4"]


@pytest.mark.slow
def test_sigkill_mid_sweep_loses_no_finished_cell_and_the_rerun_completes_it(tiny_ckpt, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["--model", str(tiny_ckpt), *SWEEP]
    proc = bench(*args, "--output", str(killed))
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed / "cells").glob("*.parquet"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    cells = list((killed / "cells").glob("*.parquet"))
    assert 2 <= len(cells) < 7, "the kill must land mid-sweep"
    for f in cells:
        cell_samples(f)  # every finished cell is whole
    rows = list(csv.DictReader(open(killed / "summary.csv")))
    assert {r["method"] + r["budget"] for r in rows} <= {c.name.split("__")[1] + c.name.split("__")[2] for c in cells}

    rerun = bench(*args, "--output", str(killed))
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-2000:]
    assert f"{len(cells)} of 7 cells already" in stdout
    assert run_bench.main([*args, "--output", str(clean)]) == 0
    assert unmeasured(killed) == unmeasured(clean)


def test_same_command_same_numbers_and_the_seed_changes_only_what_is_random(tiny_ckpt, tmp_path):
    args = ["--model", str(tiny_ckpt), "--methods", "full", "random", "--budgets", "6", "--limit", "12"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert run_bench.main([*args, "--seed", seed, "--output", str(tmp_path / name)]) == 0
    a, b, c = (unmeasured(tmp_path / n) for n in "abc")
    assert a == b  # summary values and predictions identical
    by = {n: {(s["method"], s["doc_id"]): s for s in x[1]} for n, x in (("a", a), ("c", c))}
    full_a = [s for k, s in by["a"].items() if k[0] == "full"]
    assert all(by["c"][("full", s["doc_id"])]["prediction"] == s["prediction"] for s in full_a)
    kept_a = [s["kept_indices"] for k, s in sorted(by["a"].items()) if k[0] == "random"]
    kept_c = [s["kept_indices"] for k, s in sorted(by["c"].items()) if k[0] == "random"]
    assert kept_a != kept_c  # the random method draws other patches


@pytest.mark.slow
def test_a_second_sweep_into_the_same_directory_refuses(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "shared"
    first = bench("--model", str(tiny_ckpt), *SWEEP, "--output", str(out))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".lock").is_file():
        time.sleep(0.02)
    time.sleep(0.5)
    assert first.poll() is None, "the first sweep ended before the second could start"
    assert run_bench.main(["--model", str(tiny_ckpt), "--methods", "full", "--limit", "2", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "in use by another run_bench.py (pid" in err and "\n" not in err
    assert first.wait(600) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len({(r["method"], r["budget"]) for r in rows}) == 7  # the first sweep's cells only, none interleaved
    assert run_bench.main(["--model", str(tiny_ckpt), *SWEEP, "--output", str(out)]) == 0  # the lock was released


def test_every_bad_case_is_listed(cases):
    assert sorted(cases) == sorted(BAD)


# ---------------------------------------------------------------------------------------------- stale and foreign


def cell_files(out: Path) -> list[Path]:
    return sorted((out / "cells").glob("*.parquet"))


def run_quiet(capsys, *argv: str) -> str:
    code = run_bench.main(list(argv))
    text = capsys.readouterr().out
    assert code == 0, text
    return text


def my_task(tmp_path: Path, seed: int) -> Path:
    """A user's own task: the synthetic task's folder under another name, reading its own data file."""

    tasks = tmp_path / "tasks"
    if not tasks.is_dir():
        tasks.mkdir(parents=True)
        (tasks / "utils.py").write_text((SYNTH_TASKS / "utils.py").read_text())
        yaml = (SYNTH_TASKS / "synth_vqa.yaml").read_text().replace("task: synth_vqa", "task: my_vqa")
        (tasks / "my_vqa.yaml").write_text(yaml.replace("!function utils.test_file", "../mydata/test.parquet"))
    write_split(tmp_path / "mydata" / "test.parquet", "test", 6, seed)
    return tasks


def test_a_cell_is_recomputed_when_its_task_data_dtype_or_model_changes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", str(tiny_ckpt), "--methods", "full", "--limit", "3", "--output", str(out)]
    tasks = my_task(tmp_path, seed=5)
    mine = [*base, "--tasks", "my_vqa", "--include-path", str(tasks)]
    run_quiet(capsys, *mine)
    assert "1 of 1 cells already" in run_quiet(capsys, *mine)  # unchanged: kept
    my_task(tmp_path, seed=6)  # the user rewrites the questions and answers
    assert "already" not in run_quiet(capsys, *mine)
    assert len(cell_files(out)) == 1 and len(list((out / "cells" / "superseded").glob("*.parquet"))) == 1

    run_quiet(capsys, *base)
    assert "already" not in run_quiet(capsys, *base, "--dtype", "bfloat16")  # float32 numbers are not bfloat16's
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["dtype"] for r in rows} == {"bfloat16"}  # the float32 cells (both tasks) moved to cells/superseded
    assert len({r["cell_id"] for r in rows}) == 1 and all(r["cell_id"] for r in rows)
    assert len(list((out / "cells" / "superseded").glob("*.parquet"))) == 3
    assert "already" not in run_quiet(capsys, *base, "--dtype", "bfloat16", "--force")
    text = run_quiet(capsys, *base)  # the dtype changed back: its cells are taken back, nothing is computed
    assert "1 of 1 cells already" in text and "1 cells computed earlier under these conditions taken back" in text
    assert {r["dtype"] for r in csv.DictReader(open(out / "summary.csv"))} == {"float32"}


def test_a_quick_check_costs_no_finished_cell(tiny_ckpt, tmp_path, capsys):
    """The README's sequence: the full run, a quick `--limit` check into the same folder, the full run again, which
    computes nothing; each run reports only its own cells, and the folder says what cells/superseded/ holds."""
    out = tmp_path / "out"
    full = ["--model", str(tiny_ckpt), "--methods", "full", "random", "--budgets", "4", "--limit", "4",
            "--output", str(out)]
    run_quiet(capsys, *full)
    quick = run_quiet(capsys, *full[:-4], "--limit", "2", "--output", str(out))
    assert "moved to cells/superseded/" in quick and "it holds 2 cells" in quick and "already" not in quick
    assert {r["limit"] for r in csv.DictReader(open(out / "summary.csv"))} == {"2"}
    again = run_quiet(capsys, *full)
    assert "2 of 2 cells already" in again and "[1/" not in again  # nothing evaluated
    assert {r["limit"] for r in csv.DictReader(open(out / "summary.csv"))} == {"4"}
    assert len(cell_files(out)) == 2 and len(list((out / "cells" / "superseded").glob("*.parquet"))) == 2


def test_a_cell_of_another_model_is_set_aside_and_never_reported(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    run_quiet(capsys, "--model", str(tiny_ckpt), "--methods", "full", "--limit", "2", "--output", str(out))
    text = run_quiet(capsys, "--model", str(SMOKE_MODEL), "--methods", "random", "--budgets", "4", "--limit", "2",
                     "--output", str(out))
    assert "is a cell of another model" in text and "set_aside" in text
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["method"] for r in rows} == {"random"} and {r["model"] for r in rows} == {str(SMOKE_MODEL)}
    assert len(list((out / "cells" / "set_aside").glob("*.parquet"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "users_json", "renamed"])
def test_a_corrupt_or_foreign_cell_file_is_named_set_aside_and_recomputed(tiny_ckpt, tmp_path, capsys, damage):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_ckpt), "--methods", "full", "random", "--budgets", "4", "--limit", "2",
            "--output", str(out)]
    run_quiet(capsys, *argv)
    first = cell_files(out)[0]
    if damage == "truncated":
        first.write_bytes(first.read_bytes()[:50])
    elif damage == "users_json":
        (out / "cells" / "notes.json").write_text('{"mine": 1}')
    else:
        first.rename(first.with_name(first.name.replace("__full__", "__random__")))
    text = run_quiet(capsys, *argv)
    assert "note: " in text and "moved to" in text and "set_aside" in text
    assert len(cell_files(out)) == 2 and (out / "cells" / "set_aside").is_dir()
    assert {r["method"] for r in csv.DictReader(open(out / "summary.csv"))} == {"full", "random"}


def test_a_folder_of_the_users_is_refused_and_left_alone(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.csv").write_text("my,own\n1,2\n")
    (out / "table.md").write_text("my table")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_bench.main(["--model", str(tiny_ckpt), "--methods", "full", "--limit", "2", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds files run_bench.py did not write" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fastv_ratio_runs_from_run_bench(tiny_ckpt, tmp_path, capsys):
    """A documented argument that sets the token count itself runs once, labelled by it, at any --budgets."""
    out = tmp_path / "out"
    text = run_quiet(capsys, "--model", str(tiny_ckpt), "--methods", "fastv", "--budgets", "4", "8", "--limit", "2",
                     "--method-args", "fastv.layer=1", "fastv.ratio=0.5", "--output", str(out))
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["budget"] for r in rows} == {"R=0.5"} and "[1/1]" in text
    assert {float(r["visual_tokens_mean"]) for r in rows} == {144.0}  # all tokens below layer 1
    samples = read_samples(out)
    assert all(s["visual_tokens_per_layer"] == [144, 72] for s in samples)


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("free_pages", [0, 2])  # full before the run; full at the first cell file
def test_a_full_disk_is_one_line_leaves_no_partial_file_and_the_rerun_completes(tiny_ckpt, small_disk, capsys,
                                                                                 free_pages):
    out = small_disk / "out"
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # take every block
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - free_pages * 4096))
    argv = ["--model", str(tiny_ckpt), "--methods", "full", "--limit", "2", "--output", str(out)]
    assert run_bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device to write") and err.count("\n") == 1, err
    assert ("__full__144__" in err) == bool(free_pages), err  # with some space, the first cell file is what fails
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    filler.unlink()
    assert run_bench.main(argv) == 0
    assert (out / "summary.csv").is_file() and len(list((out / "cells").glob("*.parquet"))) == 1


def test_a_copied_task_folder_keeps_the_users_own_data(tiny_ckpt, tmp_path, capsys):
    """The synthetic task writes its data only when the file is missing, never over a user's own file."""
    tasks = my_task(tmp_path, seed=2)
    (tasks / "my_vqa.yaml").write_text((tasks / "my_vqa.yaml").read_text().replace("../mydata/", "../data/"))
    write_split(tmp_path / "data" / "test.parquet", "test", 5, 2)
    run_quiet(capsys, "--model", str(tiny_ckpt), "--methods", "full", "--limit", "2", "--tasks", "my_vqa",
              "--include-path", str(tasks), "--output", str(tmp_path / "out"))
    assert pq.read_metadata(tmp_path / "data" / "test.parquet").num_rows == 5


def _poison(model, fragment: str, value: float) -> None:
    """Write `value` into element [0, 0] of the first parameter whose name contains `fragment` (the last one, with
    `fragment` ending in '$')."""
    names = [n for n, _ in model.named_parameters() if fragment.rstrip("$") in n]
    name = names[-1] if fragment.endswith("$") else names[0]
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = value


@pytest.mark.parametrize(("family", "fragment", "value", "where"), [
    ("llava", "vision_tower.encoder.layers.1.mlp.fc2.weight", float("nan"), "vision layer 1's output holds NaN"),
    ("llava", "multi_modal_projector.linear_2.weight", float("nan"), "the projector's output holds NaN"),
    ("llava", "language_model.layers.2.mlp.down_proj.weight", float("inf"), "LLM layer 2's output holds"),
    ("llava", "lm_head.weight", float("inf"), "the prefill's logits holds Inf"),
    ("qwen", "visual.merger.mlp.2.weight", float("nan"), "the vision tower's output (after the merger) holds NaN"),
    ("qwen", "language_model.layers.0.self_attn.o_proj.weight", float("nan"), "LLM layer 0's output holds NaN"),
])
def test_non_finite_numbers_stop_the_generation_and_say_where(family, fragment, value, where):
    """A NaN or Inf in the model's numbers raises NonFiniteError naming the first tensor that holds it, for every
    reducer site; the healthy model passes the same check."""
    from methods.llava import ReducedLlava  # noqa: PLC0415
    from methods.qwen import ReducedQwen  # noqa: PLC0415
    from tests.conftest import qwen_prompts, tiny_batch, tiny_llava, tiny_qwen  # noqa: PLC0415

    def run(model, method, budget):
        r = create_reducer(method, budget, **({"layer": 1} if method == "fastv" else {}))
        if family == "llava":
            return ReducedLlava(model, r).generate(*tiny_batch(model, 2), max_new_tokens=3)
        return ReducedQwen(model, r).generate(*qwen_prompts(model, [(1, 4, 4), (1, 4, 6)]), max_new_tokens=3)

    model = tiny_llava() if family == "llava" else tiny_qwen()
    for method, budget in (("full", None), ("divprune", 4), ("fastv", 4)):
        run(model, method, budget)  # healthy: no error
    _poison(model, fragment, value)
    for method, budget in (("full", None), ("divprune", 4), ("fastv", 4)):
        with pytest.raises(NonFiniteError, match=re.escape(where)):
            run(model, method, budget)


def test_non_finite_logits_while_decoding_are_caught():
    """Decoding's own logits are checked too: a prefill that is finite and a step that is not."""
    from methods._llm import FiniteCheck  # noqa: PLC0415

    check = FiniteCheck()
    check.watch("decoding step 1's logits", torch.zeros(2, 5))
    check.watch("decoding step 2's logits", torch.tensor([[0.0, float("inf")], [float("nan"), 0.0]]))
    with pytest.raises(NonFiniteError, match="m: decoding step 2's logits holds NaN and Inf; its weights"):
        check.check("m")
    padded = FiniteCheck()
    padded.watch("x", torch.tensor([[[float("nan")], [1.0]]]), real=torch.tensor([[False, True]]))
    padded.check("m")  # NaN on a padding position only: not an error


def test_an_image_the_processor_refuses_names_its_task_and_document():
    """Qwen2.5-VL's processor refuses an extreme aspect ratio: the batch's error names the document at fault."""
    from types import SimpleNamespace  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415
    from transformers import AutoProcessor  # noqa: PLC0415

    from benchmarks.lmms_model import DocumentError, ReducedLMM, Request  # noqa: PLC0415

    lm = SimpleNamespace(processor=AutoProcessor.from_pretrained(QWEN_SMOKE_MODEL, local_files_only=True))
    prompt = "<|vision_start|><|image_pad|><|vision_end|>What is it?"
    chunk = [Request("q", {}, None, None, doc, "my_task", "test") for doc in (3, 4)]
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (2000, 4))]
    with pytest.raises(DocumentError, match=r"my_task doc 4: the processor refuses its 2000x4 image \("):
        ReducedLMM._inputs(lm, chunk, [prompt, prompt], images)
    assert ReducedLMM._inputs(lm, chunk[:1], [prompt], images[:1])["pixel_values"].numel() > 0
