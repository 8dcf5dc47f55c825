"""A results folder's sample records in other formats, read from its cell files one cell at a time.

Memory stays that of one cell (`cells/*.parquet`), however large the folder.

    python -m benchmarks.tools.export results/runs/smoke --samples-jsonl   # -> results/runs/smoke/samples.jsonl

`--samples-jsonl [FILE]` writes every sample record as one JSON line (default `DIR/samples.jsonl`), the file earlier
versions rewrote after every cell; columns are documented in results/README.md. `--lmms-eval OUT` writes each cell as
lmms-eval writes a run with `--output_path OUT/<cell> --log_samples` (`<model>/<date>_results.json` and
`<date>_samples_<task>.jsonl`), with our columns added, so lmms-eval's tools read it: its `--baseline` paired
comparison takes a cell's samples file (`score` is the cell's primary metric per question).

    python -m benchmarks.tools.export results/runs/smoke --lmms-eval results/runs/smoke_lmms
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmms_eval.utils import sanitize_model_name

from benchmarks.store import atomic_write, cell_files, cell_meta, cell_samples, write_samples_jsonl
from methods.cli import OneLineParser, first_line


def lmms_eval_files(cell: Path) -> tuple[str, dict, list[dict]]:
    """One cell file as lmms-eval writes a run with `--output_path X --log_samples`: the folder below X
    (`sanitize_model_name` of the model path, as lmms-eval names it), the results JSON and the sample records,
    with our columns added (`run_bench` in the results: the cell's summary rows; in each sample every column of its
    record, and `score`, the primary metric, which lmms-eval's `--baseline` loader reads)."""
    samples = cell_samples(cell)  # first: a file that is no cell is a ValueError naming it
    meta = cell_meta(cell)
    rows = meta["rows"]
    main = next((r for r in rows if r.get("primary") in (True, "True")), rows[0] if rows else {})
    task, method, budget = main.get("task"), main.get("method"), main.get("budget")
    args = f"pretrained={meta['model']},method={method},budget={budget}"
    if main.get("conversation"):
        args += f",conversation={main['conversation']}"
    if main.get("controller_seed") not in (None, ""):
        args += f",controller_seed={main['controller_seed']}"
    metrics = {r["metric"]: r["value"] for r in rows}
    results = {
        "results": {task: {"alias": task, **{f"{m},none": v for m, v in metrics.items()},
                           **{f"{m}_stderr,none": "N/A" for m in metrics}}},
        "group_subtasks": {task: []},
        "configs": {task: {"task": task, "metric_list": [{"metric": m} for m in metrics]}},
        "versions": {task: None},
        "n-shot": {task: 0},
        "higher_is_better": {task: {m: True for m in metrics}},
        "n-samples": {task: {"original": main.get("n"), "effective": len(samples)}},
        "config": {"model": "reduced_vlm", "model_args": args, "batch_size": main.get("batch_size"),
                   "device": main.get("device"), "limit": main.get("limit")},
        "git_hash": main.get("git_sha"),
        "date": main.get("time_utc"),
        "run_bench": {"cell": meta["cell"], "fingerprint": meta["fingerprint"], "rows": rows},
    }
    primary = main.get("metric")
    records = [{"doc_id": s["doc_id"], "target": str(s.get("target")), "filtered_resps": [s.get("prediction")],
                **({primary: s.get("correct")} if primary else {}), "score": s.get("correct"),
                **{k: v for k, v in s.items() if k not in ("doc_id", "target")}} for s in samples]
    return sanitize_model_name(meta["model"]), results, records


def write_lmms_eval(root: Path, out: Path) -> int:
    """Every cell of the results folder `root` as an lmms-eval run under `out`: `out/<cell>__<fingerprint>/<model>/
    <date>_results.json` and `<date>_samples_<task>.jsonl`, where `lmms_eval --output_path out/<cell>__<fingerprint>
    --log_samples` would have written them; one cell at a time. Returns how many cells."""
    cells = cell_files(root)
    for cell in cells:
        model, results, records = lmms_eval_files(cell)
        task = next(iter(results["results"]))
        folder = Path(out) / cell.stem / model
        folder.mkdir(parents=True, exist_ok=True)
        stamp = str(results["date"] or "").replace("-", "").replace(":", "").replace("T", "_").rstrip("Z") or "0"
        atomic_write(folder / f"{stamp}_results.json", json.dumps(results, indent=2, default=str))
        atomic_write(folder / f"{stamp}_samples_{task}.jsonl", "".join(json.dumps(r, default=str) + "\n"
                                                                       for r in records))
    return len(cells)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.tools.export", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("folder", type=Path, help="a results folder run_bench.py wrote (its --output)")
    p.add_argument("--samples-jsonl", nargs="?", const="", default=None, metavar="FILE",
                   help="write the sample records as JSON lines to FILE (default FOLDER/samples.jsonl)")
    p.add_argument("--lmms-eval", type=Path, default=None, metavar="OUT",
                   help="write each cell as an lmms-eval run (results JSON and samples JSONL) under OUT")
    args = p.parse_args(argv)
    if not cell_files(args.folder):
        p.error(f"{args.folder} holds no cells/*.parquet; give a folder run_bench.py wrote (its --output)")
    if args.samples_jsonl is None and args.lmms_eval is None:
        p.error("say what to write: --samples-jsonl and/or --lmms-eval OUT")
    try:
        if args.samples_jsonl is not None:
            out = Path(args.samples_jsonl) if args.samples_jsonl else args.folder / "samples.jsonl"
            print(f"wrote {write_samples_jsonl(args.folder, out)} sample records to {out}")
        if args.lmms_eval is not None:
            print(f"wrote {write_lmms_eval(args.folder, args.lmms_eval)} cells as lmms-eval runs under "
                  f"{args.lmms_eval}")
    except ValueError as e:  # a cell file that cannot be read: nothing half-written of it
        print(f"error: {first_line(e)}; move it aside or rerun its cell with run_bench.py", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
