"""The speed benchmark's arguments are checked before any model is built: one line, exit status 2."""

from __future__ import annotations

import pytest

from benchmarks.speed import main


@pytest.mark.parametrize(("argv", "phrase"), [
    (["speedup", "--vision-layers", "0"], "--vision-layers: must be >= 2"),
    (["speedup", "--llm-layers", "1"], "--llm-layers: must be >= 3"),
    (["speedup", "--repeats", "0"], "--repeats: must be >= 1"),
    (["speedup", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["speedup", "--budgets", "77"], "--budgets 77: the plan has"),
    (["speedup", "--device", "tpu"], "use cpu, cuda or cuda:N"),
    (["overhead", "--samples", "0"], "--samples: must be >= 2"),
    (["overhead", "--samples", "4", "--batch-size", "4"], "give at least two batches"),
    (["nope"], "invalid choice"),
])
def test_bad_arguments_are_one_line(argv, phrase, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
