"""What `run_bench.py` prints: a fast, torch-free help, list and argument errors; a dry run's plan and cost; one
line per finished cell and a final table that fits 120 columns, with lmms-eval's own bars held back."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

import run_bench
from benchmarks.console import cell_line, results_table
from benchmarks.defaults import PLANNED_TEXT_TOKENS, REPO
from flops.analytic import ModelShape, count
from flops.shapes import load_config, shape_record
from methods import create_reducer, list_reducers


def in_fresh_python(argv: list[str]) -> tuple[int, str, bool]:
    """Run run_bench.main(argv) in a new interpreter; return its exit status, stderr, and whether torch got imported."""
    code = (f"import sys, run_bench\ntry:\n    status = run_bench.main({argv!r})\nexcept SystemExit as e:\n"
            "    status = e.code\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', status)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    torch_seen, status = p.stdout.split()[-2:]
    return int(status), p.stderr, torch_seen == "TORCH"


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["--list"], ["--budgets", "0"], ["--methods", "prumerg"],
                                  ["--tasks", "synth_vqa,gqa"], ["--method-args", "fastv.depth=1"],
                                  ["--batch-size", "0"], ["--model", "/nonexistent"]])
def test_help_list_and_argument_errors_do_not_import_torch(argv):
    status, err, torch_seen = in_fresh_python(argv)
    assert not torch_seen, f"{argv} imported torch"
    assert status == (0 if argv[0] in ("--help", "--list") else 2), err
    if status:
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_help_shows_every_default():
    parser = run_bench.build_parser()
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:  # options that take a value
            assert "(default: " in action.help, f"{action.option_strings[0]} shows no default"
    assert max(map(len, parser.format_help().splitlines())) <= 120


def test_list_shows_every_method_with_its_site_and_arguments(capsys):
    assert run_bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in list_reducers():
        assert f"\n{name} " in out
    assert "layer=2 ratio=None" in out and "checkpoint=MODEL/controllers/<name>" in out
    assert max(map(len, out.splitlines())) <= 120


def test_dry_run_prints_the_cost_from_the_flops_counter(tiny_ckpt, capsys):
    assert run_bench.main(["--model", str(tiny_ckpt), "--methods", "full", "random", "--budgets", "4",
                           "--limit", "10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    config = load_config(tiny_ckpt)
    per = 2 * count(shape_record(config, create_reducer("random", 4), PLANNED_TEXT_TOKENS),
                    ModelShape.from_config(config)).prefill / 1e9
    line = next(x for x in out.splitlines() if x.startswith("synth_vqa") and " random " in x)
    assert line.split()[3] == "10" and line.split()[4] == f"{per:.4g}"
    assert float(line.split()[5]) == pytest.approx(per * 10, rel=1e-3)
    assert "estimated prefill cost" in out


def rows(method, budget, value, gflops=0.3, ms=1.5):
    common = {"task": "synth_vqa", "method": method, "budget": budget, "visual_tokens_mean": float(budget),
              "prefill_gflops_mean": gflops, "prefill_ms_median": ms, "wall_s": 2.5}
    return [{**common, "metric": "exact_match", "value": value, "primary": True},
            {**common, "metric": "acc_color", "value": 0.5, "primary": False}]


def test_final_table_one_row_per_cell_with_the_difference_from_full():
    table = results_table(rows("full", 144, 0.901) + rows("fastv", 16, 0.876) + rows("a_much_longer_method_name", 16,
                                                                                     0.5))
    lines = table.splitlines()
    assert lines[0] == "synth_vqa:" and "exact_match" in lines[1] and "acc_color" not in table  # primary metric only
    assert len(lines) == 3 + 3 and max(map(len, lines)) <= 120  # task, header, rule, one line per cell
    fastv = next(x for x in lines if x.startswith("fastv "))
    assert "87.6 %" in fastv and "-2.5 pt" in fastv and "0.3" in fastv
    assert lines[-1].split()[0] == "full"  # full last
    mme = results_table([{**rows("full", 144, 1500.0)[0]}, {**rows("fastv", 16, 1450.5)[0]}])
    assert "-49.5" in mme and "%" not in mme  # a score not on a 0-1 scale stays in its own units


def test_cell_line():
    assert cell_line(3, 22, rows("fastv", 16, 0.876)) == (
        "[3/22] synth_vqa  fastv           16: exact_match 87.6 %, 16.0 visual tokens, 0.3 prefill GFLOPs, 2.5 s")


@pytest.mark.slow
def test_a_run_prints_one_line_per_cell_and_no_progress_bars(tiny_ckpt, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = [sys.executable, "run_bench.py", "--model", str(tiny_ckpt), "--methods", "full", "random", "--budgets", "4",
            "--limit", "4"]
    quiet = subprocess.run([*argv, "--output", str(tmp_path / "q")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "[1/2] synth_vqa" in quiet.stdout and "[2/2] synth_vqa" in quiet.stdout
    assert "%|" not in quiet.stderr and "Postprocessing" not in quiet.stderr, quiet.stderr[-2000:]
    assert len(quiet.stderr.splitlines()) < 5, quiet.stderr
    table = quiet.stdout[quiet.stdout.index("synth_vqa:\n"):].split("\n\n")[0].splitlines()
    assert len(table) == 3 + 2 and max(map(len, table)) <= 120
    loud = subprocess.run([*argv, "--output", str(tmp_path / "v"), "--verbose"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "Postprocessing" in loud.stderr
    summary = (tmp_path / "q" / "summary.csv").read_text().splitlines()
    assert len(summary) > 1 and json.dumps(summary)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "q" / "summary.csv").read_text())))
    for r in rows:  # every accuracy of this task is a mean over questions: it carries its interval (from 2 questions)
        if int(r["n"]) >= 2:
            assert float(r["ci95_low"]) <= float(r["value"]) <= float(r["ci95_high"]) and "bootstrap" in r["ci_method"]
        else:
            assert r["ci95_low"] == r["ci95_high"] == r["ci_method"] == ""
    assert any(int(r["n"]) >= 2 for r in rows)
    paired = list(csv.DictReader(io.StringIO((tmp_path / "q" / "comparisons.csv").read_text())))
    assert {(c["method"], c["reference"]) for c in paired} == {("random", "full")}  # no other method at budget 4
    assert "vs full" in quiet.stdout and ("*" in table[-1]) == (paired[0]["significant"] == "True")


def test_final_table_shows_a_mean_over_training_seeds_and_their_range():
    seeded = [{**r, "controller_seed": s, "value": v if r["primary"] else 0.4}
              for s, v in ((0, 0.80), (1, 0.86)) for r in rows("adaptive_a", 16, 0.0)]
    table = results_table(rows("full", 144, 0.9) + seeded)
    line = next(x for x in table.splitlines() if x.startswith("adaptive_a"))
    assert "adaptive_a x2" in line and "83.0 %" in line and "80.0-86.0 s" in line and "-7.0 pt" in line
    assert "mean of N controllers" in table
    assert cell_line(1, 2, [{**seeded[0]}]).startswith("[1/2] synth_vqa  adaptive_a[0]")


def test_default_tasks_follow_the_model():
    """No --tasks: the LLaVA smoke model's tasks (SMOKE_TASKS), synth_vqa alone on any other (the Qwen2.5-VL smoke
    model knows that task only); named tasks are kept."""
    from benchmarks.defaults import QWEN_SMOKE_MODEL  # noqa: PLC0415
    from benchmarks.plan import RunSpec  # noqa: PLC0415
    from benchmarks.tasks import SMOKE_TASKS  # noqa: PLC0415

    assert RunSpec().tasks == SMOKE_TASKS == ("synth_vqa", "synth_scenes")
    assert RunSpec(model=QWEN_SMOKE_MODEL).tasks == ("synth_vqa",)
    assert RunSpec(tasks=("synth_scenes",)).tasks == ("synth_scenes",)


def test_default_limit_follows_the_model():
    """No --limit: SMOKE_LIMIT questions per task on the LLaVA smoke model (its sweep in under 10 minutes), every
    question on any other model; a given --limit is kept."""
    from benchmarks.defaults import QWEN_SMOKE_MODEL, SMOKE_LIMIT  # noqa: PLC0415
    from benchmarks.plan import RunSpec  # noqa: PLC0415

    assert RunSpec().limit == SMOKE_LIMIT == 500
    assert RunSpec(model=QWEN_SMOKE_MODEL).limit is None and RunSpec(limit=1000).limit == 1000


def test_help_descriptions_and_method_summaries_are_whole_sentences(capsys):
    """`--help` texts and `--list`'s method summaries end where their sentence ends (not at a docstring's line
    break)."""
    from benchmarks.tools import export, paired_runs, speed, store_scale  # noqa: PLC0415 - torch-heavy, only here
    from flops import __main__ as flops_cli  # noqa: PLC0415

    for module in (flops_cli, speed, export, paired_runs, store_scale):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        description = " ".join(module.__doc__.split("\n\n")[0].split())
        assert description.endswith((".", "?")), module.__name__
        assert description in " ".join(capsys.readouterr().out.split()), module.__name__
    for name, entry in json.loads((REPO / "methods" / "catalogue.json").read_text()).items():
        assert entry["summary"].endswith("."), (name, entry["summary"])
