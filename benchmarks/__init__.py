"""The sweep, in data-flow order (`run_bench.py` drives it):

    plan.py        RunSpec -> Plan: every (task, method, budget) cell and its reducer, checked before any work;
                   `identify`: every cell's fingerprint and the run's conditions, computed once
    runner.py      `run`: the cells the output folder lacks, through lmms-eval, on one loaded model
    lmms_model.py  ReducedLMM: lmms-eval's model class around the family's adapter (`methods/`)
    records.py     Recorder (what the model records per sample), a finished cell's rows and sample records
    store.py       ResultStore: the results folder (cells/*.parquet, summary.csv, comparisons.csv)

Beside it: `stats.py` (intervals, paired tests, the comparisons), `console.py` (what a sweep prints), `distributed.py`
(several processes), `defaults.py` (paths and defaults, torch-free). `tasks/` is what a sweep evaluates on (the task
catalogue, the task manager, local copies of the standard tasks, our synthetic tasks); `tools/` holds commands built on
the sweep, not part of it (the speed benchmarks, the controller trainer, two result folders compared, exports of a
folder, the results store's scaling benchmark); `smoke_model/` the committed small models with their builders and
trainers.
"""
