"""python -m plots RESULTS_DIR: redraw the accuracy-FLOPs curves from a run's summary.csv (no model, no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plots.pareto import plot_accuracy_flops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plots", description=__doc__)
    p.add_argument("results", type=Path, help="a run directory holding summary.csv")
    p.add_argument("--metric", default="exact_match", help="metric on the y axis (default: exact_match)")
    args = p.parse_args(argv)
    summary = args.results / "summary.csv"
    if not summary.is_file():
        print(f"error: {summary} not found; give a directory written by run_bench.py", file=sys.stderr)
        return 2
    for path in plot_accuracy_flops(summary, args.metric):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
