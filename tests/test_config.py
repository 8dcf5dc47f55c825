"""A sweep config file (`run_bench.py --config sweep.yaml`, issue 39): the file's settings, the command line's over
them, one-line errors naming the file, and every row recording the config it came from."""

from __future__ import annotations

import csv

import pytest

import run_bench


def write(tmp_path, text: str | bytes):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_the_file_sets_the_sweep_and_the_command_line_overrides_it(tmp_path):
    path = write(tmp_path, "methods: [full, pdrop]\nbudgets: [16, 0.25]\ntasks: synth_vqa\nlimit: 50\n"
                           "method-args: {pdrop: {ratios: [0.5, 0.25, 0.125]}, fastv: {layer: 3}}\n"
                           "task_data: {gqa: /data/gqa}\nconversation: re-prune\n")
    args = run_bench.parse_args(["--config", str(path), "--limit", "7"])
    assert args.methods == ["full", "pdrop"] and [str(b) for b in args.budgets] == ["16", "0.25"]
    assert args.tasks == ["synth_vqa"] and args.limit == 7  # the command line's --limit wins
    assert ("pdrop", "ratios", (0.5, 0.25, 0.125)) in args.method_args and ("fastv", "layer", 3) in args.method_args
    assert args.task_data == ["gqa=/data/gqa"] and args.conversation == ["re-prune"]
    assert args.config_record.startswith(f"{path} (sha1 ")
    assert run_bench.parse_args(["--limit", "7"]).config is None


@pytest.mark.parametrize(("text", "message"), [
    ("methds: [full]\n", "unknown key 'methds' (did you mean methods?)"),
    ("limit: 0\n", "argument --limit: must be >= 1, got 0"),
    ("limit: [\n", "is not YAML (line 2)"),
    ("- full\n", "must be a YAML mapping"),
    ("method_args: [fastv.layer=3]\n", "method_args must map each method to its arguments"),
    ("force: true\n", "unknown key 'force'"),  # an action of one command, not a sweep's setting
    (b"\xff\xfe\x00bad", "is not a text file (not UTF-8)"),  # a corrupt file
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        run_bench.parse_args(["--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}: ") and message in err[0]


def test_every_row_records_the_config_it_came_from(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    path = write(tmp_path, f"model: {tiny_ckpt}\nmethods: [full]\nlimit: 2\noutput: {out}\n")
    assert run_bench.main(["--config", str(path)]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert rows and all(r["config"].startswith(f"{path} (sha1 ") for r in rows)
