"""Two result folders of the same sweep compared question by question: a method's default against its variant.

    python run_bench.py --methods dart sparsevlm --budgets 36 48 --output results/runs/default
    python run_bench.py --methods dart sparsevlm --budgets 36 48 --output results/runs/variant \
        --method-args dart.pivot_order=position sparsevlm.positions=original
    python -m benchmarks.tools.paired_runs results/runs/default results/runs/variant

For every (task, method, budget, controller seed) cell in both folders' `cells/`, over the questions both
answered: the two accuracies, their difference (first minus second, in points), its 95 % paired-bootstrap interval,
McNemar's exact p and whether the difference is significant (`benchmarks.stats.paired_difference`), and the share of
questions whose answer changed. Prints a Markdown table; `--csv FILE` also writes the rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pyarrow as pa

from benchmarks.stats import paired_difference
from benchmarks.store import cell_files, cell_samples

# a learned method runs one cell per controller seed; a conversation task one per mode
KEY = ("task", "method", "budget", "controller_seed", "conversation")


def by_cell(folder: Path) -> dict[tuple, dict[int, dict]]:
    """{(task, method, budget, controller seed, conversation mode): {doc_id: record}} from a result folder's cells
    (the seed "" for a method without controllers, the mode "" on a single-question task)."""
    files = cell_files(folder)
    if not files:
        raise SystemExit(f"error: {folder}: no cells/*.parquet there; give a folder run_bench.py wrote (its --output)")
    out: dict[tuple, dict[int, dict]] = {}
    for f in files:
        try:
            records = cell_samples(f, (*KEY, "doc_id", "correct", "prediction"))
            for r in records:
                out.setdefault(tuple("" if r.get(k) is None else str(r[k]) for k in KEY), {})[r["doc_id"]] = r
                r["correct"]  # noqa: B018 - every record must carry its score
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
            raise SystemExit(f"error: {f}: not a cell file with sample records ({type(e).__name__}: {e}); rerun "
                             "its cell with run_bench.py") from None
    return out


def compare(first: Path, second: Path) -> pd.DataFrame:
    """One row per cell present in both folders (see the module docstring)."""
    a, b = by_cell(first), by_cell(second)
    rows = []
    for key in sorted(set(a) & set(b)):
        docs = sorted(d for d in set(a[key]) & set(b[key])
                      if a[key][d]["correct"] is not None and b[key][d]["correct"] is not None)
        if not docs:
            continue
        x = [float(a[key][d]["correct"]) for d in docs]
        y = [float(b[key][d]["correct"]) for d in docs]
        d = paired_difference(x, y)
        changed = sum(a[key][i].get("prediction") != b[key][i].get("prediction") for i in docs)
        rows.append({**dict(zip(KEY, key, strict=True)), "n_paired": d["n_paired"],
                     "first_pct": 100 * sum(x) / len(x), "second_pct": 100 * sum(y) / len(y),
                     "difference_pt": 100 * d["difference"], "ci95_low_pt": 100 * d["ci95_low"],
                     "ci95_high_pt": 100 * d["ci95_high"], "mcnemar_p": d["mcnemar_p"],
                     "significant": d["significant"], "answers_changed_pct": 100 * changed / len(docs)})
    if not rows:
        raise SystemExit(f"error: {first} and {second} share no (task, method, budget, seed) cell; run the same sweep "
                         "into both")
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.paired_runs", description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="a result folder (e.g. the default run)")
    parser.add_argument("second", type=Path, help="another result folder of the same sweep (e.g. the variant's)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if args.csv is not None and not args.csv.parent.is_dir():
        parser.error(f"--csv {args.csv}: its folder does not exist")
    table = compare(args.first, args.second)
    if args.csv is not None:  # whole or not at all
        tmp = args.csv.with_name(f".{args.csv.name}.tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(args.csv)
    print(table.to_markdown(index=False, floatfmt=".3g"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
